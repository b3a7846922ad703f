"""The proxy's output, line by line: to the journal, to stderr, or to 1.9's istio.log / istio.err.log.

Each line is tagged with its epoch, pid and stream; in the journal it gets a priority read from its
level word. The files are appended (1.9 truncated them at every start) and reopened on SIGUSR1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO


class ProxyOutput:
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
