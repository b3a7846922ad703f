"""Reading iptables texts: `iptables-save` output and `iptables-restore` input, as data.

Pure functions. `parse_save` turns a save dump into tables, chains and rules; every rule keeps its
exact saved text (to delete it with `-D CHAIN <spec>`) and a normalised form (options as a set,
target and target arguments) to recognise it by shape whatever order a given iptables prints in.
`table_sections` walks the `*table` ... COMMIT structure that both texts share.
"""

from __future__ import annotations

import shlex
from functools import lru_cache
from typing import NamedTuple

from istio_vm.iptables.names import BUILTIN_CHAINS

# Long option names iptables accepts for the short ones it prints.
_ALIASES = {
    "--protocol": "-p", "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d",
    "--in-interface": "-i", "--out-interface": "-o", "--match": "-m", "--jump": "-j", "--goto": "-g",
    "--destination-port": "--dport", "--source-port": "--sport",
}


class TextError(ValueError):
    """A restore or save text that cannot be read; the message names the line."""


class SavedRule(NamedTuple):
    """One `-A CHAIN spec` line of a save dump, and its normalised form.

    The normalised form (options, target, target_args) is worked out when first asked for: most rules
    of a large dump sit in ISTIO_* chains, which clean and verify handle by their text alone.
    """

    table: str
    chain: str
    spec: str  # everything after "-A CHAIN ", exactly as saved

    @property
    def _shape(self) -> tuple[frozenset[tuple[bool, str, str]], str, tuple[str, ...]]:
        return _normalise(self.spec)  # cached by spec: a rule asked for options, then target, parses once

    @property
    def options(self) -> frozenset[tuple[bool, str, str]]:
        """(negated, option, value): "-p tcp" -> (False, "-p", "tcp")."""
        return self._shape[0]

    @property
    def target(self) -> str:
        """The -j/-g target, "" when none."""
        return self._shape[1]

    @property
    def target_args(self) -> tuple[str, ...]:
        return self._shape[2]

    @property
    def line(self) -> str:
        return f"-A {self.chain} {self.spec}" if self.spec else f"-A {self.chain}"


class SavedTable(NamedTuple):
    name: str
    chains: tuple[tuple[str, str], ...]  # (chain, policy) in saved order; user chains have policy "-"
    rules: tuple[SavedRule, ...]  # in saved order: chain by chain, each chain's rules in kernel order

    def has_content(self) -> bool:
        """True when the table holds a rule or a user chain (an empty built-in table does not count)."""
        return bool(self.rules) or any(name not in BUILTIN_CHAINS for name, _ in self.chains)


def parse_rule(table: str, chain: str, spec: str) -> SavedRule:
    """A rule of a save dump; its normalised form ignores option order, long names and implicit
    `-m tcp`/`-m udp`."""
    return SavedRule(table, chain, spec)


@lru_cache(maxsize=16384)  # bounded: a supervisor parses dumps for as long as it runs
def _normalise(spec: str) -> tuple[frozenset[tuple[bool, str, str]], str, tuple[str, ...]]:
    tokens = _words(spec)
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
    return frozenset(options), target, target_args


def _words(spec: str) -> list[str]:
    """The spec's words as the shell would split them (iptables-save quotes comments and such).

    Nearly every saved rule needs no quoting: printable ASCII without quotes or backslashes, where
    shlex.split is exactly str.split (spaces are the only whitespace, nothing is special), at a
    fraction of the cost; anything else goes through shlex.
    """
    if spec.isascii() and spec.isprintable() and '"' not in spec and "'" not in spec and "\\" not in spec:
        return spec.split()
    try:
        return shlex.split(spec)
    except ValueError:  # unbalanced quotes in a comment: fall back to words (shapes will not match)
        return spec.split()


def _is_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not token[1:].replace(".", "").isdigit()


def table_sections(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """Split a save dump or restore text into its `*table` ... COMMIT sections, in order.

    Each section is (table, [(line number, line)]) with the lines between the two, stripped, without
    blank and comment lines. Raises TextError naming the line for anything outside that shape.
    """
    found: list[tuple[str, list[tuple[int, str]]]] = []
    table: str | None = None
    lines: list[tuple[int, str]] = []
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
            if any(name == table for name, _ in found):
                raise TextError(f"line {number}: table {table} appears twice")
            found.append((table, lines))
            table = None
        else:
            lines.append((number, line))
    if table is not None:
        raise TextError(f"table {table}: no COMMIT")
    return found


def parse_save(text: str) -> dict[str, SavedTable]:
    """Tables of an iptables-save dump, in saved order (comments and counters ignored).

    A dump is parsed once however many readers it has (backend detection, the found state, verify):
    the tables of the last few texts are kept (they are immutable; the dict is a fresh copy).
    """
    return dict(_parsed(text))


@lru_cache(maxsize=8)
def _parsed(text: str) -> tuple[tuple[str, SavedTable], ...]:
    tables: dict[str, SavedTable] = {}
    for name, lines in table_sections(text):
        chains: list[tuple[str, str]] = []
        rules: list[SavedRule] = []
        for number, line in lines:
            if line.startswith(":"):
                chain, policy = [*line[1:].split(), "-"][:2]
                chains.append((chain, policy))
            elif line.startswith("-A "):
                _, chain, *rest = line.split(" ", 2)
                rules.append(parse_rule(name, chain, rest[0] if rest else ""))
            else:
                raise TextError(f"line {number}: unexpected {line!r} in a save dump")
        tables[name] = SavedTable(name, tuple(chains), tuple(rules))
    return tuple(tables.items())


def table_text(text: str, table: str) -> str | None:
    """The `*table` ... `COMMIT` section of a save dump (comments dropped), or None when it has none."""
    for name, lines in table_sections(text):
        if name == table:
            return "".join(f"{line}\n" for line in (f"*{name}", *(line for _, line in lines), "COMMIT"))
    return None
