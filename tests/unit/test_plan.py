"""istio_vm.iptables.plan beyond Istio's own vectors: separateV4V6 as Go parses, the renderings, and the
asymmetries of 1.9.4's run() a re-implementation is likely to get wrong."""

from __future__ import annotations

import pytest

from istio_vm.config.model import Capture
from istio_vm.iptables.plan import NetworkRange, build_plan, separate_v4_v6
from istio_vm.iptables.rules import Builder, Plan

DNS = Capture(proxy_uid="997", proxy_gid="997", redirect_dns=True, dns_servers_v4=("10.10.10.6",))


def rules(plan: Plan, family: int = 4) -> list[str]:
    return [" ".join(rule.params) for rule in plan.rules(family)]


@pytest.mark.parametrize(("text", "v4", "v6"), [
    ("", NetworkRange(), NetworkRange()),
    ("10.1.2.3/8,,172.16.0.1/12", NetworkRange(False, ("10.0.0.0/8", "172.16.0.0/12")), NetworkRange()),
    ("127.0.0.1/32", NetworkRange(False, ("127.0.0.1/32",), True), NetworkRange()),
    ("::1/128,fd00:0:0:0:0:0:0:1/64", NetworkRange(), NetworkRange(False, ("::1/128", "fd00::/64"), True)),
    ("1:0:0:1:0:0:0:1/128", NetworkRange(), NetworkRange(False, ("1:0:0:1::1/128",))),  # longest zero run
    ("2001:DB8::/32", NetworkRange(), NetworkRange(False, ("2001:db8::/32",))),
    # Go files an IPv4-mapped address under IPv4 and prints a mapped network in dotted form.
    ("::ffff:10.1.0.0/112", NetworkRange(False, ("10.1.0.0/16",)), NetworkRange()),
    ("::ffff:127.0.0.1/128", NetworkRange(False, ("127.0.0.1/32",), True), NetworkRange()),
    # What Go's ParseCIDR rejects is skipped, as 1.9 did: netmasks, zones, bare addresses, '*' in a list.
    ("10.0.0.0/255.0.0.0,fe80::1%eth0/64,10.0.0.1,*,10.0.0.0/33", NetworkRange(), NetworkRange()),
])
def test_separate_v4_v6_as_go(text: str, v4: NetworkRange, v6: NetworkRange) -> None:
    assert separate_v4_v6(text) == (v4, v6)


def test_restore_orders_tables_nat_then_mangle_and_declares_chains_per_table() -> None:
    b = Builder()
    b.append_v4("ISTIO_DIVERT", "mangle", "-j", "ACCEPT")
    b.append_v4("PREROUTING", "mangle", "-p", "tcp", "-j", "ISTIO_INBOUND")
    b.append_v4("ISTIO_INBOUND", "mangle", "-j", "RETURN")
    b.insert_v4("ISTIO_INBOUND", "nat", 1, "-j", "RETURN")
    assert b.plan().restore(4) == (
        "* nat\n-N ISTIO_INBOUND\n-I ISTIO_INBOUND 1 -j RETURN\nCOMMIT\n"
        "* mangle\n-N ISTIO_DIVERT\n-N ISTIO_INBOUND\n-A ISTIO_DIVERT -j ACCEPT\n"
        "-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A ISTIO_INBOUND -j RETURN\nCOMMIT\n")
    assert b.plan().commands()[:3] == ["iptables -t mangle -N ISTIO_DIVERT", "iptables -t mangle -N ISTIO_INBOUND",
                                       "iptables -t nat -N ISTIO_INBOUND"]
    assert b.plan().restore(6) == ""


def test_commands_are_ipv4_then_ipv6_then_ip_commands() -> None:
    plan = build_plan(Capture(enable_inbound_ipv6=True))
    lines = plan.commands()
    assert lines[-1] == "ip -6 addr add ::6/128 dev lo"
    first_v6 = next(i for i, line in enumerate(lines) if line.startswith("ip6tables"))
    assert all(line.startswith("iptables ") for line in lines[:first_v6])
    assert all(line.startswith("ip6tables ") for line in lines[first_v6:-1])


def test_family_must_be_4_or_6() -> None:
    with pytest.raises(ValueError, match="family"):
        Plan().restore(5)


def test_wildcard_exclude_is_refused_as_1_9_panicked() -> None:
    with pytest.raises(ValueError, match="OUTBOUND_IP_RANGES_EXCLUDE"):
        build_plan(Capture(outbound_ip_ranges_exclude="*"))


def test_gid_redirect_never_excludes_port_53_and_udp_uses_to_port() -> None:
    lines = rules(build_plan(DNS))
    assert "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 997 -j ISTIO_IN_REDIRECT" in lines
    assert "-A ISTIO_OUTPUT -p tcp --dport 53 -d 10.10.10.6/32 -j REDIRECT --to-ports 15053" in lines
    assert lines[-1] == "-A OUTPUT -p udp --dport 53 -d 10.10.10.6/32 -j REDIRECT --to-port 15053"


