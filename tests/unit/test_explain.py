"""`iptables explain`, the JSON and DOT formats, and the settings the rules are attributed to."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from istio_vm import cli
from istio_vm.config import load
from istio_vm.config.host import Host
from istio_vm.config.model import Capture, Config, ResolvConf, Shell
from istio_vm.config.resolve import build
from istio_vm.config.settings import BY_NAME
from istio_vm.iptables.dot import to_dot
from istio_vm.iptables.explain import CHAINS, describe, explain, render
from istio_vm.iptables.plan import build_plan
from istio_vm.iptables.rules import ALWAYS, Plan, Rule
from tests.helpers import DATA, EveryUser, fake_host, iptables_args

REFERENCE_ENV = {"ISTIO_INBOUND_PORTS": "8080", "ISTIO_LOCAL_EXCLUDE_PORTS": "15090,15021",
                 "ISTIO_SERVICE_CIDR": "*", "ISTIO_META_DNS_CAPTURE": "true", "ENABLE_INBOUND_IPV6": "false"}


def config_of(**shell: str) -> Config:
    """A Config built purely from variables (as if from cluster.env), nameserver 10.10.10.6, UID 997."""
    origins = dict.fromkeys(shell, "cluster.env:1")
    return build(Shell(shell, origins), Host(users=EveryUser()),
                 ResolvConf("/etc/resolv.conf", "nameserver 10.10.10.6\n"))


def explained(**shell: str) -> tuple[Plan, str]:
    config = config_of(**shell)
    plan = build_plan(config.capture)
    return plan, explain(plan, config)


def test_every_rule_appears_once_with_an_explanation_and_its_setting() -> None:
    plan, text = explained(**REFERENCE_ENV)
    lines = text.splitlines()
    for rule in plan.v4:
        index = lines.index(f"  {' '.join(rule.params)}")
        what, origin = lines[index + 1], lines[index + 2]
        assert what.startswith("      ")
        assert what.endswith(".")
        assert origin.startswith("      Set by: ")
        if rule.setting != ALWAYS:
            assert f"{rule.setting}=" in origin
    assert sum(line.startswith("  -") for line in lines) == len(plan.v4)


def test_wording_of_the_reference_plan() -> None:
    _, text = explained(**REFERENCE_ENV)
    assert ("  -A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT\n"
            "      TCP to port 8080: capture it for the proxy's inbound listener (ISTIO_IN_REDIRECT).\n"
            "      Set by: ISTIO_INBOUND_PORTS=8080 (cluster.env:1).\n") in text
    assert ("      UDP to port 53, to 10.10.10.6/32: rewrite its destination to local port 15053 (the agent's "
            "DNS proxy).\n      Set by: REDIRECT_DNS=true, derived from ISTIO_META_DNS_CAPTURE=true "
            "(cluster.env:1); the nameservers come from /etc/resolv.conf:1.\n") in text
    assert "Set by: PROXY_GID=997, derived from PROXY_UID=997, derived from ENVOY_USER=istio-proxy (default)." in text
    assert "Set by: nothing; this rule is always installed." in text
    assert "The proxy's own traffic is never captured again (no loop)." in text
    assert "None: IPv6 capture is off (ENABLE_INBOUND_IPV6=false)" in text
    assert text.index("IPv4 rules") < text.index("IPv6 rules") < text.index("Commands run before")
    for chain in ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "PREROUTING", "OUTPUT"):
        assert f"nat {chain}: {CHAINS['nat', chain]}\n" in text


def test_tproxy_chains_inserts_and_ip_commands_are_explained() -> None:
    _, text = explained(ISTIO_INBOUND_INTERCEPTION_MODE="TPROXY", ISTIO_INBOUND_PORTS="8080,9090",
                        ISTIO_INBOUND_TPROXY_MARK="7", ENABLE_INBOUND_IPV6="false")
    for chain in ("ISTIO_INBOUND", "ISTIO_DIVERT", "ISTIO_TPROXY", "PREROUTING", "OUTPUT"):
        assert f"mangle {chain}: {CHAINS['mangle', chain]}\n" in text
    assert text.index("nat ISTIO_INBOUND") < text.index("mangle ISTIO_DIVERT")
    assert "nat ISTIO_INBOUND: " + CHAINS["nat", "ISTIO_INBOUND"] + " Nothing jumps to it here" in text
    assert "nat ISTIO_REDIRECT: " + CHAINS["nat", "ISTIO_REDIRECT"] + " Nothing jumps to it here" in text  # no CIDR
    assert text.count("Nothing jumps to it") == 2
    assert ("TCP carrying packet mark 7: leave it alone (RETURN: not captured). Inserted at position 1, so it "
            "lands above the rules written before it.") in text
    assert ("deliver it to the socket listening on port 15006, destination kept, with packet mark 7/0xffffffff"
            in text)
    assert "  ip -f inet rule add fwmark 7 lookup 133\n" in text
    assert "ISTIO_INBOUND_TPROXY_MARK=7, ISTIO_INBOUND_TPROXY_ROUTE_TABLE=133." in text
    assert "  ip -f inet route add local default dev lo table 133\n" in text


def test_ipv6_section_and_address_command() -> None:
    plan, text = explained(ENABLE_INBOUND_IPV6="true", ISTIO_INBOUND_PORTS="*", KUBE_VIRT_INTERFACES="eth1")
    assert plan.v6
    ipv6 = text[text.index("IPv6 rules"):text.index("Commands run before")]
    assert "  -A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN\n" in ipv6
    assert "Traffic arriving on this interface is handled as outbound traffic (kubevirt)." in ipv6
    assert "SSH is always left alone when every inbound port is captured." in ipv6
    assert "  ip -6 addr add ::6/128 dev lo\n" in text
    assert "Set by: ENABLE_INBOUND_IPV6=true." in text


def test_explain_is_deterministic() -> None:
    assert explained(**REFERENCE_ENV)[1] == explained(**REFERENCE_ENV)[1]


@pytest.mark.parametrize(("params", "sentence"), [
    (("-A", "ISTIO_OUTPUT", "-o", "lo", "!", "-d", "127.0.0.1/32", "-m", "owner", "--gid-owner", "5", "-j",
      "ISTIO_IN_REDIRECT"),
     "Any packet in this chain leaving through lo, not to 127.0.0.1/32, sent by a process of group id 5: capture "
     "it for the proxy's inbound listener (ISTIO_IN_REDIRECT)."),
    (("-A", "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", "9", "-j", "CONNMARK", "--restore-mark"),
     "TCP on a connection marked 9: copy the connection's mark back onto the packet."),
    (("-I", "PREROUTING", "1", "-i", "eth0", "-d", "10.0.0.0/8", "-j", "ISTIO_REDIRECT"),
     "Any packet in this chain arriving on eth0, to 10.0.0.0/8: capture it for the proxy's outbound listener "
     "(ISTIO_REDIRECT)."),
    (("-A", "X", "-f", "foo"), "Any packet in this chain -f foo: no action."),
])
def test_describe(params: tuple[str, ...], sentence: str) -> None:
    assert describe(Rule(4, "nat", params[1], params)).startswith(sentence)


def test_every_rule_names_a_real_setting() -> None:
    capture = Capture(proxy_uid="1,2", inbound_interception_mode="TPROXY", inbound_ports_include="*",
                      inbound_ports_exclude="9000", outbound_ports_include="80", outbound_ports_exclude="81",
                      outbound_ip_ranges_include="10.0.0.0/8,fd00::/8", outbound_ip_ranges_exclude="10.1.0.0/16,"
                      "fd01::/16", kubevirt_interfaces="eth1", enable_inbound_ipv6=True, redirect_dns=True,
                      dns_servers_v4=("10.0.0.10",))
    plan = build_plan(capture)
    settings = {rule.setting for rule in (*plan.v4, *plan.v6)}
    assert settings - {ALWAYS} <= set(BY_NAME)
    assert settings >= {"INBOUND_TUNNEL_PORT", "ENVOY_PORT", "INBOUND_CAPTURE_PORT", "PROXY_UID", "PROXY_GID",
                        "ISTIO_INBOUND_INTERCEPTION_MODE", "ISTIO_INBOUND_TPROXY_MARK", "ISTIO_INBOUND_PORTS",
                        "ISTIO_LOCAL_EXCLUDE_PORTS", "ISTIO_OUTBOUND_PORTS", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
                        "ISTIO_SERVICE_CIDR", "ISTIO_SERVICE_EXCLUDE_CIDR", "KUBE_VIRT_INTERFACES", "REDIRECT_DNS",
                        ALWAYS}


def test_json_lists_every_rule_and_ip_command() -> None:
    plan = build_plan(Capture(inbound_ports_include="8080", enable_inbound_ipv6=True))
    data = json.loads(plan.to_json())
    assert set(data) == {"rules", "ip_commands"}
    assert len(data["rules"]) == len(plan.v4) + len(plan.v6)
    assert data["rules"][0] == {"family": 4, "table": "nat", "chain": "ISTIO_INBOUND",
                                "argv": ["-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15008", "-j", "RETURN"],
                                "setting": "INBOUND_TUNNEL_PORT"}
    assert data["rules"][-1]["family"] == 6
    assert data["ip_commands"] == [["ip", "-6", "addr", "add", "::6/128", "dev", "lo"]]


def dot_of(**capture: object) -> str:
    return to_dot(build_plan(Capture(**capture)))  # type: ignore[arg-type]


def test_dot_structure_and_packet_paths() -> None:
    text = dot_of(proxy_uid="997", proxy_gid="997", inbound_ports_include="8080", outbound_ip_ranges_include="*",
                  redirect_dns=True, dns_servers_v4=("10.10.10.6",))
    assert text.startswith("digraph iptables {\n")
    assert text.endswith("}\n")
    assert text.count("{") == text.count("}")
    assert 'subgraph "cluster_v4"' in text
    assert "cluster_v6" not in text
    declared = set(re.findall(r'^    "([^"]+)" \[label=', text, re.MULTILINE))
    edges = re.findall(r'^    "([^"]+)" -> "([^"]+)"(.*);$', text, re.MULTILINE)
    assert {node for edge in edges for node in edge[:2]} <= declared
    pairs: dict[tuple[str, str], str] = {}
    for a, b, rest in edges:  # an edge per (source, destination, color): join the attributes
        pairs[a, b] = pairs.get((a, b), "") + rest
    for path in (("v4 prerouting", "v4 nat PREROUTING", "v4 nat ISTIO_INBOUND", "v4 nat ISTIO_IN_REDIRECT",
                  "v4 port 15006"),  # inbound
                 ("v4 output", "v4 nat OUTPUT", "v4 nat ISTIO_OUTPUT", "v4 nat ISTIO_REDIRECT", "v4 port 15001"),
                 ("v4 nat ISTIO_OUTPUT", "v4 not captured"),  # the proxy's own traffic, localhost
                 ("v4 nat OUTPUT", "v4 port 15053")):  # DNS over UDP
        for step in itertools.pairwise(path):
            assert step in pairs, step
    assert 'label="-p tcp --dport 8080"' in pairs["v4 nat ISTIO_INBOUND", "v4 nat ISTIO_IN_REDIRECT"]
    assert "color=blue" in pairs["v4 nat OUTPUT", "v4 port 15053"]
    assert "color=darkgreen" in pairs["v4 nat ISTIO_OUTPUT", "v4 not captured"]
    assert 'label="agent DNS :15053", shape=ellipse' in text


def test_dot_tproxy_and_ipv6() -> None:
    text = dot_of(inbound_interception_mode="TPROXY", inbound_ports_include="*", enable_inbound_ipv6=True)
    assert 'subgraph "cluster_v6"' in text
    assert '"v4 mangle ISTIO_INBOUND" -> "v4 mangle ISTIO_TPROXY"' in text
    assert '"v4 mangle ISTIO_TPROXY" -> "v4 tproxy 15006"' in text
    assert '"v4 mangle ISTIO_DIVERT" -> "v4 accepted"' in text
    assert '"v6 nat ISTIO_INBOUND" -> "v6 nat ISTIO_IN_REDIRECT"' in text


def test_render_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render(Plan(), "yaml")


@pytest.mark.parametrize("fmt", ["json", "dot", "commands"])
def test_cli_formats(fmt: str, clean_env: pytest.MonkeyPatch, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setattr(load, "read_host", fake_host)
    (tmp_path / "resolv.conf").write_text("nameserver 10.10.10.6\n")
    assert cli.main(iptables_args(tmp_path, DATA / "reference-vm" / "cluster.env", "plan", "--format", fmt)) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        assert len(json.loads(out)["rules"]) == 19
    elif fmt == "dot":
        assert out.startswith("digraph")
    else:
        assert out.splitlines()[0] == "iptables -t nat -N ISTIO_INBOUND"
        assert len(out.splitlines()) == 4 + 19


def test_cli_explain(clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setattr(load, "read_host", fake_host)
    (tmp_path / "resolv.conf").write_text("nameserver 10.10.10.6\n")
    assert cli.main(iptables_args(tmp_path, DATA / "reference-vm" / "cluster.env", "explain")) == 0
    out = capsys.readouterr().out
    assert out.startswith("What istio-vm installs")
    assert "Set by: ISTIO_INBOUND_PORTS=8080 (" in out
    assert "cluster.env:2)." in out
