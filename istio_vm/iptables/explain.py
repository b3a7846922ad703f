"""The plan in words, for operators: `explain()` annotates every rule and `ip` command.

Each rule gets what it does to a packet and the setting (with its value and origin) that produced
it; each chain gets a preface saying what it is for. `render()` is what `iptables plan` prints.
Pure and deterministic: the same plan and config always give the same text.
"""

from __future__ import annotations

from istio_vm.config.model import DNS_SERVERS, Config
from istio_vm.defaults import FORMATS
from istio_vm.iptables.names import (
    AGENT_DNS_PORT,
    BUILTIN_CHAINS,
    ISTIO_DIVERT,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    MANGLE,
    NAT,
)
from istio_vm.iptables.rules import ALWAYS, Plan, Rule, ordered_tables

FAMILY_TITLE = {4: "IPv4 rules (iptables-restore)", 6: "IPv6 rules (ip6tables-restore)"}

CHAINS = {
    (NAT, "PREROUTING"): "built-in chain for packets arriving from the network, before routing: the "
                           "inbound capture hooks in here (and kubevirt interfaces are let through).",
    (NAT, "OUTPUT"): "built-in chain for packets sent by processes on this host: the outbound capture "
                       "hooks in here, and DNS over UDP is redirected here.",
    (NAT, ISTIO_INBOUND): "inbound TCP connections to this host: decides which go to the proxy's "
                              "inbound listener and which reach the application directly.",
    (NAT, ISTIO_IN_REDIRECT): "sends a connection to the proxy's inbound listener by rewriting its "
                                  "destination port.",
    (NAT, ISTIO_REDIRECT): "sends a connection to the proxy's outbound listener by rewriting its "
                               "destination port.",
    (NAT, ISTIO_OUTPUT): "outbound TCP connections made on this host: lets the proxy's own traffic and "
                             "local traffic through, and sends the rest, as configured, to the proxy.",
    (MANGLE, "PREROUTING"): "built-in chain for arriving packets (TPROXY mode): jumps to the inbound "
                              "capture and saves the proxy's packet mark on the connection.",
    (MANGLE, "OUTPUT"): "built-in chain for locally sent packets (TPROXY mode): restores the "
                          "connection's mark so replies are routed back to the proxy.",
    (MANGLE, ISTIO_INBOUND): "inbound TCP packets in TPROXY mode: new connections to captured ports "
                                 "are handed to the proxy, packets of established ones are diverted to it.",
    (MANGLE, ISTIO_DIVERT): "marks a packet so that policy routing delivers it to this host (the "
                                "proxy's socket), then accepts it.",
    (MANGLE, ISTIO_TPROXY): "hands a new inbound connection to the proxy's inbound listener without "
                                "rewriting its destination (TPROXY).",
}
TARGETS = {
    "RETURN": "leave it alone (RETURN: not captured)",
    "ACCEPT": "accept it, ending the mangle table, so policy routing sends it to the proxy's socket",
    ISTIO_REDIRECT: "capture it for the proxy's outbound listener (ISTIO_REDIRECT)",
    ISTIO_IN_REDIRECT: "capture it for the proxy's inbound listener (ISTIO_IN_REDIRECT)",
    ISTIO_INBOUND: "check it against the inbound capture rules (ISTIO_INBOUND)",
    ISTIO_OUTPUT: "check it against the outbound capture rules (ISTIO_OUTPUT)",
    ISTIO_DIVERT: "divert it to the proxy's socket (ISTIO_DIVERT)",
    ISTIO_TPROXY: "hand it to the proxy's inbound listener (ISTIO_TPROXY)",
}
DERIVED = {"REDIRECT_DNS": "ISTIO_META_DNS_CAPTURE", "PROXY_GID": "PROXY_UID", "PROXY_UID": "ENVOY_USER"}


