"""Where istio-vm's own log records go: the journal with structured fields under systemd, readable
lines on stderr otherwise.

The proxy's own output is relayed by service/proxy_output.py (journal, stderr, or 1.9's log files).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

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
        from systemd.journal import JournalHandler

        from istio_vm.journal import journal_socket  # libsystemd's send blocks while journald does not read

        handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER, sender_function=journal_sender or journal_socket().send)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter())
    root.addHandler(handler)
    root.setLevel(level)
