"""The iptables-restore input of one family: remove what was found, add the plan, per table.

Pure functions. For each table, one `*table` section holds the removal lines for the Istio state
found on the host, then the plan's lines for that table, then COMMIT, so a clean and an install are
one kernel transaction per table: traffic never sees a moment without rules, nor a doubled rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from istio_vm.iptables.found import Found, Owners, find_in_table
from istio_vm.iptables.names import BUILTIN_CHAINS, TABLES
from istio_vm.iptables.saved import SavedTable, parse_save


class Input(NamedTuple):
    """A restore input and what it does, table by table."""

    text: str  # "" when there is nothing to do
    tables: tuple[str, ...]
    removed: tuple[str, ...]  # removal lines, prefixed with "table: "
    added: tuple[str, ...]  # plan lines, prefixed with "table: "

    @property
    def multi_table(self) -> bool:
        return len(self.tables) > 1


def compose(found: Found, planned: Sequence[tuple[str, Sequence[str]]]) -> Input:
    """The `--noflush` restore input removing `found` and installing `planned` (either may be empty).

    `planned` is one family's plan per table (Plan.tables). Plan tables come in the plan's order; a
    table with only removals follows.
    """
    tables = dict(planned)
    order = [*tables, *(t.name for t in found.tables if t.name not in tables)]
    out: list[str] = []
    removed: list[str] = []
    added: list[str] = []
    for table in order:
        here = found.table(table)
        removal = here.removal_lines() if here is not None else []
        lines = list(tables.get(table, ()))
        if not removal and not lines:
            continue
        out += [f"*{table}", *removal, *lines, "COMMIT"]
        removed += [f"{table}: {line}" for line in removal]
        added += [f"{table}: {line}" for line in lines]
    written = tuple(line[1:] for line in out if line.startswith("*"))
    return Input("\n".join(out) + "\n" if out else "", written, tuple(removed), tuple(added))


def undo_text(now: str, snapshot: str, owners: Owners | None = None) -> str:
    """`--noflush` restore input putting Istio's state back as in `snapshot`, touching nothing else.

    `now` is a save taken after a failed install: per table whose Istio state differs from the
    snapshot's, remove the Istio state found now (our half-written plan) and recreate the snapshot's
    (its ISTIO_* chains with their rules, and its Istio rules of built-in chains, each inserted after
    the rule that preceded it in the snapshot). Rules another program added meanwhile stay where they
    are. "" when the Istio state is as in the snapshot (the failed restore changed nothing).
    """
    parsed_now, parsed_then = parse_save(now), parse_save(snapshot)
    out: list[str] = []
    for name in TABLES:
        empty = SavedTable(name, (), ())
        live, then = parsed_now.get(name, empty), parsed_then.get(name, empty)
        ours_now, ours_then = find_in_table(live, owners), find_in_table(then, owners)
        if ours_now.view() == ours_then.view():
            continue
        lines = ours_now.removal_lines()
        lines += [f"-N {chain}" for chain in ours_then.chains]
        lines += [rule.line for rule in ours_then.chain_rules]
        lines += _reinsert(live, then, ours_now.owned, ours_then.owned)
        out += [f"*{name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def _reinsert(live: SavedTable, then: SavedTable, owned_now: Sequence[object],
              owned_then: Sequence[object]) -> list[str]:
    """`-I CHAIN N spec` for the snapshot's Istio rules of built-in chains, positioned among the rules
    that will remain (the live ones that are not Istio's): after the snapshot rule preceding each."""
    lines: list[str] = []
    removed = {id(rule) for rule in owned_now}
    ours = {id(rule) for rule in owned_then}
    for chain in sorted(BUILTIN_CHAINS):
        remaining = [r.line for r in live.rules if r.chain == chain and id(r) not in removed]
        cursor = 0
        for rule in (r for r in then.rules if r.chain == chain):
            if id(rule) in ours:
                lines.append(f"-I {chain} {cursor + 1} {rule.spec}")
                remaining.insert(cursor, rule.line)
                cursor += 1
            elif rule.line in remaining[cursor:]:
                cursor = remaining.index(rule.line, cursor) + 1
    return lines