def render(plan: Plan, fmt: str) -> str:
    """The text `istio-vm iptables plan --format FMT` prints."""
    if fmt == "restore":
        return (f"# iptables-restore (IPv4)\n{plan.restore(4)}"
                f"# ip6tables-restore (IPv6)\n{plan.restore(6)}")
    if fmt == "commands":
        return "".join(line + "\n" for line in plan.commands())
    if fmt == "json":
        return plan.to_json()
    if fmt == "dot":
        from istio_vm.iptables.dot import to_dot  # only this format needs it

        return to_dot(plan)
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def explain(plan: Plan, config: Config) -> str:
    """IPv4 then IPv6, per table (nat, mangle) and chain in plan order, then the `ip` commands."""
    lines = ["What istio-vm installs: Istio 1.9.4's capture rules, each with what it does and why.",
             "Chains are listed per table in the order their rules are written; rules in that order too.", ""]
    for family in (4, 6):
        lines += [FAMILY_TITLE[family], "=" * len(FAMILY_TITLE[family]), ""]
        rules = plan.rules(family)
        if not rules and family == 6:
            lines += [f"None: IPv6 capture is off ({_setting(config, 'ENABLE_INBOUND_IPV6')}); "
                      "ip6tables-restore is given an empty input.", ""]
        elif not rules:
            lines += ["None.", ""]
        for table in ordered_tables(rules):
            for chain in dict.fromkeys(r.chain for r in rules if r.table == table):
                preface = CHAINS.get((table, chain), "a chain of this plan.")
                if chain not in BUILTIN_CHAINS and not any(r.table == table and r.target == chain for r in rules):
                    preface += " Nothing jumps to it here, so its rules never apply (as in Istio 1.9.4)."
                lines += [f"{table} {chain}: {preface}"]
                for rule in (r for r in rules if r.table == table and r.chain == chain):
                    lines += [f"  {' '.join(rule.params)}", f"      {describe(rule)}",
                              f"      {_origin(rule, config)}"]
                lines.append("")
    lines += ["Commands run before the rules are applied", "=" * 41, ""]
    for command in plan.ip_commands:
        lines += [f"  {' '.join(command.argv)}", f"      {_ip_command(command.argv, config)}"]
    if not plan.ip_commands:
        lines.append("None (only IPv6 capture and TPROXY mode with inbound ports need them).")
    return "\n".join(lines).rstrip("\n") + "\n"


def describe(rule: Rule) -> str:
    """What the rule does to a packet, in a sentence or two, read off its parameters."""
    words = iter(rule.spec)
    proto, conditions, module, action = "", [], "", "no action"
    negate = False
    for word in words:
        if word == "!":
            negate = True
            continue
        if word == "-j":
            action = _action(next(words, ""), list(words))
            break
        value = next(words, "")
        if word == "-p":
            proto = f"not {value.upper()}" if negate else value.upper()
        elif word == "-m":
            module = value
        else:
            conditions.append(_condition(word, value, negate, module))
        negate = False
    subject = " ".join(filter(None, [proto or "any packet in this chain", ", ".join(conditions)]))
    sentence = f"{subject[0].upper()}{subject[1:]}: {action}."
    why = _why(rule)
    if why:
        sentence += " " + why
    if rule.inserted:
        sentence += f" Inserted at position {rule.params[2]}, so it lands above the rules written before it."
    return sentence


def _why(rule: Rule) -> str:
    p, target = rule.params, rule.target
    owner = "--uid-owner" in p or "--gid-owner" in p
    if "-s" in p and target == "RETURN":
        return "This is the source the proxy uses to pass inbound traffic on to the application."
    if rule.chain == "PREROUTING" and "-i" in p:
        return "Traffic arriving on this interface is handled as outbound traffic (kubevirt)."
    if owner and "udp" in p:
        return "The proxy's and agent's own DNS queries go to the real nameserver."
    if owner and target == "ISTIO_IN_REDIRECT":
        return "The proxy calling this host by a non-loopback address goes through the inbound listener."
    if owner and "!" in p[p.index("owner"):]:
        return "Applications talking to each other over loopback are not captured."
    if owner:
        return "The proxy's own traffic is never captured again (no loop)."
    if p[-4:] == ("--dport", "22", "-j", "RETURN"):
        return "SSH is always left alone when every inbound port is captured."
    if target == "RETURN" and rule.chain == "ISTIO_OUTPUT" and len(p) == 4:
        return "Destinations not listed above are not captured."
    return ""


