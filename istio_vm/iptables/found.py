"""The Istio state found in an `iptables-save` dump, and the restore lines that remove it.

Pure functions. Clean removes what is *found*, never what today's configuration would have written,
so an edited env file cannot leave rules behind. Found = in tables nat and mangle: every `ISTIO_*`
chain; every built-in-chain rule that jumps to one; and the rules Istio 1.9 wrote straight into
built-in chains (DNS, CONNMARK, kubevirt), recognised by shape in their canonical saved form.
"""

from __future__ import annotations

from typing import NamedTuple

from istio_vm.iptables.names import AGENT_DNS_PORT, BUILTIN_CHAINS, DNS_PORT, PREFIX, TABLES
from istio_vm.iptables.saved import SavedRule, SavedTable, parse_save

_DEFAULT_MASKS = ("--nfmask", "0xffffffff", "--ctmask", "0xffffffff")  # printed by iptables >= 1.4.x


def _options(*pairs: tuple[str, str]) -> frozenset[tuple[bool, str, str]]:
    return frozenset((False, option, value) for option, value in pairs)


def _one_value(rule: SavedRule, option: str) -> str | None:
    values = [value for negated, name, value in rule.options if name == option and not negated]
    return values[0] if len(values) == 1 else None


def _split(text: str) -> frozenset[str]:
    return frozenset(item for item in text.replace(",", " ").split() if item)


def _number(text: str) -> int | None:
    """A mark as iptables prints it (0x539) or as configured (1337)."""
    try:
        return int(text, 0) if text[:2].lower() == "0x" else int(text, 10)
    except ValueError:
        return None


class Owners(NamedTuple):
    """The values that make a rule of one of 1.9's built-in-chain shapes Istio's: the proxy's uids
    and gids (DNS exemptions), the TPROXY marks (CONNMARK) and the kubevirt interfaces, from this
    configuration and from the state file of the last install. A rule of the same shape with other
    values is someone else's (a host that never ran Istio can have `-i eth1 -j RETURN`)."""

    uids: frozenset[str] = frozenset()
    gids: frozenset[str] = frozenset()
    marks: frozenset[int] = frozenset()
    interfaces: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *, uids: str = "", gids: str = "", marks: str = "", interfaces: str = "") -> Owners:
        """From settings' texts (comma lists, as PROXY_UID and KUBE_VIRT_INTERFACES are written)."""
        numbers = {_number(m) for m in _split(marks)}
        return cls(_split(uids), _split(gids), frozenset(n for n in numbers if n is not None), _split(interfaces))

    def __or__(self, other: Owners) -> Owners:
        return Owners(self.uids | other.uids, self.gids | other.gids, self.marks | other.marks,
                      self.interfaces | other.interfaces)

    def to_json(self) -> dict[str, list[str]]:
        return {"uids": sorted(self.uids), "gids": sorted(self.gids), "marks": sorted(map(str, self.marks)),
                "interfaces": sorted(self.interfaces)}


def ownership(rule: SavedRule, owners: Owners | None = None) -> str | None:
    """Why a built-in-chain rule belongs to Istio (a short reason), or None when it does not.

    Shapes are matched exactly (every option, the target and its arguments), so a user's rule that
    merely resembles one (another port, an extra match) is left alone; with `owners`, a 1.9 shape
    counts only with one of its values (None: any value, for a dump of a plan alone).
    """
    if rule.table not in TABLES or rule.chain not in BUILTIN_CHAINS:
        return None
    if rule.target.startswith(PREFIX):
        return f"jump to {rule.target}"
    key = (rule.table, rule.chain)
    if key == ("nat", "OUTPUT"):
        for owner in ("--uid-owner", "--gid-owner"):
            who = _one_value(rule, owner)
            allowed = None if owners is None else owners.uids if owner == "--uid-owner" else owners.gids
            if (who is not None and (allowed is None or who in allowed) and rule.target == "RETURN"
                    and not rule.target_args and rule.options
                    == _options(("-p", "udp"), ("--dport", DNS_PORT), ("-m", "owner"), (owner, who))):
                return f"1.9 DNS exemption ({owner} {who})"
        server = _one_value(rule, "-d")
        if (server is not None and server.endswith("/32") and rule.target == "REDIRECT"
                and rule.target_args in (("--to-ports", AGENT_DNS_PORT), ("--to-port", AGENT_DNS_PORT))
                and rule.options == _options(("-d", server), ("-p", "udp"), ("--dport", DNS_PORT))):
            return f"1.9 DNS capture ({server})"
    if key in (("mangle", "PREROUTING"), ("mangle", "OUTPUT")):
        module, action = ("mark", "--save-mark") if rule.chain == "PREROUTING" else ("connmark", "--restore-mark")
        mark = _one_value(rule, "--mark")
        if (mark is not None and (owners is None or _number(mark) in owners.marks) and rule.target == "CONNMARK"
                and rule.target_args in ((action,), (action, *_DEFAULT_MASKS))
                and rule.options == _options(("-p", "tcp"), ("-m", module), ("--mark", mark))):
            return f"1.9 TPROXY CONNMARK {action[2:]}"
    if key == ("nat", "PREROUTING"):
        interface = _one_value(rule, "-i")
        if (interface is not None and (owners is None or interface in owners.interfaces)
                and rule.target == "RETURN" and not rule.target_args and
                rule.options == _options(("-i", interface))):
            return f"1.9 kubevirt interface {interface}"
    return None


