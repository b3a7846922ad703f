"""Where istio-vm's own log records go: the journal with structured fields under systemd, readable
lines on stderr otherwise; installed at the first record (loggers.py imports logging only then).

The proxy's own output is relayed by service/proxy_output.py (journal, stderr, or 1.9's log files).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from istio_vm import loggers

if TYPE_CHECKING:
    from collections.abc import Callable

IDENTIFIER = "istio-vm"


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


def configure(target: str, *, level: int = loggers.INFO, journal_sender: Callable[..., Any] | None = None) -> None:
    """Send the daemon's own log records to the journal (target "journal") or to stderr, from the first
    record on: logging is imported then (loggers.py), at once if something logged already."""
    loggers.before_first_record(lambda: _install_handler(target, level, journal_sender))


def _install_handler(target: str, level: int, journal_sender: Callable[..., Any] | None) -> None:
    import logging

    class StderrFormatter(logging.Formatter):
        """`istio-vm: message [epoch=1 pid=123]`: readable, with the structured fields at the end."""

        def format(self, record: logging.LogRecord) -> str:
            text = f"{IDENTIFIER}: {record.getMessage()}"
            if record.levelno >= logging.WARNING:
                text = f"{IDENTIFIER}: {record.levelname.lower()}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            return text

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if target == "journal":
        from systemd.journal import JournalHandler

        from istio_vm.journal import journal_socket  # libsystemd's send blocks while journald does not read

        handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER, sender_function=journal_sender or journal_socket().send)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    root.addHandler(handler)
    root.setLevel(level)
