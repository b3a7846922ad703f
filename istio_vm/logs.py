"""Where logs go: the journal with structured fields under systemd, readable lines on stderr
otherwise, or 1.9's istio.log / istio.err.log (appended, reopened on SIGUSR1).

Also relays the child's stdout/stderr line by line, each line tagged with its epoch and pid.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

IDENTIFIER = "istio-vm"
FIELDS = ("ISTIO_EVENT", "ISTIO_EPOCH", "ISTIO_CHILD_PID")


def under_journal() -> bool:
    """systemd connected our stderr to the journal (JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in stream.split(":"))
        info = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def choose_target(configured: str | None) -> str:
    return configured or ("journal" if under_journal() else "stderr")


class _StderrFormatter(logging.Formatter):
    """`istio-vm: message [epoch=1 pid=123]`: readable, with the structured fields at the end."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{IDENTIFIER}: {record.getMessage()}"
        if record.levelno >= logging.WARNING:
            text = f"{IDENTIFIER}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(target: str, *, level: int = logging.INFO, journal_sender: Callable[..., Any] | None = None) -> None:
    """Send the daemon's own log records to the journal (target "journal") or to stderr."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if target == "journal":
        from systemd.journal import JournalHandler, send

        handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER, sender_function=journal_sender or send)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter())
    root.addHandler(handler)
    root.setLevel(level)


class ChildOutput:
    """The child's output, line by line, to the journal, to stderr, or to istio.log/istio.err.log."""

    def __init__(self, target: str, *, name: str, log_dir: str = "/var/log/istio",
                 journal_sender: Callable[..., Any] | None = None, stderr: TextIO | None = None) -> None:
        self.target, self.name, self.log_dir = target, name, log_dir
        self._stderr = stderr or sys.stderr
        self._send = journal_sender
        if target == "journal" and self._send is None:
            from systemd.journal import send

            self._send = send
        self._files: dict[str, TextIO] = {}
        if target == "files":
            self.reopen()

    def reopen(self) -> None:
        """Open (again) istio.log and istio.err.log for appending, e.g. after logrotate moved them."""
        if self.target != "files":
            return
        self.close()
        for stream, filename in (("stdout", "istio.log"), ("stderr", "istio.err.log")):
            self._files[stream] = open(os.path.join(self.log_dir, filename), "a", encoding="utf-8")  # noqa: SIM115

    def line(self, epoch: int, pid: int, stream: str, text: str) -> None:
        if self.target == "journal" and self._send is not None:
            self._send(MESSAGE=text, PRIORITY=str(_priority(text, stream)), SYSLOG_IDENTIFIER=self.name,
                       ISTIO_EPOCH=str(epoch), ISTIO_CHILD_PID=str(pid), ISTIO_STREAM=stream)
        elif self.target == "files":
            out = self._files[stream]
            out.write(text + "\n")
            out.flush()
        else:
            self._stderr.write(f"{self.name}[epoch {epoch}, pid {pid}]: {text}\n")
            self._stderr.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _priority(text: str, stream: str) -> int:
    """Journal priority of a child line from its level word (Envoy `[warning]`, pilot-agent `\\twarn\\t`)."""
    lowered = text.lower()
    for words, priority in ((("critical", "fatal", "panic"), 2), (("error",), 3), (("warn",), 4),
                            (("debug", "trace"), 7)):
        if any(f"[{w}" in lowered or f"\t{w}" in lowered for w in words):
            return priority
    return 6
