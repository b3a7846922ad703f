"""Tell systemd what happens: READY=1, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1.

sd_notify(3)'s datagram, sent by `NotifySocket` without ever blocking (libsystemd's send blocks
while the receiver's queue is full, which would stall the loop: reaping, signals, the drain). A
message that does not fit now waits in a short queue, retried at every later send and loop turn;
the sender is injectable so tests record the messages; outside systemd (no NOTIFY_SOCKET) sending
does nothing. `watchdog_interval` reads WatchdogSec= from the environment systemd gives the service.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Mapping

from istio_vm import loggers

log = loggers.logger(__name__)
MAX_PENDING = 8  # messages kept while the socket is full; older ones are dropped (STATUS/WATCHDOG first)


class NotifySocket:
    """Sends to $NOTIFY_SOCKET (a path, or @abstract) with MSG_DONTWAIT: BlockingIOError when full."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None

    def __call__(self, message: str) -> bool:
        if not self._address.startswith(("/", "\0")):
            return False  # not under systemd (or a vsock address this systemd does not give)
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._socket.sendto(message.encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class Notifier:
    def __init__(self, sender: Callable[[str], bool] | None = None) -> None:
        self._send = NotifySocket() if sender is None else sender
        self._last_status: str | None = None
        self._pending: deque[str] = deque()
        self.dropped = 0

    def send(self, message: str) -> None:
        if message.startswith("STATUS="):
            if message == self._last_status:
                return  # nothing changed: no datagram
            self._last_status = message
        self._queue(message)
        self.flush()

    def flush(self) -> None:
        """Send what waits, oldest first, until the socket is full again."""
        while self._pending:
            message = self._pending[0]
            try:
                self._send(message)
            except BlockingIOError:
                return  # still full: try again at the next send or loop turn
            except OSError as e:
                log.debug("sd_notify(%r) failed: %s", message, e)
            self._pending.popleft()
            if not self._pending and self.dropped:
                log.warning("The notify socket takes messages again (%s were dropped)", self.dropped)
                self.dropped = 0

    def _queue(self, message: str) -> None:
        kind = message.partition("=")[0]
        if kind in ("STATUS", "WATCHDOG"):  # only the latest one means anything
            self._pending = deque(m for m in self._pending if m.partition("=")[0] != kind)
        if len(self._pending) >= MAX_PENDING:
            if self.dropped == 0:
                log.warning("The notify socket is full (systemd does not read it): dropping messages")
            self.dropped += 1
            self._pending.popleft()
        self._pending.append(message)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send WATCHDOG=1: half of WATCHDOG_USEC, if it is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    watched = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (watched and watched != str(pid)):
        return None
    return int(usec) / 2e6
