"""A small thread-based HTTP load generator for tests (stdlib only).

Some threads reuse one keep-alive connection (and reconnect when the server says ``Connection: close`` or the
connection breaks); others open a new connection for every request. Every failure is counted with its reason:
an exception class and message, or an unexpected status. Nothing is retried. The loops are bounded in time and in
count and stop on demand::

    with Load("127.0.0.1", port) as load:
        ...
    assert load.result.failed == 0, load.result.reasons
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType


@dataclass
class LoadResult:
    """Counters of one load run (a snapshot while it runs)."""

    ok: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    connection_close: int = 0  # successful responses that carried "Connection: close"
    connections: int = 0  # connections opened
    max_latency: float = 0.0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def summary(self) -> str:
        reasons = ", ".join(f"{n}x {r}" for r, n in self.reasons.most_common(5))
        return (
            f"{self.ok} ok, {self.failed} failed in {self.seconds:.1f}s over {self.connections} connections, "
            f"{self.connection_close} 'Connection: close', max latency {self.max_latency * 1000:.0f} ms"
            + (f"; failures: {reasons}" if reasons else "")
        )


class Load:
    """HTTP/1.1 GET requests in a loop from threads, until stop(), max_seconds or max_requests."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str = "/",
        keepalive_threads: int = 2,
        fresh_threads: int = 2,
        timeout: float = 5.0,
        max_seconds: float = 60.0,
        max_requests: int = 200_000,
        expect_status: int = 200,
        failure_pause: float = 0.01,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.keepalive_threads, self.fresh_threads = keepalive_threads, fresh_threads
        self.timeout, self.max_seconds, self.max_requests = timeout, max_seconds, max_requests
        self.expect_status, self.failure_pause = expect_status, failure_pause
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._result = LoadResult()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0
        self._started = 0.0
        self._stopped: float | None = None

    # -- control -------------------------------------------------------------------------------------------------

    def start(self) -> Load:
        self._started = time.monotonic()
        for i in range(self.keepalive_threads):
            self._threads.append(threading.Thread(target=self._run, args=(True,), name=f"load-ka-{i}", daemon=True))
        for i in range(self.fresh_threads):
            self._threads.append(threading.Thread(target=self._run, args=(False,), name=f"load-new-{i}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> LoadResult:
        """Stop the threads (each finishes its current request) and return the final counters."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        if self._stopped is None:
            self._stopped = time.monotonic()
        return self.result

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------------------------------

    @property
    def result(self) -> LoadResult:
        with self._lock:
            r = LoadResult(
                self._result.ok,
                self._result.failed,
                Counter(self._result.reasons),
                self._result.connection_close,
                self._result.connections,
                self._result.max_latency,
            )
        r.seconds = (self._stopped or time.monotonic()) - self._started if self._started else 0.0
        return r

    @property
    def in_flight(self) -> int:
        """Requests begun whose response has not been read yet (counted before they connect: not proof that the
        server has them)."""
        with self._lock:
            return self._in_flight

    def wait_ok(self, count: int, timeout: float = 10.0) -> LoadResult:
        """Wait until at least `count` more requests succeeded than now; AssertionError after `timeout`."""
        target = self.result.ok + count
        deadline = time.monotonic() + timeout
        while (r := self.result).ok < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load: fewer than {count} successes in {timeout}s: {r.summary()}")
            if self._stop.wait(0.01) and all(not t.is_alive() for t in self._threads):
                raise AssertionError(f"load stopped before {count} successes: {r.summary()}")
        return r

    def wait_in_flight(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least `count` requests are in flight at once."""
        deadline = time.monotonic() + timeout
        while self.in_flight < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"load: never {count} requests in flight within {timeout}s")
            time.sleep(0.002)

    # -- the loop ------------------------------------------------------------------------------------------------

    def _run(self, keepalive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        deadline = self._started + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if self._result.ok + self._result.failed + self._in_flight >= self.max_requests:
                        return
                    self._in_flight += 1
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                    with self._lock:
                        self._result.connections += 1
                began = time.monotonic()
                reason: str | None = None
                close = False
                try:
                    conn.request("GET", self.path, headers={} if keepalive else {"Connection": "close"})
                    response = conn.getresponse()
                    response.read()
                    close = (response.getheader("Connection") or "").lower() == "close"
                    if response.status != self.expect_status:
                        reason = f"status {response.status}"
                except (OSError, http.client.HTTPException) as e:
                    reason = f"{type(e).__name__}: {e}"
                    close = True
                latency = time.monotonic() - began
                with self._lock:
                    self._in_flight -= 1
                    if reason is None:
                        self._result.ok += 1
                        self._result.connection_close += close and keepalive
                    else:
                        self._result.failed += 1
                        self._result.reasons[reason] += 1
                    self._result.max_latency = max(self._result.max_latency, latency)
                if close or not keepalive:
                    conn.close()
                    conn = None
                if reason is not None:
                    self._stop.wait(self.failure_pause)  # no busy loop against a closed port
        finally:
            if conn is not None:
                conn.close()
