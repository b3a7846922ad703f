"""The capture plan in parts (inbound; outbound TCP + DNS), each on or off, and the policies of ISTIO_VM_CAPTURE.

`plan_with(plan, on)` keeps every rule of the full plan except the jumps of a part that is off, so
with every part on it returns the plan itself (1.9's rules, byte for byte), and with a part off the
chains stay (unreferenced) and only what sends traffic to the proxy goes. Pure: the supervisor and
the capture helper switch parts by installing `plan_with(...)` with the apply engine.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from istio_vm.iptables.names import AGENT_DNS_PORT, ISTIO_INBOUND, ISTIO_REDIRECT

if TYPE_CHECKING:  # `istio-vm start` imports this module before the proxy's spawn, the rules after it
    from istio_vm.iptables.rules import Plan, Rule


class Part(enum.StrEnum):
    INBOUND = "inbound"  # PREROUTING -> ISTIO_INBOUND (nat, or mangle in TPROXY mode)
    OUTBOUND = "outbound"  # every jump to ISTIO_REDIRECT (OUTPUT, kubevirt PREROUTING) and the DNS REDIRECTs


ALL_PARTS = frozenset(Part)


class CapturePolicy(enum.StrEnum):
    """ISTIO_VM_CAPTURE: what happens to capture while no epoch of the proxy is ready."""

    FAIL_CLOSED = "fail-closed"  # everything stays captured (refused while the proxy is down)
    OUTBOUND_FAIL_OPEN = "outbound-fail-open"  # outbound TCP and DNS lifted; inbound stays
    FAIL_OPEN = "fail-open"  # everything lifted

    @property
    def follows_proxy(self) -> frozenset[Part]:
        """The parts that are on only while an epoch is ready."""
        return {CapturePolicy.FAIL_CLOSED: frozenset(), CapturePolicy.OUTBOUND_FAIL_OPEN: frozenset({Part.OUTBOUND}),
                CapturePolicy.FAIL_OPEN: ALL_PARTS}[self]

    def parts(self, *, proxy_ready: bool) -> frozenset[Part]:
        """The parts that should be on now."""
        return ALL_PARTS if proxy_ready else ALL_PARTS - self.follows_proxy


def part_of(rule: Rule) -> Part | None:
    """The part whose switch this rule is, or None for a rule that stays whatever is on.

    Only jumps are switched: the rules inside Istio's chains, the exemptions of the proxy's own
    traffic and the TPROXY marks stay, harmless once nothing jumps to them.
    """
    if rule.target == ISTIO_REDIRECT:
        return Part.OUTBOUND
    if rule.target == "REDIRECT" and rule.target_args[1:] == (AGENT_DNS_PORT,):
        return Part.OUTBOUND  # DNS to the agent's 15053, TCP (ISTIO_OUTPUT) and UDP (OUTPUT)
    if rule.chain == "PREROUTING" and rule.target == ISTIO_INBOUND:
        return Part.INBOUND
    return None


def plan_with(plan: Plan, on: frozenset[Part]) -> Plan:
    """The plan with only the parts in `on` switched on; `plan` itself when every part is on."""
    if on >= ALL_PARTS:
        return plan

    def keep(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        return tuple(r for r in rules if (part := part_of(r)) is None or part in on)

    return plan._replace(v4=keep(plan.v4), v6=keep(plan.v6))


def describe_parts(on: frozenset[Part]) -> str:
    """The capture state in words, for STATUS= and the journal: "all", "inbound only", "none"."""
    if on >= ALL_PARTS:
        return "all"
    if not on:
        return "none"
    return " and ".join(sorted(on)) + " only"