def test_dns_tcp_comes_before_localhost_return_and_udp_after_everything_even_ipv6() -> None:
    plan = build_plan(Capture(redirect_dns=True, dns_servers_v4=("10.0.0.2",), outbound_ip_ranges_include="*",
                              enable_inbound_ipv6=True, outbound_ports_exclude="25"))
    lines = rules(plan)
    assert lines.index("-A ISTIO_OUTPUT -p tcp --dport 25 -j RETURN") < lines.index(
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN")
    assert lines.index("-A ISTIO_OUTPUT -p tcp --dport 53 -d 10.0.0.2/32 -j REDIRECT --to-ports 15053") \
        < lines.index("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")
    assert lines[-3:] == ["-A OUTPUT -p udp --dport 53 -m owner --uid-owner 1337 -j RETURN",
                          "-A OUTPUT -p udp --dport 53 -m owner --gid-owner 1337 -j RETURN",
                          "-A OUTPUT -p udp --dport 53 -d 10.0.0.2/32 -j REDIRECT --to-port 15053"]
    assert not any("53" in line for line in rules(plan, 6))  # no IPv6 DNS capture in 1.9


def test_ipv6_has_no_tproxy_and_no_outbound_port_include() -> None:
    plan = build_plan(Capture(inbound_interception_mode="TPROXY", inbound_ports_include="8080",
                              outbound_ports_include="5432", enable_inbound_ipv6=True))
    assert {rule.table for rule in plan.v6} == {"nat"}
    assert "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT" in rules(plan, 6)
    assert "-A ISTIO_OUTPUT -p tcp --dport 5432 -j ISTIO_REDIRECT" in rules(plan, 4)
    assert not any("5432" in line for line in rules(plan, 6))
    assert tuple(c.argv for c in plan.ip_commands) == (
        ("ip", "-6", "addr", "add", "::6/128", "dev", "lo"),
        ("ip", "-f", "inet", "rule", "add", "fwmark", "1337", "lookup", "133"),
        ("ip", "-f", "inet", "route", "add", "local", "default", "dev", "lo", "table", "133"))


def test_loopback_include_drops_the_not_owner_returns_in_ipv4_only() -> None:
    plan = build_plan(Capture(outbound_ip_ranges_include="::1/128", enable_inbound_ipv6=True))
    assert not any("! --uid-owner" in line or "! --gid-owner" in line for line in rules(plan, 4))
    assert "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN" in rules(plan, 6)
    assert "-A ISTIO_OUTPUT -d ::1/128 -j ISTIO_REDIRECT" in rules(plan, 6)
    assert rules(plan, 4)[-1] == "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"  # only an IPv6 CIDR: no IPv4 tail


def test_exclusions_only_apply_to_the_wildcard_and_port_22_only_there() -> None:
    listed = rules(build_plan(Capture(inbound_ports_include="8080", inbound_ports_exclude="9000")))
    assert not any("9000" in line or "--dport 22" in line for line in listed)
    everything = rules(build_plan(Capture(inbound_ports_include="*", inbound_ports_exclude="9000")))
    assert everything.index("-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN") < everything.index(
        "-A ISTIO_INBOUND -p tcp --dport 9000 -j RETURN")


def test_tproxy_without_inbound_ports_keeps_connmark_rules_and_runs_no_ip_command() -> None:
    plan = build_plan(Capture(inbound_interception_mode="TPROXY"))
    assert [line for line in rules(plan) if "1337" in line and "owner" not in line] == [
        "-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
        "-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
        "-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN"]
    assert plan.ip_commands == ()


def test_the_plan_takes_the_cidrs_as_validation_parsed_them() -> None:
    """Each CIDR is parsed once (checks.go_cidr, cached): validating ISTIO_SERVICE_EXCLUDE_CIDR, then the plan."""
    from istio_vm.config.checks import cidr_list, go_cidr

    text = ",".join(f"10.77.{i}.0/24" for i in range(200)) + ",fd77::/64"
    assert cidr_list(wildcard=False)(text) is None
    misses = go_cidr.cache_info().misses
    plan = build_plan(Capture(outbound_ip_ranges_exclude=text, outbound_ip_ranges_include="*",
                              enable_inbound_ipv6=True))
    assert go_cidr.cache_info().misses == misses  # no CIDR parsed a second time
    assert "-A ISTIO_OUTPUT -d 10.77.199.0/24 -j RETURN" in plan.restore(4)
    assert "-A ISTIO_OUTPUT -d fd77::/64 -j RETURN" in plan.restore(6)
