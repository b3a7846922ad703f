"""Running external commands: the narrow `Runner` protocol and its subprocess implementation.

Everything istio-vm does to the kernel's network state goes through `Runner.run(argv, input, timeout)`,
so tests swap in a recording fake and count processes. The real runner passes argv lists to
subprocess (never a shell) and turns a timeout into a failed `Completed`, never a hang.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from istio_vm import loggers

log = loggers.logger(__name__)

TIMED_OUT = 124  # the returncode a timed-out command gets (as timeout(1) reports it)


class Completed(NamedTuple):
    """What one command did."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line for errors and logs: the command, its status and its own stderr."""
        detail = self.stderr.strip() or self.stdout.strip() or "no output"
        return f"{' '.join(self.argv)} exited {self.returncode}: {detail}"


class Runner(Protocol):
    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float) -> Completed:
        """Run argv (stdin from input when given) for at most timeout seconds."""
        ...


class SubprocessRunner:
    """The real runner: one child process per call, argv only, output captured as text."""

    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float) -> Completed:
        args = tuple(argv)
        log.debug("running %s", " ".join(args))
        try:
            done = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed and reaped the child
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return Completed(args, TIMED_OUT, out, f"timed out after {timeout:g}s")
        except OSError as e:  # not installed, not executable
            return Completed(args, 127, "", f"cannot run {args[0]}: {e.strerror}")
        return Completed(args, done.returncode, done.stdout, done.stderr)


class CountingRunner:
    """Wraps a runner and keeps every call, so reports can say how many processes were spawned."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.calls: list[Completed] = []

    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float) -> Completed:
        done = self.inner.run(argv, input=input, timeout=timeout)
        self.calls.append(done)
        return done
