"""Rules as istio-iptables 1.9's builder records them, and the texts it renders from them.

`Builder` mirrors Istio's IptablesBuilderImpl (AppendRuleV4, InsertRuleV4, ...); `Plan` is its
frozen result: the rules per family plus the `ip` commands, rendered as iptables-restore input,
as 1.9's command lines or as JSON. Pure: nothing here touches the host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ALWAYS = "(always)"  # the `setting` of a rule that no variable switches on or shapes
BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})
TABLE_ORDER = ("nat", "mangle")  # 1.9 emitted tables in Go's random map order; istio-vm fixes it
COMMAND = {4: "iptables", 6: "ip6tables"}

FORMATS = ("restore", "commands", "json", "dot")  # what `istio-vm iptables plan --format` prints

@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: `params` exactly as Istio stores them, `("-A", chain, ...)` or `("-I", chain, "1", ...)`.

    `setting` names the variable that produced the rule: the one that switches it on, or for a rule
    that is always present, the one whose value it carries (ENVOY_PORT for ISTIO_REDIRECT's
    target); ALWAYS when no variable shapes it (e.g. `-A OUTPUT -p tcp -j ISTIO_OUTPUT`).
    """

    family: int
    table: str
    chain: str
    params: tuple[str, ...]
    setting: str = ALWAYS

    @property
    def argv(self) -> tuple[str, ...]:
        """The command 1.9 ran for this rule in command mode."""
        return (COMMAND[self.family], "-t", self.table, *self.params)

    @property
    def inserted(self) -> bool:
        return self.params[:1] == ("-I",)

    @property
    def target(self) -> str:
        """What `-j` names (a chain or a target such as REDIRECT), or "" without a jump."""
        params = self.params
        for i, param in enumerate(params[:-1]):
            if param == "-j":
                return params[i + 1]
        return ""


def ordered_tables(rules: tuple[Rule, ...]) -> list[str]:
    """The tables of these rules: nat, then mangle, then any other in order of first appearance."""
    return sorted(dict.fromkeys(r.table for r in rules),
                  key=lambda t: TABLE_ORDER.index(t) if t in TABLE_ORDER else len(TABLE_ORDER))


def _new_chains(rules: tuple[Rule, ...]) -> list[Rule]:
    """The first rule of each non-built-in (table, chain) pair: what needs a `-N`, in order."""
    seen: set[tuple[str, str]] = set()
    first = []
    for rule in rules:
        key = (rule.table, rule.chain)
        if key not in seen and rule.chain not in BUILTIN_CHAINS:
            seen.add(key)
            first.append(rule)
    return first


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything istio-iptables 1.9 would do: IPv4 and IPv6 rules, and the `ip` commands it ran."""

    v4: tuple[Rule, ...] = ()
    v6: tuple[Rule, ...] = ()
    ip_commands: tuple[tuple[str, ...], ...] = field(default=())

    def rules(self, family: int) -> tuple[Rule, ...]:
        if family not in COMMAND:
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        return self.v4 if family == 4 else self.v6

    def argv(self, family: int) -> list[tuple[str, ...]]:
        """BuildV4()/BuildV6(): every `-N` first (first appearance, tables mixed), then every rule."""
        rules = self.rules(family)
        chains = [(COMMAND[family], "-t", r.table, "-N", r.chain) for r in _new_chains(rules)]
        return chains + [r.argv for r in rules]

    def restore(self, family: int) -> str:
        """BuildV4Restore()/BuildV6Restore(): the iptables-restore input, tables in a fixed order."""
        rules = self.rules(family)
        new = _new_chains(rules)
        lines = []
        for table in ordered_tables(rules):
            lines.append(f"* {table}")
            lines += [f"-N {r.chain}" for r in new if r.table == table]
            lines += [" ".join(r.params) for r in rules if r.table == table]
            lines.append("COMMIT")
        return "".join(line + "\n" for line in lines)

    def commands(self) -> list[str]:
        """1.9's command mode, as it printed it: IPv4, then IPv6, then the `ip` commands."""
        return [" ".join(argv) for argv in (*self.argv(4), *self.argv(6), *self.ip_commands)]

    def to_json(self) -> str:
        data = {
            "rules": [{"family": r.family, "table": r.table, "chain": r.chain, "argv": list(r.params),
                       "setting": r.setting} for r in (*self.v4, *self.v6)],
            "ip_commands": [list(argv) for argv in self.ip_commands],
        }
        return json.dumps(data, indent=2) + "\n"


class Builder:
    """Istio's IptablesBuilderImpl: two ordered rule lists (and the `ip` commands run on the way)."""

    def __init__(self) -> None:
        self._rules: dict[int, list[Rule]] = {4: [], 6: []}
        self._ip_commands: list[tuple[str, ...]] = []

    def append(self, family: int, chain: str, table: str, *params: str, setting: str = ALWAYS) -> None:
        self._rules[family].append(Rule(family, table, chain, ("-A", chain, *params), setting))

    def insert(self, family: int, chain: str, table: str, position: int, *params: str,
               setting: str = ALWAYS) -> None:
        self._rules[family].append(Rule(family, table, chain, ("-I", chain, str(position), *params), setting))

    def append_v4(self, chain: str, table: str, *params: str, setting: str = ALWAYS) -> None:
        self.append(4, chain, table, *params, setting=setting)

    def append_v6(self, chain: str, table: str, *params: str, setting: str = ALWAYS) -> None:
        self.append(6, chain, table, *params, setting=setting)

    def insert_v4(self, chain: str, table: str, position: int, *params: str, setting: str = ALWAYS) -> None:
        self.insert(4, chain, table, position, *params, setting=setting)

    def insert_v6(self, chain: str, table: str, position: int, *params: str, setting: str = ALWAYS) -> None:
        self.insert(6, chain, table, position, *params, setting=setting)

    def run(self, *argv: str) -> None:
        """Record an `ip` command that 1.9 ran on the spot, before any rule was applied."""
        self._ip_commands.append(argv)

    def plan(self) -> Plan:
        return Plan(tuple(self._rules[4]), tuple(self._rules[6]), tuple(self._ip_commands))
