"""The 30 vectors transcribed from Istio 1.9.4's unit tests, each against the matching part of istio_vm.iptables.plan.

Full runs go through build_plan(); vectors that call one of Istio's internal steps call the same
step here on a fresh Builder, and, where the vector's note says it is equivalent, are also found as
an ordered subsequence of a full plan.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from istio_vm.config.model import Capture
from istio_vm.iptables import plan as p
from istio_vm.iptables.plan import NetworkRange, build_plan, separate_v4_v6
from istio_vm.iptables.rules import Builder, Plan
from tests.helpers import DATA

VECTORS: list[dict[str, Any]] = json.loads((DATA / "istio-1.9-iptables-vectors.json").read_text())["vectors"]
BY_NAME = {v["name"]: v for v in VECTORS}

FIELDS = {  # Go's Config field -> Capture field (DryRun and RestoreFormat do not change the rules)
    "ProxyPort": "proxy_port",
    "InboundCapturePort": "inbound_capture_port",
    "InboundTunnelPort": "inbound_tunnel_port",
    "ProxyUID": "proxy_uid",
    "ProxyGID": "proxy_gid",
    "InboundInterceptionMode": "inbound_interception_mode",
    "InboundTProxyMark": "inbound_tproxy_mark",
    "InboundTProxyRouteTable": "inbound_tproxy_route_table",
    "InboundPortsInclude": "inbound_ports_include",
    "InboundPortsExclude": "inbound_ports_exclude",
    "OutboundPortsInclude": "outbound_ports_include",
    "OutboundPortsExclude": "outbound_ports_exclude",
    "OutboundIPRangesInclude": "outbound_ip_ranges_include",
    "OutboundIPRangesExclude": "outbound_ip_ranges_exclude",
    "KubevirtInterfaces": "kubevirt_interfaces",
    "EnableInboundIPv6": "enable_inbound_ipv6",
    "RedirectDNS": "redirect_dns",
    "DNSServersV4": "dns_servers_v4",
    "DNSServersV6": "dns_servers_v6",
}
IGNORED = {"DryRun", "RestoreFormat"}


def capture_of(vector: dict[str, Any]) -> Capture:
    effective = vector["config"]["effective"]
    assert set(effective) == set(FIELDS) | IGNORED, "a Go field this test does not map"
    values: dict[str, Any] = {}
    for go_name, name in FIELDS.items():
        value = effective[go_name]
        values[name] = tuple(value or ()) if name.startswith("dns_servers") else value
    return Capture(**values)


def network_range(data: dict[str, Any]) -> NetworkRange:
    return NetworkRange(data["IsWildcard"], tuple(data["IPNets"]), data.get("HasLoopBackIP", False))


def lines(plan: Plan, output: str) -> list[str]:
    """BuildV4()/BuildV6() joined with spaces, as 1.9's FormatIptablesCommands."""
    family = 4 if output == "BuildV4" else 6
    return [" ".join(argv) for argv in plan.argv(family)]


def is_subsequence(needle: Sequence[str], haystack: Sequence[str]) -> bool:
    rest = iter(haystack)
    return all(any(item == candidate for candidate in rest) for item in needle)


def run_internal(vector: dict[str, Any]) -> Plan:
    cfg, args, b = capture_of(vector), vector["call_args"] or {}, Builder()
    call = vector["call"]
    if call == "shortCircuitKubeInternalInterface()":
        p._short_circuit_kube_internal_interface(b, cfg)
    elif call == "handleInboundPortsInclude()":
        p._handle_inbound_ports_include(b, cfg)
    elif call == "handleInboundIpv4Rules(ipv4RangesInclude)":
        p._handle_inbound_ipv4_rules(b, cfg, network_range(args["ipv4RangesInclude"]))
    elif call == "handleInboundIpv6Rules(ipv6RangesExclude, ipv6RangesInclude)":
        p._handle_inbound_ipv6_rules(b, cfg, network_range(args["ipv6RangesExclude"]),
                                     network_range(args["ipv6RangesInclude"]))
    else:
        raise AssertionError(f"unknown internal call {call}")
    return b.plan()


