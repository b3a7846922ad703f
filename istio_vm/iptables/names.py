"""Istio's names for the capture rules: tables, chains, the ports it hard-codes (its constants.go).

One home for what istio-iptables 1.9.4 keeps in tools/istio-iptables/pkg/constants/constants.go,
plus the kernel's built-in chains and the two families, so the plan, the parsers of saved rules, the
explanations and the diagrams all agree on them.
"""

from __future__ import annotations

NAT, MANGLE = "nat", "mangle"
TABLES = (NAT, MANGLE)  # the tables Istio writes; filter and raw are never touched. 1.9 wrote them in
#                         Go's random map order; istio-vm always writes nat, then mangle.
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

PREFIX = "ISTIO_"  # every chain Istio creates starts with it (constants.go: ISTIOINBOUND and so on)
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"

DNS_PORT = "53"
AGENT_DNS_PORT = "15053"  # the agent's DNS proxy; hard-coded in 1.9

FAMILIES = (4, 6)
COMMAND = {4: "iptables", 6: "ip6tables"}  # what 1.9 ran per family (command mode)
