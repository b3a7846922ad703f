"""Errors and exit statuses shared by every command.

A `Problem` is one thing wrong with the configuration, located (file:line or environment) and
named (variable, value). `ConfigError` carries all of them at once, so one run reports everything.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

MAX_PROBLEMS_SHOWN = 20  # problems printed per run; the rest are counted ("... and N more")
MAX_PROBLEM_LINE = 400  # characters of one problem line
MAX_VALUE_SHOWN = 80  # characters of a value inside a line
# What would break "one line per problem" or fool a terminal: C0 and C1 controls, Unicode line breaks.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@enum.unique
class ExitStatus(enum.IntEnum):
    """Process exit statuses of `istio-vm` (also documented in README.md and docs/systemd.md).

    sysexits(3) numbers wherever one fits: `systemctl status` names them (`status=69/UNAVAILABLE`),
    where 2, 3 and 4 would read as LSB's INVALIDARGUMENT, NOTIMPLEMENTED and NOPERMISSION.
    """

    OK = 0
    FAILURE = 1  # a command failed (the tool's own message says why)
    USAGE = 64  # EX_USAGE: bad command line
    CRASH_LOOP = 69  # EX_UNAVAILABLE: the proxy kept exiting (ISTIO_VM_MAX_RESTARTS within ISTIO_VM_RESTART_WINDOW)
    LOCKED = 75  # EX_TEMPFAIL: another `istio-vm start` holds the lock (or a reload is under way): try later
    NOPERM = 77  # EX_NOPERM: cannot drop privileges (not root, or the kernel refused)
    CONFIG = 78  # EX_CONFIG: bad configuration; systemd must not restart (RestartPreventExitStatus=78)


class Problem(NamedTuple):
    """One configuration error, rendered as a single line.

    >>> str(Problem("/etc/c.env:3", "ENVOY_PORT", "0", "not a port (1-65535)"))
    "/etc/c.env:3: ENVOY_PORT='0': not a port (1-65535)"
    """

    where: str  # "FILE:LINE", "environment", "default", "derived" or "--flag"
    variable: str | None
    value: str | None
    message: str

    def __str__(self) -> str:
        subject = ""
        if self.variable is not None:
            subject = self.variable if self.value is None else f"{self.variable}={shown(self.value)}"
            subject += ": "
        return one_line(f"{self.where}: {subject}{self.message}")


def shown(text: str, limit: int = MAX_VALUE_SHOWN) -> str:
    """`text` quoted (repr: control characters escaped), cut to `limit` characters.

    >>> shown("x" * 100, 5)
    "'xxxxx'... (100 characters)"
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def one_line(text: str, limit: int = MAX_PROBLEM_LINE) -> str:
    """`text` as one bounded line: control characters and line breaks escaped, cut after `limit` characters."""
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def capped(problems: Sequence[Problem], limit: int = MAX_PROBLEMS_SHOWN) -> list[str]:
    """The lines of the first `limit` problems, and one that counts the rest."""
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more problems (fix the ones above first)")
    return lines


class IstioVmError(Exception):
    """Base of every error the CLI turns into an exit status and a message."""

    status: ExitStatus = ExitStatus.FAILURE


class LockedError(IstioVmError):
    """Another `istio-vm start` holds the run lock."""

    status = ExitStatus.LOCKED


class PrivilegeError(IstioVmError):
    """The supervisor cannot become the user the proxy runs as (not root, or the kernel refused)."""

    status = ExitStatus.NOPERM


class UntrustedPathError(IstioVmError):
    """Root was asked to use a file or directory another user could change (a configuration error)."""

    status = ExitStatus.CONFIG


class ConfigError(IstioVmError):
    """The configuration is invalid; nothing has been changed on the host."""

    status = ExitStatus.CONFIG

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(capped(self.problems)))


class ApplyError(IstioVmError):
    """Installing or cleaning the capture rules failed; the host was put back as it was.

    `stderr` is the failing tool's own message. `host_as_before` is True when nothing was changed or
    the rollback undid everything; when False, `rollback_errors` says what is left to fix by hand.
    """

    def __init__(self, message: str, *, stderr: str = "", rollback_errors: tuple[str, ...] = ()) -> None:
        self.stderr = stderr
        self.host_as_before = not rollback_errors
        self.rollback_errors = rollback_errors
        text = message
        if rollback_errors:
            text += "\nrollback incomplete: " + "; ".join(rollback_errors)
        super().__init__(text)
