"""Signals become queue entries; the daemon loop does the work.

The handlers only append the signal number to a deque and, through `signal.set_wakeup_fd`, wake the
loop's `select`. Installed by a context manager that restores the previous handlers on exit.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections import deque
from collections.abc import Iterable, Iterator
from types import FrameType


class SignalQueue:
    """Pending signals and the socket that becomes readable when one arrives."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self.wakeup, self._writer = socket.socketpair()
        for sock in (self.wakeup, self._writer):
            sock.setblocking(False)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler - no logging, no work: just queue the signal."""
        self._pending.append(signum)

    def put(self, signum: int) -> None:
        """Queue a signal as if it had arrived (the loop's unit tests drive it so: tests/sim.py)."""
        self._pending.append(signum)
        with contextlib.suppress(BlockingIOError):
            self._writer.send(b"\0")

    def drain(self) -> list[int]:
        """The signals received since the last call, in order (and empty the wakeup socket)."""
        with contextlib.suppress(BlockingIOError):
            while self.wakeup.recv(4096):
                pass
        signals = []
        while self._pending:
            signals.append(self._pending.popleft())
        return signals

    def close(self) -> None:
        self.wakeup.close()
        self._writer.close()


@contextlib.contextmanager
def captured(signals: Iterable[int]) -> Iterator[SignalQueue]:
    """Queue `signals` while inside the block; restore the previous handlers afterwards."""
    queue = SignalQueue()
    previous: dict[int, signal._HANDLER] = {}
    # The wakeup fd makes a signal interrupt select() even when it arrives just before the loop
    # blocks (the race a flag checked before select() would lose).
    old_fd = signal.set_wakeup_fd(queue._writer.fileno(), warn_on_full_buffer=False)
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, queue.handler)
        yield queue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(old_fd)
        queue.close()
