"""The rule plan: Istio 1.9.4's istio-iptables `run()`, ported step for step, without effects.

`build_plan(capture)` returns the same rules in the same order as 1.9.4's run()
(tools/istio-iptables/pkg/cmd/run.go), asymmetries included, plus the `ip` commands 1.9 ran on the
way. The private `_handle_*` steps keep Istio's names so the vectors of its unit tests can call them
on a fresh `Builder`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from istio_vm.config.checks import go_cidr, split
from istio_vm.config.model import Capture
from istio_vm.iptables.names import (
    AGENT_DNS_PORT,
    ISTIO_DIVERT,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    MANGLE,
    NAT,
)
from istio_vm.iptables.rules import Builder, Plan

# The variables behind the rules (settings.py names), for Rule.setting.
TUNNEL, ENVOY, CAPTURE = "INBOUND_TUNNEL_PORT", "ENVOY_PORT", "INBOUND_CAPTURE_PORT"
UID, GID, DNS, KUBEVIRT = "PROXY_UID", "PROXY_GID", "REDIRECT_DNS", "KUBE_VIRT_INTERFACES"
PORTS_IN, PORTS_IN_EXCLUDE = "ISTIO_INBOUND_PORTS", "ISTIO_LOCAL_EXCLUDE_PORTS"
PORTS_OUT, PORTS_OUT_EXCLUDE = "ISTIO_OUTBOUND_PORTS", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"
CIDR_IN, CIDR_EXCLUDE = "ISTIO_SERVICE_CIDR", "ISTIO_SERVICE_EXCLUDE_CIDR"
MODE, MARK = "ISTIO_INBOUND_INTERCEPTION_MODE", "ISTIO_INBOUND_TPROXY_MARK"


class NetworkRange(NamedTuple):
    """Istio's NetworkRange: `ip_nets` hold Go's `ipNet.String()` (the masked network)."""

    is_wildcard: bool = False
    ip_nets: tuple[str, ...] = ()
    has_loopback_ip: bool = False


def separate_v4_v6(text: str) -> tuple[NetworkRange, NetworkRange]:
    """Istio's separateV4V6: `*` is a wildcard for both; items Go cannot parse are skipped, as 1.9 did."""
    if text == "*":
        return NetworkRange(is_wildcard=True), NetworkRange(is_wildcard=True)
    nets: dict[int, list[str]] = {4: [], 6: []}
    loopback = {4: False, 6: False}
    for item in split(text):
        parsed = go_cidr(item)  # the answer validation got (cached): each CIDR is parsed once
        if parsed is None:
            continue
        family, net, is_loopback = parsed
        nets[family].append(net)
        loopback[family] |= is_loopback
    return (NetworkRange(False, tuple(nets[4]), loopback[4]),
            NetworkRange(False, tuple(nets[6]), loopback[6]))


