"""`ip` commands (TPROXY policy routing, the IPv6 `::6/128`) as `ip -batch` input, and their undo.

Pure functions. All commands go to one `ip -force -batch -` process: `-force` runs every line and
prints `Command failed -:N` for each one that failed, which tells exactly what was applied, so a
rollback undoes only that. Batch lines take no global options (`-f inet` is "Object -f unknown"),
so the family option is dropped where the command implies it, and commands are grouped otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

OBJECTS = {"rule": "rule", "route": "route", "addr": "address", "address": "address"}
VERBS = {"add": "add", "del": "del", "delete": "del"}
FAMILY_OPTIONS = {"inet": "inet", "inet6": "inet6", "-4": "inet", "-6": "inet6"}
_FAILED = re.compile(r"^Command failed -:(\d+)\s*$", re.MULTILINE)


class IpCommand(NamedTuple):
    argv: tuple[str, ...]  # as given, e.g. ("ip", "-f", "inet", "rule", "add", "fwmark", "1337", ...)
    family: str | None  # the -f/-4/-6 option still needed on the batch process (None: implied)
    words: tuple[str, ...]  # the batch line: object, verb, arguments

    @property
    def verb(self) -> str:
        return VERBS[self.words[1]]

    def line(self) -> str:
        return " ".join(self.words)

    def inverse(self) -> IpCommand:
        """The command undoing this one: add <-> del, same arguments."""
        other = "del" if self.verb == "add" else "add"
        words = (self.words[0], other, *self.words[2:])
        argv = self.argv[: len(self.argv) - len(self.words)] + words
        return IpCommand(argv, self.family, words)


def parse_command(argv: Sequence[str]) -> IpCommand:
    """Check one `ip` argv (rule/route/address add or del) and find which family option it needs."""
    args = tuple(argv)
    if not args or args[0] != "ip":
        raise ValueError(f"not an ip command: {args!r}")
    family: str | None = None
    i = 1
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("-f", "-family") and i + 1 < len(args) and args[i + 1] in FAMILY_OPTIONS:
            family, i = FAMILY_OPTIONS[args[i + 1]], i + 2
        elif args[i] in ("-4", "-6"):
            family, i = FAMILY_OPTIONS[args[i]], i + 1
        else:
            raise ValueError(f"unsupported ip option {args[i]!r} in {' '.join(args)}")
    words = args[i:]
    if len(words) < 3 or words[0] not in OBJECTS or words[1] not in VERBS:
        raise ValueError(f"only `ip rule|route|address add|del ...` is supported, not {' '.join(args)}")
    if any(not w or any(c.isspace() or c in "\"'\\#" for c in w) for w in words):
        raise ValueError(f"argument not representable in ip -batch: {' '.join(args)}")
    return IpCommand(args, _needed_family(family, words), words)


def _needed_family(family: str | None, words: Sequence[str]) -> str | None:
    if family is None:
        return None
    if OBJECTS[words[0]] == "address":
        prefix = words[2]  # `addr add PREFIX dev X`: the address says its family
        implied = "inet6" if ":" in prefix else "inet" if "." in prefix else None
        return None if implied == family else family
    # `ip rule` and `ip route` default to AF_INET when no family is given (iproute2 iprule/iproute.c).
    return None if family == "inet" else family


class Batch(NamedTuple):
    family: str | None
    commands: tuple[IpCommand, ...]

    def argv(self) -> tuple[str, ...]:
        option = () if self.family is None else ("-f", self.family)
        return ("ip", *option, "-force", "-batch", "-")

    def text(self) -> str:
        return "".join(c.line() + "\n" for c in self.commands)


def batches(commands: Sequence[IpCommand]) -> list[Batch]:
    """Group commands by the family option they still need, in order of first appearance (usually one)."""
    groups: dict[str | None, list[IpCommand]] = {}
    for command in commands:
        groups.setdefault(command.family, []).append(command)
    return [Batch(family, tuple(group)) for family, group in groups.items()]


def failed_lines(stderr: str) -> set[int]:
    """1-based batch line numbers that ip reported as failed (`Command failed -:N`)."""
    return {int(n) for n in _FAILED.findall(stderr)}


def install_commands(recorded: Sequence[IpCommand], planned: Sequence[IpCommand]) -> list[IpCommand]:
    """The batch of an install: delete what the last install recorded, then delete-and-add the plan.

    Deleting first is what keeps reruns at one copy: `ip rule add` happily adds a duplicate, and
    `ip route add`/`ip addr add` fail with "File exists". A plan command not recorded (e.g. left by
    Istio 1.9) is deleted too before it is added. Failed deletions are expected and ignored.
    """
    deletes: list[IpCommand] = []
    for command in [*reversed(recorded), *planned]:
        undo = command.inverse() if command.verb == "add" else command
        if undo.words not in {d.words for d in deletes}:
            deletes.append(undo)
    return deletes + list(planned)