class FoundTable(NamedTuple):
    """Istio's state in one table."""

    name: str
    chains: tuple[str, ...]  # ISTIO_* chains, in saved order
    owned: tuple[SavedRule, ...]  # Istio's rules in built-in chains, in saved order
    chain_rules: tuple[SavedRule, ...]  # the rules inside the ISTIO_* chains, in saved order

    @property
    def empty(self) -> bool:
        return not self.chains and not self.owned

    def removal_lines(self) -> list[str]:
        """Restore lines removing this state: the built-in rules by exact spec, then flush and delete.

        `-D CHAIN <saved spec>` rather than `-D CHAIN <number>`: a number is only right until someone
        else inserts a rule between our save and our restore; the spec deletes the same rule anyway.
        Duplicates (1.9 piled up DNS rules) give one `-D` each. Every ISTIO_* chain is flushed before
        any is deleted, because they jump to each other and `-X` refuses a referenced chain.
        """
        lines = [f"-D {rule.chain} {rule.spec}" for rule in self.owned]
        lines += [f"-F {chain}" for chain in self.chains]
        lines += [f"-X {chain}" for chain in self.chains]
        return lines

    def view(self) -> list[str]:
        """Istio's state in canonical saved form, for comparisons: chains, built-in rules, chain rules."""
        return [f"-N {chain}" for chain in self.chains] + [r.line for r in self.owned + self.chain_rules]


class Found(NamedTuple):
    tables: tuple[FoundTable, ...]  # nat then mangle, only those with something in them

    @property
    def empty(self) -> bool:
        return not self.tables

    def table(self, name: str) -> FoundTable | None:
        return next((t for t in self.tables if t.name == name), None)

    def view(self) -> list[str]:
        lines: list[str] = []
        for table in self.tables:
            lines += [f"*{table.name}", *table.view()]
        return lines


def find_in_table(table: SavedTable, owners: Owners | None = None) -> FoundTable:
    chains = tuple(name for name, _ in table.chains if name.startswith(PREFIX))
    owned = tuple(rule for rule in table.rules if ownership(rule, owners) is not None)
    inside = tuple(rule for rule in table.rules if rule.chain.startswith(PREFIX))
    return FoundTable(table.name, chains, owned, inside)


def find(save_text: str, owners: Owners | None = None) -> Found:
    """Istio's state in an iptables-save dump (of one family); `owners` as for ownership()."""
    saved = parse_save(save_text)
    found = [find_in_table(saved[name], owners) for name in TABLES if name in saved]
    return Found(tuple(t for t in found if not t.empty))


def has_rules(save_text: str) -> bool:
    """True when the dump holds any rule or user chain, in any table (empty built-in tables do not count)."""
    return any(table.has_content() for table in parse_save(save_text).values())


def everything(save_text: str) -> Found:
    """All rules and user chains of nat and mangle, as if Istio owned them (for a dump of a plan alone)."""
    tables = []
    saved = parse_save(save_text)
    for name in TABLES:
        table = saved.get(name)
        if table is None:
            continue
        chains = tuple(c for c, _ in table.chains if c not in BUILTIN_CHAINS)
        found = FoundTable(name, chains, tuple(r for r in table.rules if r.chain in BUILTIN_CHAINS),
                           tuple(r for r in table.rules if r.chain not in BUILTIN_CHAINS))
        if not found.empty:
            tables.append(found)
    return Found(tuple(tables))
