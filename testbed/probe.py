"""An ordinary user's connections in a loop, each classified by where it landed, for the capture tests.

As a script: ``python probe.py HOST PORT OUT STOPFILE [TIMEOUT]``: connects to HOST:PORT again and
again (one new TCP connection per attempt, a few ms apart, each given TIMEOUT seconds, 1 by default)
until STOPFILE exists, and appends one JSON line per
attempt to OUT: ``{"t0": CLOCK_MONOTONIC at its start, "t": at its end, "outcome": ...}`` where outcome is
``direct`` (testbed/app.py answered and saw our own address and port), ``refused`` (captured to a proxy
port where nothing listens), ``proxied`` (a proxy answered, or relayed it to the app), or ``error: ...``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def attempt(host: str, port: int, timeout: float = 1.0) -> str:
    """One GET on a new connection: "direct" when the app saw our own address and port, "proxied" when
    something else answered or the app saw another peer (a proxy relayed it: Envoy's inbound cluster binds
    127.0.0.6, its outbound one a port of its own), "refused", or "error: ...". No NAT is on the way
    here but REDIRECT, which changes the destination only."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            local, local_port = s.getsockname()[:2]
            s.sendall(f"GET /probe HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"error: {e}"
    body = data.partition(b"\r\n\r\n")[2]
    try:
        answer = json.loads(body)
    except ValueError:
        return "proxied"
    mine = f"{local}:{local_port}"
    return "direct" if isinstance(answer, dict) and answer.get("path") == "/probe" and answer.get("peer") == mine \
        else "proxied"


def main() -> int:
    host, port, out, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    with open(out, "a", encoding="utf-8") as f:
        while not os.path.exists(stop):
            began = time.clock_gettime(time.CLOCK_MONOTONIC)
            outcome = attempt(host, port, timeout)
            f.write(json.dumps({"t0": began, "t": time.clock_gettime(time.CLOCK_MONOTONIC), "outcome": outcome}) + "\n")
            f.flush()
            time.sleep(0.005)
    return 0


if __name__ == "__main__":
    sys.exit(main())
