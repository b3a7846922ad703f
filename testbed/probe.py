"""An ordinary user's connections in a loop, each classified by where it landed, for the capture tests.

As a script: ``python probe.py HOST PORT OUT STOPFILE``: connects to HOST:PORT again and again (one new
TCP connection per attempt, a few ms apart) until STOPFILE exists, and appends one JSON line per
attempt to OUT: ``{"t": CLOCK_MONOTONIC, "outcome": ...}`` where outcome is ``direct`` (the real
destination answered: testbed/app.py's JSON naming its port), ``refused`` (captured to a proxy port
where nothing listens), ``proxied`` (something else answered: a proxy), or ``error: ...``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def attempt(host: str, port: int, timeout: float = 1.0) -> str:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
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
    return "direct" if isinstance(answer, dict) and answer.get("path") == "/probe" and "peer" in answer else "proxied"


def main() -> int:
    host, port, out, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with open(out, "a", encoding="utf-8") as f:
        while not os.path.exists(stop):
            outcome = attempt(host, port)
            f.write(json.dumps({"t": time.clock_gettime(time.CLOCK_MONOTONIC), "outcome": outcome}) + "\n")
            f.flush()
            time.sleep(0.005)
    return 0


if __name__ == "__main__":
    sys.exit(main())
