"""The plan as a Graphviz graph: chains as boxes, jumps as edges, where packets end up as ovals.

Generated from the plan's rules and their `-j` targets only, so it always matches the rules: the
inbound path (PREROUTING → ISTIO_INBOUND → proxy), the outbound path (OUTPUT → ISTIO_OUTPUT →
ISTIO_REDIRECT → proxy), the proxy's own traffic (owner matches → not captured) and DNS (→ 15053).
"""

from __future__ import annotations

from istio_vm.iptables.names import AGENT_DNS_PORT, BUILTIN_CHAINS, DNS_PORT, ISTIO_IN_REDIRECT, ISTIO_REDIRECT
from istio_vm.iptables.rules import Plan, Rule

ENTRY = {"PREROUTING": "packet from the network", "OUTPUT": "packet from a local process"}
DNS_COLOR, OWNER_COLOR = "blue", "darkgreen"


def to_dot(plan: Plan) -> str:
    lines = ["digraph iptables {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];',
             '  edge [fontname="monospace", fontsize=10];']
    for family in (4, 6):
        rules = plan.rules(family)
        if rules:
            lines += _family(family, rules)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _family(family: int, rules: tuple[Rule, ...]) -> list[str]:
    prefix = f"v{family}"
    nodes: dict[str, str] = {}  # id -> attributes, in first-appearance order
    edges: dict[tuple[str, str, str], list[str]] = {}  # (source, destination, color) -> matches
    chains = {(r.table, r.chain) for r in rules}
    for rule in rules:
        source = _chain_node(prefix, rule.table, rule.chain, nodes)
        if rule.chain in ENTRY:
            entry = f"{prefix} {rule.chain.lower()}"
            nodes.setdefault(entry, f'label="{ENTRY[rule.chain]}", shape=ellipse')
            edges.setdefault((entry, source, ""), [])
        if not rule.target:
            continue
        if (rule.table, rule.target) in chains and rule.target not in BUILTIN_CHAINS:
            dest = _chain_node(prefix, rule.table, rule.target, nodes)
        else:
            dest = _terminal_node(prefix, rule, nodes)
        edges.setdefault((source, dest, _color(rule)), []).append(_match(rule) or "(all)")
    lines = [f'  subgraph "cluster_{prefix}" {{', f'    label="IPv{family}";']
    lines += [f'    "{node}" [{attributes}];' for node, attributes in nodes.items()]
    for (source, dest, color), labels in edges.items():
        attributes = [f'label="{_escape(chr(10).join(labels))}"'] if labels else []
        if color:
            attributes.append(f"color={color}")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f'    "{source}" -> "{dest}"{suffix};')
    lines.append("  }")
    return lines


def _chain_node(prefix: str, table: str, chain: str, nodes: dict[str, str]) -> str:
    node = f"{prefix} {table} {chain}"
    style = ", style=dashed" if chain in BUILTIN_CHAINS else ""
    nodes.setdefault(node, f'label="{table} {chain}"{style}')
    return node


def _terminal_node(prefix: str, rule: Rule, nodes: dict[str, str]) -> str:
    after = rule.target_args
    target = rule.target
    if target == "RETURN":
        node, label = f"{prefix} not captured", "not captured"
    elif target == "REDIRECT":
        port = after[-1]
        role = {ISTIO_REDIRECT: "proxy outbound", ISTIO_IN_REDIRECT: "proxy inbound"}.get(
            rule.chain, "agent DNS" if port == AGENT_DNS_PORT else "local port")
        node, label = f"{prefix} port {port}", f"{role} :{port}"
    elif target == "TPROXY":
        port = after[after.index("--on-port") + 1]
        node, label = f"{prefix} tproxy {port}", f"proxy inbound :{port} (TPROXY)"
    elif target == "ACCEPT":
        node, label = f"{prefix} accepted", "accepted, routed to the proxy"
    else:
        text = " ".join((target, *after))
        node, label = f"{prefix} {text}", text
    nodes.setdefault(node, f'label="{_escape(label)}", shape=ellipse')
    return node


def _color(rule: Rule) -> str:
    """Green for the proxy's own traffic, blue for DNS, else the default."""
    pairs = list(zip(("", *rule.params), rule.params, rule.params[1:], strict=False))
    if any(flag in ("--uid-owner", "--gid-owner") and before != "!" for before, flag, _ in pairs):
        return OWNER_COLOR
    if any(flag == "--dport" and value == DNS_PORT and before != "!" for before, flag, value in pairs):
        return DNS_COLOR
    return ""


def _match(rule: Rule) -> str:
    """The rule's match, without the chain operation and the target: what selects the packets."""
    return " ".join(rule.match)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
