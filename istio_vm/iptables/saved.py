"""Reading iptables texts: `iptables-save` output and `iptables-restore` input, as data.

Pure functions. `parse_save` turns a save dump into tables, chains and rules; every rule keeps its
exact saved text (to delete it with `-D CHAIN <spec>`) and a normalised form (options as a set,
target and target arguments) to recognise it by shape whatever order a given iptables prints in.
`sections` splits a restore text (Istio 1.9's `* nat` ... `COMMIT` format) into table sections.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

# Long option names iptables accepts for the short ones it prints.
_ALIASES = {
    "--protocol": "-p", "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d",
    "--in-interface": "-i", "--out-interface": "-o", "--match": "-m", "--jump": "-j", "--goto": "-g",
    "--destination-port": "--dport", "--source-port": "--sport",
}


class TextError(ValueError):
    """A restore or save text that cannot be read; the message names the line."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One `-A CHAIN spec` line of a save dump."""

    table: str
    chain: str
    spec: str  # everything after "-A CHAIN ", exactly as saved
    options: frozenset[tuple[bool, str, str]]  # (negated, option, value): "-p tcp" -> (False, "-p", "tcp")
    target: str  # the -j/-g target, "" when none
    target_args: tuple[str, ...]

    @property
    def line(self) -> str:
        return f"-A {self.chain} {self.spec}" if self.spec else f"-A {self.chain}"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    chains: tuple[tuple[str, str], ...]  # (chain, policy) in saved order; user chains have policy "-"
    rules: tuple[Rule, ...]  # in saved order: chain by chain, each chain's rules in kernel order

    def has_content(self) -> bool:
        """True when the table holds a rule or a user chain (an empty built-in table does not count)."""
        return bool(self.rules) or any(name not in BUILTIN_CHAINS for name, _ in self.chains)


def parse_rule(table: str, chain: str, spec: str) -> Rule:
    """Normalise a rule spec: option order, long names and implicit `-m tcp`/`-m udp` do not matter."""
    try:
        tokens = shlex.split(spec)
    except ValueError:  # unbalanced quotes in a comment: fall back to words (shapes will not match)
        tokens = spec.split()
    options: set[tuple[bool, str, str]] = set()
    target = ""
    target_args: tuple[str, ...] = ()
    negated, i = False, 0
    while i < len(tokens):
        token = _ALIASES.get(tokens[i], tokens[i])
        if token == "!":
            negated, i = True, i + 1
            continue
        if token in ("-j", "-g"):
            target = tokens[i + 1] if i + 1 < len(tokens) else ""
            target_args = tuple(tokens[i + 2:])
            break
        j = i + 1
        while j < len(tokens) and tokens[j] != "!" and not _is_option(tokens[j]):
            j += 1
        options.add((negated, token, " ".join(tokens[i + 1:j])))
        negated, i = False, j
    for proto in ("tcp", "udp"):  # `-p tcp --dport` implies `-m tcp`; iptables prints it, 1.9 did not
        if (False, "-p", proto) in options:
            options.discard((False, "-m", proto))
    return Rule(table, chain, spec, frozenset(options), target, target_args)


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not token[1:].replace(".", "").isdigit()


def parse_save(text: str) -> dict[str, Table]:
    """Tables of an iptables-save dump, in saved order (comments and counters ignored)."""
    tables: dict[str, Table] = {}
    name: str | None = None
    chains: list[tuple[str, str]] = []
    rules: list[Rule] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, rules = line[1:].strip(), [], []
        elif name is None:
            raise TextError(f"line {number}: {line!r} outside a table")
        elif line == "COMMIT":
            tables[name] = Table(name, tuple(chains), tuple(rules))
            name = None
        elif line.startswith(":"):
            chain, policy = [*line[1:].split(), "-"][:2]
            chains.append((chain, policy))
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            rules.append(parse_rule(name, chain, rest[0] if rest else ""))
        else:
            raise TextError(f"line {number}: unexpected {line!r} in a save dump")
    if name is not None:
        raise TextError(f"table {name}: no COMMIT")
    return tables


def table_text(text: str, table: str) -> str | None:
    """The `*table` ... `COMMIT` section of a save dump as it was written (comments dropped), or None."""
    out: list[str] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line[1:].strip() == table
        if inside and line and not line.startswith("#"):
            out.append(line)
            if line == "COMMIT":
                return "\n".join(out) + "\n"
    return None


@dataclass(frozen=True, slots=True)
class Section:
    """One table of a restore text: its name and its lines between the `*` line and COMMIT."""

    table: str
    lines: tuple[str, ...]


def sections(text: str) -> list[Section]:
    """Split an iptables-restore text (`* nat` / `-N` / `-A` / `-I` / COMMIT) into its table sections."""
    found: list[Section] = []
    table: str | None = None
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if table is not None:
                raise TextError(f"line {number}: table {line[1:].strip()} starts before {table}'s COMMIT")
            table, lines = line[1:].strip(), []
            if not table:
                raise TextError(f"line {number}: table name missing")
        elif table is None:
            raise TextError(f"line {number}: {line!r} outside a table")
        elif line == "COMMIT":
            if any(s.table == table for s in found):
                raise TextError(f"line {number}: table {table} appears twice")
            found.append(Section(table, tuple(lines)))
            table = None
        else:
            lines.append(line)
    if table is not None:
        raise TextError(f"table {table}: no COMMIT")
    return found
