"""`iptables trace`: follow one connection through the rules the way the kernel does, and say where it lands.

A Flow (inbound from the network, or outbound from a local process) walks mangle then nat at the hook
it meets (PREROUTING, or OUTPUT and then PREROUTING again on `lo`), through jumps, RETURN and the
policies of built-in chains, over rules as saved.py parses them: the plan and the live host share
one code path. A match or target not modelled gives the verdict `unknown`, naming it; never a guess.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from istio_vm.iptables.explain import describe
from istio_vm.iptables.names import BUILTIN_CHAINS, MANGLE, NAT, PREFIX
from istio_vm.iptables.rules import Plan, Rule
from istio_vm.iptables.saved import SavedRule, SavedTable, parse_rule, parse_save

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DIRECTIONS = ("inbound", "outbound")
PROTOCOLS = ("tcp", "udp")
VERDICTS = ("redirect", "tproxy", "not-captured", "dropped", "rejected", "unknown")
NOT_OURS = "not installed by istio-vm"
ISTIO_NOT_PLANNED = "an Istio rule, but not one of this configuration's plan"
LISTENERS = {15001: "the proxy's outbound listener", 15006: "the proxy's inbound listener",
             15053: "the agent's DNS proxy"}
DEFAULT_SRC = {4: "203.0.113.1", 6: "2001:db8::1"}  # "an address outside this host" (documentation ranges)
DEFAULT_SPORT = 40000
_PROTO_NUMBERS = {"6": "tcp", "17": "udp"}
_MAX_DEPTH = 64  # iptables refuses loops; a deeper nesting than this is not a rule set we model


class FlowError(ValueError):
    """A flow that cannot be traced: the message names the word at fault."""


@dataclass(frozen=True, slots=True)
class Flow:
    direction: str  # inbound | outbound
    protocol: str  # tcp | udp
    dst: str
    dport: int
    src: str | None = None  # None: an address outside this host (inbound), the kernel's choice (outbound)
    sport: int | None = None
    uid: int = 0
    gid: int = 0
    iface: str | None = None  # inbound: the input interface; outbound: the output interface

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.dst).version

    def words(self) -> str:
        dst = f"[{self.dst}]:{self.dport}" if self.family == 6 else f"{self.dst}:{self.dport}"
        return f"{self.direction} {self.protocol} {dst}"


def _address(word: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(word)
    except ValueError:
        raise FlowError(f"{what}: {word!r} is not an IP address") from None


def _port(word: str, what: str) -> int:
    if not word.isdigit() or not 0 < int(word) < 65536:
        raise FlowError(f"{what}: {word!r} is not a port (1-65535)")
    return int(word)


def split_address_port(word: str, what: str, *, port_required: bool) -> tuple[str, int | None]:
    """`ADDR:PORT`, `[ADDR]:PORT` (IPv6) or, when the port is optional, `ADDR` alone."""
    if word.startswith("["):
        host, sep, rest = word[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise FlowError(f"{what}: {word!r} is not [ADDR]:PORT")
        port = rest[1:] if rest else None
    elif word.count(":") == 1:
        host, port = word.split(":")
    else:
        host, port = word, None
    address = _address(host, what)
    if port is None:
        if port_required:
            raise FlowError(f"{what}: {word!r} has no port (ADDR:PORT, [ADDR]:PORT for IPv6)")
        return str(address), None
    return str(address), _port(port, what)


def _id(word: str | None, what: str) -> int:
    if word is None:
        return 0
    if not word.isdigit():
        raise FlowError(f"{what}: {word!r} is not a numeric id")
    return int(word)


def make_flow(direction: str, protocol: str, dst: str, *, src: str | None = None, uid: str | None = None,
              gid: str | None = None, iface: str | None = None) -> Flow:
    """A Flow from the command's words; FlowError names the word that is wrong."""
    if direction not in DIRECTIONS:
        raise FlowError(f"direction: {direction!r} is not inbound or outbound")
    if protocol not in PROTOCOLS:
        raise FlowError(f"protocol: {protocol!r} is not tcp or udp")
    address, port = split_address_port(dst, "DST", port_required=True)
    assert port is not None
    source, sport = split_address_port(src, "--src", port_required=False) if src is not None else (None, None)
    if source is not None and ipaddress.ip_address(source).version != ipaddress.ip_address(address).version:
        raise FlowError(f"--src: {src!r} is not of the family of DST {dst!r}")
    if iface is not None and (not iface or len(iface) > 15 or "/" in iface or " " in iface):
        raise FlowError(f"--iface: {iface!r} is not an interface name")
    return Flow(direction, protocol, address, port, source, sport, _id(uid, "--uid"), _id(gid, "--gid"), iface)


