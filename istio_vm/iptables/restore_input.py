"""The iptables-restore input of one family: remove what was found, add the plan, per table.

Pure functions. For each table, one `*table` section holds the removal lines for the Istio state
found on the host, then the plan's lines for that table, then COMMIT, so a clean and an install are
one kernel transaction per table: traffic never sees a moment without rules, nor a doubled rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from istio_vm.iptables.found import Found
from istio_vm.iptables.saved import table_text


@dataclass(frozen=True, slots=True)
class Input:
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


def rollback_text(snapshot: str, tables: Iterable[str]) -> str:
    """Restore input (for a run *without* --noflush) that puts `tables` back exactly as in `snapshot`.

    Without --noflush, iptables-restore replaces each named table whole, so the section copied from
    the snapshot's save dump restores it exactly. A table absent from the snapshot gets an empty
    section: iptables-nft then deletes the table, iptables-legacy leaves it empty.
    """
    parts = []
    for table in tables:
        saved = table_text(snapshot, table)
        parts.append(saved if saved is not None else f"*{table}\nCOMMIT\n")
    return "".join(parts)