def _condition(word: str, value: str, negate: bool, module: str) -> str:
    phrases = {
        "--dport": ("to port {}", "to any port but {}"),
        "-d": ("to {}", "not to {}"),
        "-s": ("from {}", "not from {}"),
        "-o": ("leaving through {}", "not leaving through {}"),
        "-i": ("arriving on {}", "not arriving on {}"),
        "--uid-owner": ("sent by a process of user id {}", "not sent by user id {}"),
        "--gid-owner": ("sent by a process of group id {}", "not sent by group id {}"),
        "--ctstate": ("of a connection in state {}", "of a connection not in state {}"),
        "--mark": ("carrying packet mark {}", "not carrying packet mark {}"),
    }
    if word == "--mark" and module == "connmark":
        return ("not " if negate else "") + f"on a connection marked {value}"
    positive, negative = phrases.get(word, (f"{word} {{}}", f"! {word} {{}}"))
    return (negative if negate else positive).format(value)


def _action(target: str, options: list[str]) -> str:
    values = dict(zip(options[::2], options[1::2], strict=False))
    if target == "REDIRECT":
        port = values.get("--to-ports") or values.get("--to-port", "")
        role = " (the agent's DNS proxy)" if port == AGENT_DNS_PORT else ""
        return f"rewrite its destination to local port {port}{role}"
    if target == "MARK":
        return f"set packet mark {values.get('--set-mark', '')}"
    if target == "TPROXY":
        return (f"deliver it to the socket listening on port {values.get('--on-port', '')}, destination kept, "
                f"with packet mark {values.get('--tproxy-mark', '')}")
    if target == "CONNMARK":
        if "--save-mark" in options:
            return "copy the packet's mark onto its connection"
        return "copy the connection's mark back onto the packet"
    return TARGETS.get(target, " ".join(["jump to", target, *options]))


def _setting(config: Config, name: str) -> str:
    try:
        item = config.value(name)
    except KeyError:
        return name
    return f"{name}={item.value}"


def origin(rule: Rule, config: Config) -> str:
    """"Set by: NAME=value (source)." for a rule of the plan (what `trace` shows too)."""
    return _origin(rule, config)


def _origin(rule: Rule, config: Config) -> str:
    if rule.setting == ALWAYS:
        return "Set by: nothing; this rule is always installed."
    text = f"Set by: {_described(config, rule.setting)}"
    if rule.setting == "REDIRECT_DNS" and "-d" in rule.params:
        text += f"; the nameservers come from {config.value(DNS_SERVERS).source}"
    return text + "."


def _described(config: Config, name: str) -> str:
    """NAME=value (where it came from, or what it was derived from)."""
    try:
        item = config.value(name)
    except KeyError:
        return name
    if item.source == "derived" and name in DERIVED:
        return f"{name}={item.value}, derived from {_described(config, DERIVED[name])}"
    return f"{name}={item.value} ({item.source})"


def _ip_command(argv: tuple[str, ...], config: Config) -> str:
    if argv[:3] == ("ip", "-6", "addr"):
        return ("Adds ::6 to the loopback interface: the IPv6 source of the proxy's inbound passthrough "
                f"(as 127.0.0.6 for IPv4). Set by: {_setting(config, 'ENABLE_INBOUND_IPV6')}.")
    if "rule" in argv:
        return ("Routes packets carrying the TPROXY mark with their own routing table. Set by: "
                f"{_setting(config, 'ISTIO_INBOUND_TPROXY_MARK')}, "
                f"{_setting(config, 'ISTIO_INBOUND_TPROXY_ROUTE_TABLE')}.")
    if "route" in argv:
        return ("In that table every destination is local, so marked packets are delivered to this host "
                f"(the proxy) instead of forwarded. Set by: {_setting(config, 'ISTIO_INBOUND_TPROXY_ROUTE_TABLE')}.")
    return "A command of the plan."
