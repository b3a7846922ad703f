"""The proxy's output, line by line: to the journal, to stderr, or to 1.9's istio.log / istio.err.log.

Each line is tagged with its epoch, pid and stream; in the journal it gets a priority read from its
level word. The files are appended (1.9 truncated them at every start) and reopened on SIGUSR1,
never through a link planted in the log directory. A line that cannot be written (a full disk) is
dropped and counted, as 1.9's shell redirect lost it: the relay never stops the supervisor.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from istio_vm import loggers, trust
from istio_vm.errors import UntrustedPathError
from istio_vm.journal import JournalSocket, journal_socket

log = loggers.logger(__name__)


class ProxyOutput:
    """The child's output, line by line, to the journal, to stderr, or to istio.log/istio.err.log."""

    def __init__(self, target: str, *, name: str, log_dir: str = "/var/log/istio",
                 journal_sender: Callable[..., Any] | None = None, journal: JournalSocket | None = None,
                 stderr: TextIO | None = None) -> None:
        self.target, self.name, self.log_dir = target, name, log_dir
        self._stderr = stderr or sys.stderr
        self._send = journal_sender
        self._journal = journal
        if target == "journal" and self._send is None:
            self._journal = self._journal or journal_socket()  # never blocks: see istio_vm/journal.py
            self._send = self._journal.send
        self._files: dict[str, int] = {}  # stream -> fd opened O_APPEND
        self.dropped = 0  # lines lost since the output last worked
        self.dropped_total = 0
        if target == "files":
            self._files = self._open()

    def _open(self) -> dict[str, int]:
        """istio.log and istio.err.log, for appending. As root (TPROXY mode) the log directory may be
        istio-proxy's: a file there must be a plain file of root's or of the directory's owner, never
        a link (O_NOFOLLOW) or a second name of another file (a hard link to /etc/shadow)."""
        owners = None
        if os.geteuid() == 0:
            owners = (0, os.stat(self.log_dir).st_uid)
        opened: dict[str, int] = {}
        try:
            for stream, filename in (("stdout", "istio.log"), ("stderr", "istio.err.log")):
                opened[stream] = trust.open_checked(os.path.join(self.log_dir, filename),
                                                    os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, owners=owners)
        except BaseException:
            for fd in opened.values():
                os.close(fd)
            raise
        return opened

    def reopen(self) -> None:
        """Open (again) istio.log and istio.err.log for appending, e.g. after logrotate moved them.

        If they cannot be opened, the old ones are kept (the supervisor goes on either way)."""
        if self.target != "files":
            return
        try:
            opened = self._open()
        except (OSError, UntrustedPathError) as e:
            log.error("Cannot reopen the proxy's log files in %s: %s; still writing to the old ones", self.log_dir, e)
            return
        self.close()
        self._files = opened

    def line(self, epoch: int, pid: int, stream: str, text: str) -> None:
        try:
            if self.target == "journal" and self._send is not None:
                self._send(MESSAGE=text, PRIORITY=str(_priority(text, stream)), SYSLOG_IDENTIFIER=self.name,
                           ISTIO_EPOCH=str(epoch), ISTIO_CHILD_PID=str(pid), ISTIO_STREAM=stream)
            elif self.target == "files":
                _write_all(self._files[stream], (text + "\n").encode("utf-8", "surrogateescape"))
            else:
                self._stderr.write(f"{self.name}[epoch {epoch}, pid {pid}]: {text}\n")
                self._stderr.flush()
        except OSError as e:  # ENOSPC, EIO, EPIPE...: lose the line, not the supervisor
            self.dropped += 1
            self.dropped_total += 1
            if self.dropped == 1:
                log.error("Cannot write the proxy's output (%s): dropping its lines until it works again", e,
                          extra={"ISTIO_EVENT": "output"})
            return
        if self.dropped:
            log.warning("The proxy's output works again; %s lines were dropped", self.dropped,
                        extra={"ISTIO_EVENT": "output"})
            self.dropped = 0

    def flush(self) -> None:
        """Retry what journald could not take yet (each turn of the loop)."""
        if self._journal is not None:
            self._journal.flush()

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._journal is not None:
            self._journal.close()  # what waits gets a second to go; a later entry connects again


def _write_all(fd: int, data: bytes) -> None:
    """os.write until everything is written (a short write precedes ENOSPC)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _priority(text: str, stream: str) -> int:
    """Journal priority of a child line from its level word (Envoy `[warning]`, pilot-agent `\\twarn\\t`)."""
    lowered = text.lower()
    for words, priority in ((("critical", "fatal", "panic"), 2), (("error",), 3), (("warn",), 4),
                            (("debug", "trace"), 7)):
        if any(f"[{w}" in lowered or f"\t{w}" in lowered for w in words):
            return priority
    return 6
