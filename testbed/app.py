"""A tiny threaded HTTP/1.1 app with a configurable response delay, for Envoy tests and the demo.

In process::

    with App(delay=0.3) as app:
        urllib.request.urlopen(f"http://127.0.0.1:{app.port}/")

As a script: ``python -m testbed.app --host 0.0.0.0 --port 8080 --delay 0.3``.

Every response is ``200`` with a small JSON body (path, server port, count, peer address) and keeps the connection
alive. ``?delay=SECONDS`` overrides the server-wide delay for one request; ``?status=N`` answers with status N.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], delay: float, quiet: bool) -> None:
        super().__init__(address, _Handler)
        self.delay = delay
        self.quiet = quiet
        self.count = 0
        self.busy = 0  # requests received and not answered yet
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that went away (a killed Envoy) is not worth a traceback when quiet; anything else is."""
        if self.quiet and isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: _Server

    def _answer(self) -> None:
        with self.server.lock:
            self.server.busy += 1
        try:
            self._respond()
        finally:
            with self.server.lock:
                self.server.busy -= 1

    def _respond(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        delay = float(query.get("delay", [self.server.delay])[0])
        status = int(query.get("status", ["200"])[0])
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if delay > 0:
            time.sleep(delay)
        with self.server.lock:
            self.server.count += 1
            count = self.server.count
        body = json.dumps(
            {
                "path": url.path,
                "port": self.server.server_address[1],
                "count": count,
                "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            }
        ).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"app: {self.address_string()} {format % args}\n")


class App:
    """The HTTP app, served from a background thread. Use as a context manager or call start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, delay: float = 0.0, quiet: bool = True) -> None:
        self._server = _Server((host, port), delay, quiet)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def count(self) -> int:
        """How many requests were answered."""
        with self._server.lock:
            return self._server.count

    @property
    def busy(self) -> int:
        """How many requests it is working on now (received, not answered yet): e.g. in a ``?delay=``."""
        with self._server.lock:
            return self._server.busy

    def start(self) -> App:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"app:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> App:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each response")
    parser.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    args = parser.parse_args(argv)
    server = _Server((args.host, args.port), args.delay, args.quiet)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"app: listening on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever(0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