def parse_flow_line(line: str) -> Flow:
    """One line of `--flows`: the same words as the command line."""
    words = shlex.split(line) if "'" in line or '"' in line else line.split()  # shlex is slow: only when quoted
    if len(words) < 3:
        raise FlowError(f"{line.strip()!r}: expected DIRECTION PROTOCOL DST [--src ADDR] [--uid N] [--gid N] "
                        "[--iface NAME]")
    options: dict[str, str] = {}
    rest = words[3:]
    for i in range(0, len(rest), 2):
        name = rest[i]
        if name not in ("--src", "--uid", "--gid", "--iface") or i + 1 >= len(rest):
            raise FlowError(f"{name!r}: expected --src, --uid, --gid or --iface with a value")
        options[name[2:]] = rest[i + 1]
    return make_flow(words[0], words[1], words[2], **options)


@dataclass(frozen=True, slots=True)
class HostView:
    """What the trace needs of the host: its addresses, and its interface towards the network."""

    local: frozenset[str] = frozenset()  # addresses of this host (loopback ones are local anyway)
    iface: str = "eth0"  # the non-loopback interface: inbound's default input, outbound's output off lo
    route: Callable[[str], str | None] | None = None  # dst -> output interface (`ip route get`), for --live
    sources: Mapping[int, str] = field(default_factory=dict)  # family -> this host's source address

    def is_local(self, address: IPAddress) -> bool:
        return address.is_loopback or str(address) in self.local


@dataclass(frozen=True, slots=True)
class Step:
    table: str
    chain: str
    number: int  # the rule's position in its chain, from 1; 0 for the chain's policy
    rule: str  # as iptables-save prints it, or "policy ACCEPT"
    matched: bool | None  # None: cannot tell (an unknown match)
    reason: str
    origin: str

    def to_dict(self) -> dict[str, object]:
        return {"table": self.table, "chain": self.chain, "number": self.number, "rule": self.rule,
                "matched": self.matched, "reason": self.reason, "origin": self.origin}