@lru_cache(maxsize=4)
def build_plan(capture: Capture) -> Plan:
    """run() of istio-iptables 1.9.4 (pkg/cmd/run.go:353-564), recording instead of executing.

    Cached by `capture` (both are immutable): a start builds it once for the install, the capture
    helper, the metrics file and the reload digest, a reload once more for its new configuration.
    """
    b = Builder()
    cfg = capture
    ex4, ex6 = separate_v4_v6(cfg.outbound_ip_ranges_exclude)
    if ex4.is_wildcard:  # config validation refuses it; 1.9 panicked here
        raise ValueError("Invalid value for OUTBOUND_IP_RANGES_EXCLUDE")
    in4, in6 = separate_v4_v6(cfg.outbound_ip_ranges_include)
    if cfg.enable_inbound_ipv6:
        b.run("ip", "-6", "addr", "add", "::6/128", "dev", "lo")
    _short_circuit_kube_internal_interface(b, cfg)
    b.append_v4(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", cfg.inbound_tunnel_port, "-j", "RETURN", setting=TUNNEL)
    b.append_v4(ISTIO_REDIRECT, NAT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port, setting=ENVOY)
    b.append_v4(ISTIO_IN_REDIRECT, NAT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.inbound_capture_port,
                setting=CAPTURE)
    _handle_inbound_ports_include(b, cfg)

    b.append_v4("OUTPUT", NAT, "-p", "tcp", "-j", ISTIO_OUTPUT)
    for port in split(cfg.outbound_ports_exclude):
        b.append_v4(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", port, "-j", "RETURN", setting=PORTS_OUT_EXCLUDE)
    b.append_v4(ISTIO_OUTPUT, NAT, "-o", "lo", "-s", "127.0.0.6/32", "-j", "RETURN")
    loopback = in4.has_loopback_ip or in6.has_loopback_ip
    dns = cfg.redirect_dns
    not_dns = ("-p", "tcp", "!", "--dport", "53") if dns else ()
    for uid in split(cfg.proxy_uid):
        b.append_v4(ISTIO_OUTPUT, NAT, "-o", "lo", "!", "-d", "127.0.0.1/32", *not_dns, "-m", "owner",
                    "--uid-owner", uid, "-j", ISTIO_IN_REDIRECT, setting=UID)
        if not loopback:
            b.append_v4(ISTIO_OUTPUT, NAT, "-o", "lo", *not_dns, "-m", "owner", "!",
                        "--uid-owner", uid, "-j", "RETURN", setting=UID)
        b.append_v4(ISTIO_OUTPUT, NAT, "-m", "owner", "--uid-owner", uid, "-j", "RETURN", setting=UID)
    for gid in split(cfg.proxy_gid):
        # Unlike the uid rule, 1.9 never excludes port 53 here.
        b.append_v4(ISTIO_OUTPUT, NAT, "-o", "lo", "!", "-d", "127.0.0.1/32", "-m", "owner",
                    "--gid-owner", gid, "-j", ISTIO_IN_REDIRECT, setting=GID)
        if not loopback:
            b.append_v4(ISTIO_OUTPUT, NAT, "-o", "lo", *not_dns, "-m", "owner", "!", "--gid-owner", gid,
                        "-j", "RETURN", setting=GID)
        b.append_v4(ISTIO_OUTPUT, NAT, "-m", "owner", "--gid-owner", gid, "-j", "RETURN", setting=GID)
    if dns:
        for server in cfg.dns_servers_v4:
            b.append_v4(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", "53", "-d", server + "/32", "-j", "REDIRECT",
                        "--to-ports", AGENT_DNS_PORT, setting=DNS)
    b.append_v4(ISTIO_OUTPUT, NAT, "-d", "127.0.0.1/32", "-j", "RETURN")
    for cidr in ex4.ip_nets:
        b.append_v4(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", "RETURN", setting=CIDR_EXCLUDE)
    for port in split(cfg.outbound_ports_include):
        b.append_v4(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT, setting=PORTS_OUT)
    _handle_inbound_ipv4_rules(b, cfg, in4)
    if cfg.enable_inbound_ipv6:
        _handle_inbound_ipv6_rules(b, cfg, ex6, in6)

    if dns:  # into the built-in OUTPUT chain, after everything else (1.9's clean never removed them)
        for uid in split(cfg.proxy_uid):
            b.append_v4("OUTPUT", NAT, "-p", "udp", "--dport", "53", "-m", "owner", "--uid-owner", uid,
                        "-j", "RETURN", setting=DNS)
        for gid in split(cfg.proxy_gid):
            b.append_v4("OUTPUT", NAT, "-p", "udp", "--dport", "53", "-m", "owner", "--gid-owner", gid,
                        "-j", "RETURN", setting=DNS)
        for server in cfg.dns_servers_v4:
            b.append_v4("OUTPUT", NAT, "-p", "udp", "--dport", "53", "-d", server + "/32", "-j", "REDIRECT",
                        "--to-port", AGENT_DNS_PORT, setting=DNS)
    if cfg.tproxy:
        mark = cfg.inbound_tproxy_mark
        b.append_v4("PREROUTING", MANGLE, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK",
                    "--save-mark", setting=MODE)
        b.append_v4("OUTPUT", MANGLE, "-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK",
                    "--restore-mark", setting=MODE)
        b.insert_v4(ISTIO_INBOUND, MANGLE, 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN", setting=MODE)
    return b.plan()


def _short_circuit_kube_internal_interface(b: Builder, cfg: Capture) -> None:
    for interface in split(cfg.kubevirt_interfaces):
        b.insert_v4("PREROUTING", NAT, 1, "-i", interface, "-j", "RETURN", setting=KUBEVIRT)
        if cfg.enable_inbound_ipv6:
            b.insert_v6("PREROUTING", NAT, 1, "-i", interface, "-j", "RETURN", setting=KUBEVIRT)


def _handle_inbound_ports_include(b: Builder, cfg: Capture) -> None:
    if cfg.inbound_ports_include == "":
        return
    table = NAT
    if cfg.tproxy:
        table, mark, route_table = MANGLE, cfg.inbound_tproxy_mark, cfg.inbound_tproxy_route_table
        b.append_v4(ISTIO_DIVERT, MANGLE, "-j", "MARK", "--set-mark", mark, setting=MARK)
        b.append_v4(ISTIO_DIVERT, MANGLE, "-j", "ACCEPT", setting=MODE)
        b.run("ip", "-f", "inet", "rule", "add", "fwmark", mark, "lookup", route_table)
        # 1.9 ran `ip route show table all` only when this failed: an outcome, not part of the plan.
        b.run("ip", "-f", "inet", "route", "add", "local", "default", "dev", "lo", "table", route_table)
        b.append_v4(ISTIO_TPROXY, MANGLE, "!", "-d", "127.0.0.1/32", "-p", "tcp", "-j", "TPROXY", "--tproxy-mark",
                    mark + "/0xffffffff", "--on-port", cfg.inbound_capture_port, setting=MODE)
    b.append_v4("PREROUTING", table, "-p", "tcp", "-j", ISTIO_INBOUND, setting=PORTS_IN)
    if cfg.inbound_ports_include == "*":
        b.append_v4(ISTIO_INBOUND, table, "-p", "tcp", "--dport", "22", "-j", "RETURN", setting=PORTS_IN)
        for port in split(cfg.inbound_ports_exclude):
            b.append_v4(ISTIO_INBOUND, table, "-p", "tcp", "--dport", port, "-j", "RETURN", setting=PORTS_IN_EXCLUDE)
        if cfg.tproxy:
            b.append_v4(ISTIO_INBOUND, MANGLE, "-p", "tcp", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                        "-j", ISTIO_DIVERT, setting=PORTS_IN)
            b.append_v4(ISTIO_INBOUND, MANGLE, "-p", "tcp", "-j", ISTIO_TPROXY, setting=PORTS_IN)
        else:
            b.append_v4(ISTIO_INBOUND, NAT, "-p", "tcp", "-j", ISTIO_IN_REDIRECT, setting=PORTS_IN)
        return
    for port in split(cfg.inbound_ports_include):
        if cfg.tproxy:
            b.append_v4(ISTIO_INBOUND, MANGLE, "-p", "tcp", "--dport", port, "-m", "conntrack", "--ctstate",
                        "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT, setting=PORTS_IN)
            b.append_v4(ISTIO_INBOUND, MANGLE, "-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY, setting=PORTS_IN)
        else:
            b.append_v4(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT, setting=PORTS_IN)


def _handle_inbound_ipv4_rules(b: Builder, cfg: Capture, in4: NetworkRange) -> None:
    """The outbound include tail of ISTIO_OUTPUT (Istio's name for it, despite the word inbound)."""
    interfaces = split(cfg.kubevirt_interfaces)
    if in4.is_wildcard:
        b.append_v4(ISTIO_OUTPUT, NAT, "-j", ISTIO_REDIRECT, setting=CIDR_IN)
        for interface in interfaces:
            b.insert_v4("PREROUTING", NAT, 1, "-i", interface, "-j", ISTIO_REDIRECT, setting=KUBEVIRT)
    elif in4.ip_nets:
        for cidr in in4.ip_nets:
            for interface in interfaces:
                b.insert_v4("PREROUTING", NAT, 1, "-i", interface, "-d", cidr, "-j", ISTIO_REDIRECT, setting=KUBEVIRT)
            b.append_v4(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", ISTIO_REDIRECT, setting=CIDR_IN)
        b.append_v4(ISTIO_OUTPUT, NAT, "-j", "RETURN", setting=CIDR_IN)


def _handle_inbound_ipv6_rules(b: Builder, cfg: Capture, ex6: NetworkRange, in6: NetworkRange) -> None:
    """handleInboundIpv6Rules (run.go:198-306), the whole IPv6 list: nat only, REDIRECT even in TPROXY
    mode, no DNS, no port include."""
    b.append_v6(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", cfg.inbound_tunnel_port, "-j", "RETURN", setting=TUNNEL)
    b.append_v6(ISTIO_REDIRECT, NAT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port, setting=ENVOY)
    b.append_v6(ISTIO_IN_REDIRECT, NAT, "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.inbound_capture_port,
                setting=CAPTURE)
    if cfg.inbound_ports_include != "":
        b.append_v6("PREROUTING", NAT, "-p", "tcp", "-j", ISTIO_INBOUND, setting=PORTS_IN)
        if cfg.inbound_ports_include == "*":
            b.append_v6(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", "22", "-j", "RETURN", setting=PORTS_IN)
            for port in split(cfg.inbound_ports_exclude):
                b.append_v6(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", port, "-j", "RETURN", setting=PORTS_IN_EXCLUDE)
            b.append_v6(ISTIO_INBOUND, NAT, "-p", "tcp", "-j", ISTIO_IN_REDIRECT, setting=PORTS_IN)
        else:
            for port in split(cfg.inbound_ports_include):
                b.append_v6(ISTIO_INBOUND, NAT, "-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT, setting=PORTS_IN)
    b.append_v6("OUTPUT", NAT, "-p", "tcp", "-j", ISTIO_OUTPUT)
    for port in split(cfg.outbound_ports_exclude):
        b.append_v6(ISTIO_OUTPUT, NAT, "-p", "tcp", "--dport", port, "-j", "RETURN", setting=PORTS_OUT_EXCLUDE)
    b.append_v6(ISTIO_OUTPUT, NAT, "-o", "lo", "-s", "::6/128", "-j", "RETURN")
    for owner, ids, setting in (("--uid-owner", cfg.proxy_uid, UID), ("--gid-owner", cfg.proxy_gid, GID)):
        for owner_id in split(ids):
            b.append_v6(ISTIO_OUTPUT, NAT, "-o", "lo", "!", "-d", "::1/128", "-m", "owner", owner, owner_id,
                        "-j", ISTIO_IN_REDIRECT, setting=setting)
            b.append_v6(ISTIO_OUTPUT, NAT, "-o", "lo", "-m", "owner", "!", owner, owner_id, "-j", "RETURN",
                        setting=setting)
            b.append_v6(ISTIO_OUTPUT, NAT, "-m", "owner", owner, owner_id, "-j", "RETURN", setting=setting)
    b.append_v6(ISTIO_OUTPUT, NAT, "-d", "::1/128", "-j", "RETURN")
    for cidr in ex6.ip_nets:
        b.append_v6(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", "RETURN", setting=CIDR_EXCLUDE)
    interfaces = split(cfg.kubevirt_interfaces)
    if in6.is_wildcard:
        b.append_v6(ISTIO_OUTPUT, NAT, "-j", ISTIO_REDIRECT, setting=CIDR_IN)
        for interface in interfaces:  # RETURN here, where IPv4 jumps to ISTIO_REDIRECT
            b.insert_v6("PREROUTING", NAT, 1, "-i", interface, "-j", "RETURN", setting=KUBEVIRT)
    elif in6.ip_nets:
        for cidr in in6.ip_nets:
            for interface in interfaces:
                b.insert_v6("PREROUTING", NAT, 1, "-i", interface, "-d", cidr, "-j", ISTIO_REDIRECT, setting=KUBEVIRT)
            b.append_v6(ISTIO_OUTPUT, NAT, "-d", cidr, "-j", ISTIO_REDIRECT, setting=CIDR_IN)
        b.append_v6(ISTIO_OUTPUT, NAT, "-j", "RETURN", setting=CIDR_IN)
