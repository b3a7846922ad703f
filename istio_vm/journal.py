"""journald's native protocol, sent without ever blocking: an entry goes now, waits in a short queue, or is
dropped and counted.

libsystemd's sd_journal_send (systemd.journal.send) is a blocking sendmsg: while journald does not read
(stalled, or behind a flood), it waits, and the supervisor's loop with it (reaping, SIGTERM, the drain).
`JournalSocket` sends the same datagrams (systemd.io/JOURNAL_NATIVE_PROTOCOL) with MSG_DONTWAIT.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import re
import select
import socket
import struct
import time
from collections import deque

SOCKET_PATH = "/run/systemd/journal/socket"
MAX_PENDING_ENTRIES = 1024  # entries kept while journald's queue is full; then the oldest are dropped
MAX_PENDING_BYTES = 4 << 20
SNDBUF = 8 << 20  # as libsystemd asks (the kernel caps it at net.core.wmem_max): one datagram per entry
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")  # what journald keeps of a client's fields
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
# The socket is gone or another one (journald restarted): connect again once.
_RECONNECT = frozenset({errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT, errno.EDESTADDRREQ})


def encode_entry(fields: dict[str, object]) -> bytes:
    """One entry in the native protocol: ``NAME=value`` lines, or ``NAME``, a 64-bit length and the bytes
    for a value with a newline. Names journald would ignore (lower case, a leading ``_``: logging's
    record attributes that JournalHandler passes along) are left out, as journald would."""
    parts = []
    for name, value in fields.items():
        if value is None or not _FIELD_NAME.fullmatch(name):
            continue
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSocket:
    """Journal entries to journald's socket (``path``), in order, never blocking the caller.

    ``send()`` has systemd.journal.send's signature. An entry journald cannot take now (its queue is
    full: BlockingIOError) waits, with the ones after it, in a queue of MAX_PENDING_ENTRIES /
    MAX_PENDING_BYTES that every later send and ``flush()`` (each turn of the loop) retries; beyond
    that the oldest are dropped, and once the queue drains, one more entry says how many were lost.
    Other send errors drop the entry and count it the same way (no journald, for one).
    """

    def __init__(self, path: str = SOCKET_PATH) -> None:
        self.path = path
        self._socket: socket.socket | None = None
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self.dropped = 0  # since entries last went through
        self.dropped_total = 0

    def send(self, MESSAGE: str, **fields: object) -> None:
        self._pending.append(encode_entry({"MESSAGE": MESSAGE, **fields}))
        self._pending_bytes += len(self._pending[-1])
        self.flush()
        while len(self._pending) > MAX_PENDING_ENTRIES or self._pending_bytes > MAX_PENDING_BYTES:
            self._drop()  # the oldest: the latest say more about now

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> bool:
        """Send what waits, oldest first, until journald's queue is full again; True when nothing waits."""
        while self._pending:
            try:
                self._transmit(self._pending[0])
            except BlockingIOError:
                return False
            except OSError:
                self._drop()
                continue
            self._pending_bytes -= len(self._pending.popleft())
            if self.dropped and not self._pending:
                notice = encode_entry({
                    "MESSAGE": f"istio-vm: {self.dropped} journal entries were dropped: journald did not take them",
                    "PRIORITY": 4, "SYSLOG_IDENTIFIER": "istio-vm", "ISTIO_EVENT": "journal",
                    "ISTIO_DROPPED": self.dropped})  # fmt: skip
                with contextlib.suppress(OSError):
                    self._transmit(notice)
                    self.dropped = 0
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Give what waits up to ``timeout`` seconds to go (journald may be reading again), then close."""
        deadline = time.monotonic() + timeout
        while not self.flush() and (remaining := deadline - time.monotonic()) > 0 and self._socket is not None:
            select.select([], [self._socket], [], remaining)  # connected: writable once journald has room
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _drop(self) -> None:
        self._pending_bytes -= len(self._pending.popleft())
        self.dropped += 1
        self.dropped_total += 1

    def _transmit(self, entry: bytes) -> None:
        for attempt in (1, 2):
            if self._socket is None:
                self._socket = self._connect()
            try:
                self._socket.send(entry, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                return
            except OSError as e:
                if e.errno in (errno.EMSGSIZE, errno.ENOBUFS):  # bigger than a datagram may be
                    self._transmit_memfd(entry)
                    return
                if e.errno not in _RECONNECT or attempt == 2:
                    raise
                self._socket.close()
                self._socket = None

    def _connect(self) -> socket.socket:
        # Connected, so that poll(2) says when journald's queue has room (close() waits for that).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def _transmit_memfd(self, entry: bytes) -> None:
        """An entry too big for a datagram goes as libsystemd sends it: in a sealed memfd passed along."""
        assert self._socket is not None
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # journald takes only a memfd nobody can change
            self._socket.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                                 socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        finally:
            os.close(fd)


_process_socket: list[JournalSocket] = []


def journal_socket() -> JournalSocket:
    """The process's JournalSocket: istio-vm's own records and the proxy's lines share it, so they keep their
    order, and one flush per loop turn serves both."""
    if not _process_socket:
        _process_socket.append(JournalSocket())
        atexit.register(_process_socket[0].close)  # the last entries get their second to go
    return _process_socket[0]