def equivalent_full_capture(vector: dict[str, Any]) -> Capture | None:
    """The configuration whose full run contains the fragment, or None where the vector is artificial."""
    cfg, args = capture_of(vector), vector["call_args"] or {}
    if "ipv4RangesInclude" in args:
        include = args["ipv4RangesInclude"]
        return cfg._replace(outbound_ip_ranges_include="*" if include["IsWildcard"] else ",".join(include["IPNets"]))
    if "ipv6RangesInclude" in args:
        # Only the empty case is reachable through the CLI: the others feed 10.0.0.0/8 to the IPv6 generator.
        empty = not any(args[k]["IsWildcard"] or args[k]["IPNets"] for k in ("ipv6RangesExclude", "ipv6RangesInclude"))
        return cfg if empty else None
    return cfg


def builder_of(vector: dict[str, Any]) -> Builder:
    b = Builder()
    for name, chain, table, *rest in vector["builder_calls"]:
        if name.startswith("Insert"):
            position, *params = rest
            b.insert(4 if name.endswith("V4") else 6, chain, table, position, *params)
        else:
            b.append(4 if name.endswith("V4") else 6, chain, table, *rest)
    return b


def test_thirty_vectors() -> None:
    assert len(VECTORS) == 30
    assert len(BY_NAME) == 30


@pytest.mark.parametrize("name", [v["name"] for v in VECTORS if v["expected_kind"] == "iptables-commands"])
def test_rule_vector(name: str) -> None:
    vector = BY_NAME[name]
    if vector["call"] == "run()":
        plan = build_plan(capture_of(vector))
        assert lines(plan, vector["output"]) == vector["expected"]
        return
    fragment = run_internal(vector)
    assert lines(fragment, vector["output"]) == vector["expected"]
    for extra in vector.get("additional_assertions") or ():
        assert lines(fragment, extra["output"]) == extra["expected"]
    full = equivalent_full_capture(vector)
    if full is not None:
        assert is_subsequence(vector["expected"], lines(build_plan(full), vector["output"]))


@pytest.mark.parametrize("name", [v["name"] for v in VECTORS if v["expected_kind"] == "builder-argv-lists"])
def test_builder_vector(name: str) -> None:
    vector = BY_NAME[name]
    plan = builder_of(vector).plan()
    for check in ({"output": vector["output"], "expected": vector["expected"],
                   "expected_joined": vector["expected_joined"]}, *vector["additional_assertions"]):
        family = 4 if check["output"] == "BuildV4" else 6
        assert [list(argv) for argv in plan.argv(family)] == check["expected"]
        joined = check.get("expected_joined", [" ".join(argv) for argv in check["expected"]])
        assert [" ".join(argv) for argv in plan.argv(family)] == joined


@pytest.mark.parametrize("name", [v["name"] for v in VECTORS if v["expected_kind"] == "restore-file-text"])
def test_restore_vector(name: str) -> None:
    vector = BY_NAME[name]
    family = 4 if vector["output"] == "BuildV4Restore" else 6
    assert Builder().plan().restore(family) == vector["expected"]


@pytest.mark.parametrize("name", [v["name"] for v in VECTORS if v["expected_kind"] == "separateV4V6-result"])
def test_separate_vector(name: str) -> None:
    vector = BY_NAME[name]
    v4, v6 = separate_v4_v6(vector["call_args"]["cidrList"])
    for actual, expected in ((v4, vector["expected"]["v4"]), (v6, vector["expected"]["v6"])):
        assert actual.is_wildcard == expected["IsWildcard"]
        if "IPNets" in expected:
            assert list(actual.ip_nets) == expected["IPNets"]
        if "HasLoopBackIP" in expected:
            assert actual.has_loopback_ip == expected["HasLoopBackIP"]


def test_every_vector_is_tested() -> None:
    kinds = {"iptables-commands", "builder-argv-lists", "restore-file-text", "separateV4V6-result"}
    assert {v["expected_kind"] for v in VECTORS} == kinds


def test_tproxy_inbound_runs_the_ip_commands_of_the_vector_note() -> None:
    vector = BY_NAME["TestHandleInboundPortsIncludeWithInboundPortsAndTproxy"]
    assert tuple(c.argv for c in run_internal(vector).ip_commands) == (
        ("ip", "-f", "inet", "rule", "add", "fwmark", "1337", "lookup", "133"),
        ("ip", "-f", "inet", "route", "add", "local", "default", "dev", "lo", "table", "133"),
    )
