"""istio_vm.iptables.parts: the plan in parts, and ISTIO_VM_CAPTURE's policies."""

from __future__ import annotations

import pytest

from istio_vm.config.model import Capture
from istio_vm.iptables.parts import ALL_PARTS, CapturePolicy, Part, describe_parts, part_of, plan_with
from istio_vm.iptables.plan import build_plan
from istio_vm.iptables.rules import Plan
from tests.helpers import DATA

REFERENCE = DATA / "reference-vm"
IN, OUT = frozenset({Part.INBOUND}), frozenset({Part.OUTBOUND})
CAPTURES = {
    "reference": Capture(proxy_uid="997", proxy_gid="997", redirect_dns=True, dns_servers_v4=("10.10.10.6",),
                         inbound_ports_include="8080", outbound_ip_ranges_include="*"),
    "tproxy": Capture(inbound_interception_mode="TPROXY", inbound_ports_include="*", outbound_ip_ranges_include="*"),
    "kubevirt-ipv6": Capture(kubevirt_interfaces="eth1", enable_inbound_ipv6=True, inbound_ports_include="*",
                             outbound_ip_ranges_include="10.0.0.0/8,fd00::/64", outbound_ports_include="9000"),
}


def reference_plan() -> Plan:
    return Plan.from_restore((REFERENCE / "expected-v4.restore").read_text(),
                             (REFERENCE / "expected-v6.restore").read_text())


def lines(plan: Plan, family: int = 4) -> list[str]:
    return [" ".join(r.params) for r in plan.rules(family)]


@pytest.mark.parametrize("name", CAPTURES)
def test_everything_in_is_the_plan_itself(name: str) -> None:
    plan = build_plan(CAPTURES[name])
    assert plan_with(plan, ALL_PARTS) is plan
    assert plan_with(plan, ALL_PARTS).restore(4) == plan.restore(4)


def test_reference_vm_parts_remove_exactly_the_jumps() -> None:
    plan = reference_plan()
    full = lines(plan)
    inbound_only = lines(plan_with(plan, IN))
    assert sorted(set(full) - set(inbound_only)) == [
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "-A ISTIO_OUTPUT -p tcp --dport 53 -d 10.10.10.6/32 -j REDIRECT --to-ports 15053",
        "-A OUTPUT -p udp --dport 53 -d 10.10.10.6/32 -j REDIRECT --to-port 15053",
    ]
    assert [line for line in full if line in inbound_only] == inbound_only  # order kept
    outbound_only = lines(plan_with(plan, OUT))
    assert set(full) - set(outbound_only) == {"-A PREROUTING -p tcp -j ISTIO_INBOUND"}
    none = lines(plan_with(plan, frozenset()))
    assert set(full) - set(none) == (set(full) - set(inbound_only)) | (set(full) - set(outbound_only))
    # The chains stay declared, so a part switched back on is one restore of the same shape.
    assert plan_with(plan, frozenset()).restore(4).count("-N ") == plan.restore(4).count("-N ")


def test_tproxy_inbound_off_removes_the_mangle_jump_and_keeps_the_marks() -> None:
    plan = build_plan(CAPTURES["tproxy"])
    off = plan_with(plan, OUT)
    removed = [r for r in plan.v4 if r not in off.v4]
    assert [(r.table, " ".join(r.params)) for r in removed] == [("mangle", "-A PREROUTING -p tcp -j ISTIO_INBOUND")]
    assert off.ip_commands == plan.ip_commands


def test_kubevirt_and_ipv6_outbound_jumps_are_outbound() -> None:
    plan = build_plan(CAPTURES["kubevirt-ipv6"])
    removed = {(r.family, " ".join(r.params)) for r in (*plan.v4, *plan.v6)} - {
        (r.family, " ".join(r.params)) for r in (*plan_with(plan, IN).v4, *plan_with(plan, IN).v6)}
    assert removed == {
        (4, "-I PREROUTING 1 -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT"),
        (4, "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT"),
        (4, "-A ISTIO_OUTPUT -p tcp --dport 9000 -j ISTIO_REDIRECT"),
        (6, "-I PREROUTING 1 -i eth1 -d fd00::/64 -j ISTIO_REDIRECT"),
        (6, "-A ISTIO_OUTPUT -d fd00::/64 -j ISTIO_REDIRECT"),
    }
    assert {part_of(r) for r in plan.v6 if r.chain == "PREROUTING" and r.target == "ISTIO_INBOUND"} == {Part.INBOUND}


@pytest.mark.parametrize(("policy", "down"), [
    ("fail-closed", ALL_PARTS), ("outbound-fail-open", IN), ("fail-open", frozenset())])
def test_policies(policy: str, down: frozenset[Part]) -> None:
    p = CapturePolicy(policy)
    assert p.parts(proxy_ready=True) == ALL_PARTS
    assert p.parts(proxy_ready=False) == down
    assert p.follows_proxy == ALL_PARTS - down


def test_describe_parts() -> None:
    assert [describe_parts(s) for s in (ALL_PARTS, IN, OUT, frozenset())] == [
        "all", "inbound only", "outbound only", "none"]