@dataclass(frozen=True, slots=True)
class Trace:
    flow: Flow
    verdict: str
    port: int
    rule: str | None  # the deciding rule, as iptables-save prints it (-A CHAIN ...)
    table: str | None
    chain: str | None
    number: int
    sentence: str
    steps: tuple[Step, ...]

    @property
    def captured(self) -> bool | None:
        if self.verdict == "unknown":
            return None
        return self.verdict in ("redirect", "tproxy")

    def to_dict(self) -> dict[str, object]:
        return {"flow": self.flow.words(), "captured": self.captured, "verdict": self.verdict, "port": self.port,
                "rule": self.rule, "table": self.table, "chain": self.chain, "sentence": self.sentence,
                "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def text(self) -> str:
        lines = [f"Tracing {self.flow.words()}"]
        for s in self.steps:
            state = {True: "matched", False: "did not match", None: "cannot tell"}[s.matched]
            where = f"{s.table} {s.chain} rule {s.number}" if s.number else f"{s.table} {s.chain}"
            lines += [f"  {where}: {s.rule}", f"      {state}: {s.reason}"]
            lines += [f"      {s.origin}"] if s.origin else []
        lines.append(self.sentence)
        return "\n".join(lines) + "\n"


# --- compiled rules -------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Packet:
    protocol: str
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    in_iface: str | None
    out_iface: str | None
    uid: int | None
    gid: int | None
    host: HostView
    mark: int = 0
    ctmark: int = 0
    ctstate: str = "NEW"


Test = Callable[[_Packet], str | None]  # None: matches; else why not, in words


@dataclass(frozen=True, slots=True)
class _Compiled:
    saved: SavedRule
    number: int
    tests: tuple[Test, ...]
    unknown: str  # "" or what cannot be modelled, e.g. "match -m socket"
    target: str
    args: Mapping[str, str]
    goto: bool
    description: str
    origin: str


def _iface_test(pattern: str, negated: bool, which: str) -> Test:
    prefix = pattern.endswith("+")
    name = pattern[:-1] if prefix else pattern
    label = "arriving on" if which == "in" else "leaving through"

    def test(p: _Packet) -> str | None:
        iface = p.in_iface if which == "in" else p.out_iface
        hit = iface is not None and (iface.startswith(name) if prefix else iface == name)
        if hit != negated:
            return None
        return f"it is {label} {iface or 'no interface'}"
    return test


def _net_test(value: str, negated: bool, which: str) -> Test:
    networks = [ipaddress.ip_network(v, strict=False) for v in value.split(",")]
    label = "from" if which == "s" else "to"

    def test(p: _Packet) -> str | None:
        address = p.src if which == "s" else p.dst
        hit = any(address.version == n.version and address in n for n in networks)
        return None if hit != negated else f"it is {label} {address}"
    return test


def _ports(value: str) -> list[tuple[int, int]]:
    spans = []
    for part in value.split(","):
        low, _, high = part.partition(":")
        spans.append((int(low or 0), int(high or 65535) if _ else int(low)))
    return spans


def _port_test(value: str, negated: bool, which: str) -> Test:
    spans = _ports(value)
    label = {"d": "destination port", "s": "source port"}

    def test(p: _Packet) -> str | None:
        ports = {"d": (p.dport,), "s": (p.sport,), "both": (p.sport, p.dport)}[which]
        hit = any(lo <= port <= hi for port in ports for lo, hi in spans)
        return None if hit != negated else f"its {label.get(which, 'port')} is {p.dport if which != 's' else p.sport}"
    return test


def _proto_test(value: str, negated: bool) -> Test:
    proto = _PROTO_NUMBERS.get(value, value.lower())

    def test(p: _Packet) -> str | None:
        hit = proto == "all" or p.protocol == proto
        return None if hit != negated else f"it is {p.protocol.upper()}"
    return test


def _owner_test(value: str, negated: bool, which: str) -> Test:
    low, _, high = value.partition("-")
    lo, hi = int(low), int(high or low)
    label = "user" if which == "uid" else "group"

    def test(p: _Packet) -> str | None:
        owner = p.uid if which == "uid" else p.gid
        if owner is None:  # an arriving packet has no local sender: the owner match never matches it
            return "it has no local sender" if not negated else None
        hit = lo <= owner <= hi
        return None if hit != negated else f"it is sent by {label} id {owner}"
    return test


def _mark_value(value: str) -> tuple[int, int]:
    mark, _, mask = value.partition("/")
    return int(mark, 0), int(mask, 0) if mask else 0xFFFFFFFF


def _mark_test(value: str, negated: bool, conn: bool) -> Test:
    mark, mask = _mark_value(value)

    def test(p: _Packet) -> str | None:
        current = p.ctmark if conn else p.mark
        hit = current & mask == mark
        what = "its connection's mark" if conn else "its packet mark"
        return None if hit != negated else f"{what} is {current:#x}"
    return test


def _ctstate_test(value: str, negated: bool) -> Test:
    states = set(value.upper().split(","))

    def test(p: _Packet) -> str | None:
        hit = p.ctstate in states
        return None if hit != negated else f"it opens a connection (state {p.ctstate})"
    return test


_ADDRTYPES = frozenset({"LOCAL", "UNICAST", "MULTICAST", "BROADCAST"})


def _addrtype_of(address: IPAddress, host: HostView) -> set[str]:
    if host.is_local(address):
        return {"LOCAL"}
    if address.is_multicast:
        return {"MULTICAST"}
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return {"BROADCAST"}
    return {"UNICAST"}


def _addrtype_test(value: str, negated: bool, which: str) -> Test:
    types = set(value.upper().split(","))

    def test(p: _Packet) -> str | None:
        address = p.src if which == "src" else p.dst
        hit = bool(types & _addrtype_of(address, p.host))
        kind = "/".join(sorted(_addrtype_of(address, p.host))).lower()
        return None if hit != negated else f"its {'source' if which == 'src' else 'destination'} is {kind}"
    return test


_MODULES = frozenset({"tcp", "udp", "multiport", "owner", "mark", "connmark", "conntrack", "addrtype", "comment"})
_TARGETS = frozenset({"", "RETURN", "ACCEPT", "DROP", "REJECT", "REDIRECT", "TPROXY", "MARK", "CONNMARK"})


def _compile_options(rule: SavedRule) -> tuple[list[Test], str]:
    tests: list[Test] = []
    unknown = ""
    modules = {value for negated, option, value in rule.options if option == "-m"}
    for negated, option, value in sorted(rule.options, key=lambda o: (o[1] != "-p", o[1])):
        if option == "-m":
            if value not in _MODULES:
                unknown = unknown or f"match -m {value}"
        elif option == "-p":
            tests.append(_proto_test(value, negated))
        elif option in ("-s", "-d"):
            tests.append(_net_test(value, negated, option[1]))
        elif option in ("-i", "-o"):
            tests.append(_iface_test(value, negated, "in" if option == "-i" else "out"))
        elif option in ("--dport", "--sport", "--dports", "--sports", "--destination-ports", "--source-ports",
                        "--ports"):
            which = "both" if option == "--ports" else option[2]
            tests.append(_port_test(value, negated, which))
        elif option in ("--uid-owner", "--gid-owner"):
            tests.append(_owner_test(value, negated, option[2:5]))
        elif option == "--mark":
            tests.append(_mark_test(value, negated, "connmark" in modules and "mark" not in modules))
        elif option in ("--ctstate", "--state"):
            tests.append(_ctstate_test(value, negated))
        elif option in ("--dst-type", "--src-type") and set(value.upper().split(",")) <= _ADDRTYPES:
            tests.append(_addrtype_test(value, negated, option[2:5]))
        elif option == "--comment":
            continue
        elif not unknown:
            unknown = f"match {'! ' if negated else ''}{option}{' ' + value if value else ''}"
    return tests, unknown


def _target_args(args: Sequence[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[args[i]] = args[i + 1]
            i += 2
        else:
            values[args[i]] = ""
            i += 1
    return values


def _description(rule: SavedRule, family: int) -> str:
    try:
        words = tuple(shlex.split(rule.spec))
    except ValueError:
        words = tuple(rule.spec.split())
    return describe(Rule(family, rule.table, rule.chain, ("-A", rule.chain, *words)))


class Ruleset:
    """One family's mangle and nat tables, compiled once for many traces."""

    def __init__(self, tables: Mapping[str, SavedTable], family: int,
                 origins: Mapping[Shape, str] | None = None) -> None:
        self.family = family
        self.origins: dict[Shape, str] = dict(origins or {})  # by shape: what the live rules are matched against
        self.chains: dict[tuple[str, str], list[_Compiled]] = {}
        self.policies: dict[tuple[str, str], str] = {}
        for name in (MANGLE, NAT):
            table = tables.get(name)
            if table is None:
                continue
            for chain, policy in table.chains:
                self.policies[(name, chain)] = policy
                self.chains.setdefault((name, chain), [])
            for saved in table.rules:
                compiled = self.chains.setdefault((name, saved.chain), [])
                tests, unknown = _compile_options(saved)
                target = saved.target
                if target not in _TARGETS and (name, target) not in self.chains and not _is_chain(table, target):
                    unknown = unknown or f"target {target}"
                origin = self.origins.get(shape(saved)) or _foreign_origin(saved)
                compiled.append(_Compiled(saved, len(compiled) + 1, tuple(tests), unknown, target,
                                          _target_args(saved.target_args), f" -g {target}" in f" {saved.spec}",
                                          _description(saved, family), origin))

    @classmethod
    def from_save(cls, text: str, family: int, origins: Mapping[Shape, str] | None = None) -> Ruleset:
        """The live rules of one family: an iptables-save dump; `origins` (a planned Ruleset's) names the
        setting of each live rule that is one of the plan's, in whatever form iptables-save prints it."""
        return cls(parse_save(text), family, origins)

    @classmethod
    def from_plan(cls, plan: Plan, family: int, origin: Callable[[Rule], str] | None = None) -> Ruleset:
        """The planned rules of one family, laid out as the kernel holds them (`-I` inserts applied)."""
        tables: dict[str, SavedTable] = {}
        origins: dict[Shape, str] = {}
        per_table: dict[str, dict[str, list[str]]] = {}
        for rule in plan.rules(family):
            chains = per_table.setdefault(rule.table, {})
            spec = " ".join(rule.spec)
            chain = chains.setdefault(rule.chain, [])
            if rule.inserted:
                chain.insert(int(rule.params[2]) - 1, spec)
            else:
                chain.append(spec)
            origins[shape(parse_rule(rule.table, rule.chain, spec))] = (origin(rule) if origin
                                                                        else f"Set by: {rule.setting}")
        for name, chains in per_table.items():
            rules = tuple(parse_rule(name, chain, spec) for chain, specs in chains.items() for spec in specs)
            listed = [(c, "ACCEPT") for c in sorted(BUILTIN_CHAINS)] + [(c, "-") for c in chains
                                                                        if c not in BUILTIN_CHAINS]
            tables[name] = SavedTable(name, tuple(listed), rules)
        return cls(tables, family, origins)


Shape = tuple[str, str, frozenset[tuple[bool, str, str]], str, tuple[str, ...]]


def shape(rule: SavedRule) -> Shape:
    """A rule whatever order or spelling iptables-save uses: table, chain, options, target, its arguments."""
    return rule.table, rule.chain, rule.options, rule.target, rule.target_args


def _foreign_origin(rule: SavedRule) -> str:
    return ISTIO_NOT_PLANNED if rule.chain.startswith(PREFIX) or rule.target.startswith(PREFIX) else NOT_OURS


def _is_chain(table: SavedTable, name: str) -> bool:
    return any(chain == name for chain, _ in table.chains)


@dataclass(slots=True)
class _Outcome:
    verdict: str  # a VERDICTS entry, or "accept" (ends the table)
    rule: _Compiled | None = None
    table: str = ""
    port: int = 0
    why: str = ""


def _redirect_port(args: Mapping[str, str], dport: int) -> int | None:
    value = args.get("--to-ports") or args.get("--to-port")
    if value is None:
        return dport  # REDIRECT without a port keeps it
    if value.isdigit():
        return int(value)
    return None


class Tracer:
    """Traces flows over a Ruleset per family; `trace()` is cheap after construction."""

    def __init__(self, rulesets: Mapping[int, Ruleset], host: HostView) -> None:
        self.rulesets = rulesets
        self.host = host

    def trace(self, flow: Flow) -> Trace:
        family = flow.family
        ruleset = self.rulesets.get(family)
        dst = ipaddress.ip_address(flow.dst)
        steps: list[Step] = []
        if ruleset is None:  # --live on a host whose IPv6 rules cannot be read (e.g. no IPv6 in the kernel)
            return self._result(flow, _Outcome("unknown", why=f"the IPv{family} rules could not be read"), steps)
        if flow.direction == "inbound":
            src = ipaddress.ip_address(flow.src or DEFAULT_SRC[family])
            packet = _Packet(flow.protocol, src, dst, flow.sport or DEFAULT_SPORT, flow.dport,
                             flow.iface or self.host.iface, None, None, None, self.host)
            outcome = self._hook(ruleset, "PREROUTING", packet, steps)
        else:
            out = flow.iface or self._out_iface(dst)
            src = ipaddress.ip_address(flow.src) if flow.src else self._source(dst, out)
            packet = _Packet(flow.protocol, src, dst, flow.sport or DEFAULT_SPORT, flow.dport, None, out,
                             flow.uid, flow.gid, self.host)
            outcome = self._hook(ruleset, "OUTPUT", packet, steps)
            if outcome.verdict == "not-captured" and out == "lo":
                # Back in on lo: mangle sees every packet again; nat was decided once, in OUTPUT.
                packet.in_iface, packet.out_iface, packet.uid, packet.gid = "lo", None, None, None
                outcome = self._hook(ruleset, "PREROUTING", packet, steps, tables=(MANGLE,))
        return self._result(flow, outcome, steps)

    def _out_iface(self, dst: IPAddress) -> str:
        if self.host.is_local(dst):
            return "lo"
        if self.host.route is not None:
            return self.host.route(str(dst)) or self.host.iface
        return self.host.iface

    def _source(self, dst: IPAddress, out: str) -> IPAddress:
        if out == "lo":
            if dst.is_loopback:
                return ipaddress.ip_address("127.0.0.1" if dst.version == 4 else "::1")
            return dst
        return ipaddress.ip_address(self.host.sources.get(dst.version) or ("10.0.0.1" if dst.version == 4 else
                                                                           "fd00::1"))

    def _hook(self, ruleset: Ruleset, hook: str, packet: _Packet, steps: list[Step],
              tables: Sequence[str] = (MANGLE, NAT)) -> _Outcome:
        for table in tables:
            if (table, hook) not in ruleset.chains:
                continue
            outcome = self._walk(ruleset, table, hook, packet, steps, 0)
            if outcome is None:
                policy = ruleset.policies.get((table, hook), "ACCEPT")
                steps.append(Step(table, hook, 0, f"policy {policy}", True,
                                  f"the end of the built-in chain {hook}: its policy {policy}", ""))
                if policy == "DROP":
                    return _Outcome("dropped", None, table)
                continue
            if outcome.verdict == "accept":
                continue
            outcome.table = table
            return outcome
        return _Outcome("not-captured")

    def _walk(self, ruleset: Ruleset, table: str, chain: str, packet: _Packet, steps: list[Step],
              depth: int) -> _Outcome | None:
        """None: fell off the chain or RETURNed; else where the packet went."""
        if depth > _MAX_DEPTH:
            return _Outcome("unknown", None, table, why=f"chains nested deeper than {_MAX_DEPTH}")
        for rule in ruleset.chains.get((table, chain), ()):
            why = next((reason for test in rule.tests if (reason := test(packet)) is not None), None)
            line = rule.saved.line
            if why is not None:
                steps.append(Step(table, chain, rule.number, line, False, f"{why}; {rule.description}", rule.origin))
                continue
            if rule.unknown:
                steps.append(Step(table, chain, rule.number, line, None, f"{rule.unknown} is not modelled by "
                                  f"trace; {rule.description}", rule.origin))
                return _Outcome("unknown", rule, table, why=rule.unknown)
            steps.append(Step(table, chain, rule.number, line, True, rule.description, rule.origin))
            outcome = self._target(ruleset, table, rule, packet, steps, depth)
            if outcome == "continue":
                continue
            if outcome == "return":
                return None
            if isinstance(outcome, _Outcome):
                return outcome
        return None

    def _target(self, ruleset: Ruleset, table: str, rule: _Compiled, packet: _Packet, steps: list[Step],
                depth: int) -> _Outcome | str:
        target, args = rule.target, rule.args
        if target == "":
            return "continue"
        if target == "RETURN":
            return "return"
        if target == "ACCEPT":
            return _Outcome("accept", rule)
        if target == "DROP":
            return _Outcome("dropped", rule)
        if target == "REJECT":
            return _Outcome("rejected", rule)
        if target == "REDIRECT":
            port = _redirect_port(args, packet.dport)
            if table != NAT or port is None:
                return _Outcome("unknown", rule, why=f"target REDIRECT {' '.join(rule.saved.target_args)}")
            return _Outcome("redirect", rule, port=port)
        if target == "TPROXY":
            port_text = args.get("--on-port", "")
            # iptables-save prints `--on-ip 0.0.0.0` (or ::) for "the packet's own destination"
            if table != MANGLE or not port_text.isdigit() or args.get("--on-ip", "::") not in ("0.0.0.0", "::"):
                return _Outcome("unknown", rule, why=f"target TPROXY {' '.join(rule.saved.target_args)}")
            return _Outcome("tproxy", rule, port=int(port_text) or packet.dport)
        if target == "MARK":
            return self._mark(rule, packet, conn=False)
        if target == "CONNMARK":
            return self._mark(rule, packet, conn=True)
        if (table, target) in ruleset.chains:
            outcome = self._walk(ruleset, table, target, packet, steps, depth + 1)
            if outcome is not None:
                return outcome
            return "return" if rule.goto else "continue"
        return _Outcome("unknown", rule, why=f"target {target}")

    @staticmethod
    def _mark(rule: _Compiled, packet: _Packet, *, conn: bool) -> _Outcome | str:
        args = rule.args
        if conn and "--save-mark" in args and len(args) == 1:
            packet.ctmark = packet.mark
        elif conn and "--restore-mark" in args and len(args) == 1:
            packet.mark = packet.ctmark
        elif set(args) <= {"--set-mark", "--set-xmark"} and len(args) == 1:
            value, mask = _mark_value(next(iter(args.values())))
            if "--set-mark" in args:  # --set-mark V/M: zero the mask's bits, then OR V
                new = (packet.ctmark if conn else packet.mark) & ~mask | value
            else:  # --set-xmark V/M: zero the mask's bits, then XOR V
                new = (packet.ctmark if conn else packet.mark) & ~mask ^ value
            if conn:
                packet.ctmark = new
            else:
                packet.mark = new
        else:
            return _Outcome("unknown", rule, why=f"target {rule.target} {' '.join(rule.saved.target_args)}")
        return "continue"

    def _result(self, flow: Flow, outcome: _Outcome, steps: list[Step]) -> Trace:
        rule = outcome.rule
        where = f"{outcome.table} {rule.saved.chain} rule {rule.number}" if rule else ""
        verdict, port = outcome.verdict, flow.dport
        if verdict in ("redirect", "tproxy"):
            port = outcome.port
            role = f" ({LISTENERS[port]})" if port in LISTENERS else ""
            how = "redirected to" if verdict == "redirect" else "handed (TPROXY) to"
            sentence = f"captured: {how} {port}{role} by {where}"
        elif verdict == "not-captured":
            sentence = f"not captured: delivered to port {port} as addressed (no rule redirects it)"
        elif verdict in ("dropped", "rejected"):
            hook = "PREROUTING" if flow.direction == "inbound" else "OUTPUT"
            by = where if rule else f"the policy of {outcome.table} {hook}"
            sentence = f"{verdict}: by {by}"
        else:
            sentence = f"unknown: {outcome.why}" + (f", in {where}: {rule.saved.line}" if rule else "")
        return Trace(flow, verdict, port, rule.saved.line if rule else None, outcome.table or None,
                     rule.saved.chain if rule else None, rule.number if rule else 0, sentence, tuple(steps))


def tracer_for_plan(plan: Plan, host: HostView, origin: Callable[[Rule], str] | None = None) -> Tracer:
    """Traces over the plan's rules; `origin` says which setting produced a rule (explain.origin)."""
    return Tracer({family: Ruleset.from_plan(plan, family, origin) for family in (4, 6)}, host)


def tracer_for_saves(saves: Mapping[int, str], host: HostView, planned: Tracer | None = None) -> Tracer:
    """Traces over live rules; with `planned`, the rules that are the plan's name their settings."""
    origins = {f: planned.rulesets[f].origins for f in planned.rulesets} if planned else {}
    return Tracer({family: Ruleset.from_save(text, family, origins.get(family)) for family, text in saves.items()},
                  host)


def trace_all(tracer: Tracer, flows: Iterable[Flow]) -> list[Trace]:
    return [tracer.trace(flow) for flow in flows]
