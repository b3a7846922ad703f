"""The rule plan as data: rules as istio-iptables 1.9's builder records them, and the texts rendered from them.

`Builder` mirrors Istio's IptablesBuilderImpl (AppendRuleV4, InsertRuleV4, ...); `Plan` is its
frozen result: the rules per family plus the `ip` commands, rendered as iptables-restore input,
as 1.9's command lines or as JSON. Pure: nothing here touches the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from istio_vm.iptables import ip_batch
from istio_vm.iptables.ip_batch import IpCommand
from istio_vm.iptables.names import BUILTIN_CHAINS, COMMAND, FAMILIES, TABLES
from istio_vm.iptables.saved import TextError, table_sections

ALWAYS = "(always)"  # the `setting` of a rule that no variable switches on or shapes


class Rule(NamedTuple):
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
    def spec(self) -> tuple[str, ...]:
        """The parameters after the chain operation (`-A CHAIN` or `-I CHAIN N`): match, then target."""
        return self.params[3 if self.inserted else 2:]

    @property
    def match(self) -> tuple[str, ...]:
        """What selects the packets: the spec up to `-j`."""
        spec = self.spec
        return spec[: spec.index("-j")] if "-j" in spec else spec

    @property
    def target(self) -> str:
        """What `-j` names (a chain or a target such as REDIRECT), or "" without a jump."""
        rest = self.spec[len(self.match):]
        return rest[1] if len(rest) > 1 else ""

    @property
    def target_args(self) -> tuple[str, ...]:
        """The target's options, e.g. ("--to-ports", "15001")."""
        return self.spec[len(self.match) + 2:]


def ordered_tables(rules: Iterable[Rule]) -> list[str]:
    """The tables of these rules: nat, then mangle, then any other in order of first appearance."""
    return sorted(dict.fromkeys(r.table for r in rules),
                  key=lambda t: TABLES.index(t) if t in TABLES else len(TABLES))


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


class Plan(NamedTuple):
    """Everything istio-iptables 1.9 would do: IPv4 and IPv6 rules, and the `ip` commands it ran."""

    v4: tuple[Rule, ...] = ()
    v6: tuple[Rule, ...] = ()
    ip_commands: tuple[IpCommand, ...] = ()

    @classmethod
    def from_restore(cls, v4: str, v6: str = "", ip_commands: Sequence[Sequence[str]] = ()) -> Plan:
        """A plan read back from restore texts in Istio's format and `ip` argv lists (e.g. test data).

        Raises TextError (a ValueError) for a text that is not `* table`, `-N`, `-A`/`-I` lines and
        COMMIT, and ValueError for an `ip` command that is not `ip rule|route|address add|del`.
        """
        rules: dict[int, list[Rule]] = {4: [], 6: []}
        for family, text in ((4, v4), (6, v6)):
            for table, lines in table_sections(text):
                for number, line in lines:
                    words = tuple(line.split())
                    if words[0] == "-N" and len(words) == 2:
                        continue  # chains are implied by their rules
                    if words[0] not in ("-A", "-I") or len(words) < 2:
                        raise TextError(f"line {number}: {line!r} is not -N, -A or -I")
                    rules[family].append(Rule(family, table, words[1], words))
        return cls(tuple(rules[4]), tuple(rules[6]), tuple(ip_batch.parse_command(argv) for argv in ip_commands))

    def rules(self, family: int) -> tuple[Rule, ...]:
        if family not in FAMILIES:
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        return self.v4 if family == 4 else self.v6

    def tables(self, family: int) -> list[tuple[str, tuple[str, ...]]]:
        """Per table (nat, then mangle), the restore lines between `*table` and COMMIT: `-N`s, then rules."""
        rules = self.rules(family)
        new = _new_chains(rules)
        return [(table, (*(f"-N {r.chain}" for r in new if r.table == table),
                         *(" ".join(r.params) for r in rules if r.table == table)))
                for table in ordered_tables(rules)]

    def argv(self, family: int) -> list[tuple[str, ...]]:
        """BuildV4()/BuildV6(): every `-N` first (first appearance, tables mixed), then every rule."""
        rules = self.rules(family)
        chains = [(COMMAND[family], "-t", r.table, "-N", r.chain) for r in _new_chains(rules)]
        return chains + [r.argv for r in rules]

    def restore(self, family: int) -> str:
        """BuildV4Restore()/BuildV6Restore(): the iptables-restore input, tables in a fixed order."""
        return "".join(f"* {table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
                       for table, lines in self.tables(family))

    def commands(self) -> list[str]:
        """1.9's command mode, as it printed it: IPv4, then IPv6, then the `ip` commands."""
        ip_argvs = [command.argv for command in self.ip_commands]
        return [" ".join(argv) for argv in (*self.argv(4), *self.argv(6), *ip_argvs)]

    def to_json(self) -> str:
        import json  # only `plan --format json` needs it

        data = {
            "rules": [{"family": r.family, "table": r.table, "chain": r.chain, "argv": list(r.params),
                       "setting": r.setting} for r in (*self.v4, *self.v6)],
            "ip_commands": [list(command.argv) for command in self.ip_commands],
        }
        return json.dumps(data, indent=2) + "\n"


class Builder:
    """Istio's IptablesBuilderImpl: two ordered rule lists (and the `ip` commands run on the way)."""

    def __init__(self) -> None:
        self._rules: dict[int, list[Rule]] = {4: [], 6: []}
        self._ip_commands: list[IpCommand] = []

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
        self._ip_commands.append(ip_batch.parse_command(argv))

    def plan(self) -> Plan:
        return Plan(tuple(self._rules[4]), tuple(self._rules[6]), tuple(self._ip_commands))
