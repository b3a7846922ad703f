"""`iptables trace` over the plan: verdicts, reasons and origins, flows from words, foreign and unknown rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from istio_vm import cli
from istio_vm.errors import ExitStatus
from istio_vm.iptables import commands, explain
from istio_vm.iptables.plan import build_plan
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import Completed
from istio_vm.iptables.trace import (
    FlowError,
    HostView,
    Tracer,
    make_flow,
    parse_flow_line,
    tracer_for_plan,
    tracer_for_saves,
)
from tests.fakes import FakeRunner
from tests.helpers import DATA, iptables_args, text
from tests.unit.test_explain import REFERENCE_ENV, config_of

HOST = HostView(frozenset({"10.10.10.20", "fd00::20"}), "eth0", sources={4: "10.10.10.20", 6: "fd00::20"})


def reference() -> Tracer:
    config = config_of(**REFERENCE_ENV)
    return tracer_for_plan(build_plan(config.capture), HOST, lambda rule: explain.origin(rule, config))


def restored(name: str, v6: str = "") -> Tracer:
    return tracer_for_plan(Plan.from_restore(text(name), text(v6) if v6 else ""), HOST)


@pytest.mark.parametrize(("words", "verdict", "port"), [
    ("inbound tcp 10.10.10.20:8080", "redirect", 15006),
    ("inbound tcp 10.10.10.20:15008", "not-captured", 15008),
    ("inbound tcp 10.10.10.20:9999", "not-captured", 9999),  # only ISTIO_INBOUND_PORTS are captured
    ("inbound udp 10.10.10.20:8080", "not-captured", 8080),
    ("outbound tcp 192.0.2.7:80", "redirect", 15001),
    ("outbound tcp 192.0.2.7:80 --uid 997", "not-captured", 80),  # the proxy's own
    ("outbound tcp 192.0.2.7:80 --gid 997", "not-captured", 80),
    ("outbound udp 10.10.10.6:53", "redirect", 15053),
    ("outbound udp 10.10.10.6:53 --uid 997", "not-captured", 53),
    ("outbound tcp 10.10.10.6:53", "redirect", 15053),
    ("outbound tcp 10.10.10.6:53 --uid 997", "not-captured", 53),
    ("outbound udp 192.0.2.7:53", "not-captured", 53),  # not the nameserver
    ("outbound tcp 127.0.0.1:8080", "not-captured", 8080),
    ("outbound tcp 10.10.10.20:8080", "not-captured", 8080),  # app to app on this host
    ("outbound tcp 10.10.10.20:8080 --uid 997", "redirect", 15006),  # the proxy to this host's address
    ("outbound tcp 127.0.0.1:8080 --src 127.0.0.6 --uid 997", "not-captured", 8080),  # passthrough
    ("outbound tcp [2001:db8::7]:80", "not-captured", 80),  # IPv6 capture is off
])
def test_reference_vm_verdicts(words: str, verdict: str, port: int) -> None:
    result = reference().trace(parse_flow_line(words))
    assert (result.verdict, result.port) == (verdict, port), result.text()
    assert result.captured is (verdict == "redirect")


def test_text_names_rules_reasons_settings_and_the_verdict() -> None:
    result = reference().trace(parse_flow_line("inbound tcp 10.10.10.20:8080"))
    out = result.text()
    assert "nat ISTIO_INBOUND rule 1: -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN" in out
    assert "did not match: its destination port is 8080" in out
    assert "Set by: ISTIO_INBOUND_PORTS=8080 (cluster.env:1)" in out
    assert out.endswith("captured: redirected to 15006 (the proxy's inbound listener) by nat ISTIO_IN_REDIRECT "
                        "rule 1\n")
    assert result.rule == "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"
    outbound = reference().trace(parse_flow_line("outbound tcp 192.0.2.7:80 --uid 997")).text()
    assert "matched: Any packet in this chain sent by a process of user id 997" in outbound


def test_json_schema() -> None:
    data = json.loads(reference().trace(parse_flow_line("outbound udp 10.10.10.6:53")).to_json())
    assert {k: data[k] for k in ("captured", "verdict", "port")} == {"captured": True, "verdict": "redirect",
                                                                    "port": 15053}
    assert data["rule"] == "-A OUTPUT -p udp --dport 53 -d 10.10.10.6/32 -j REDIRECT --to-port 15053"
    assert data["steps"][-1]["matched"] is True
    assert {"table", "chain", "number", "reason"} <= set(data["steps"][0])


def test_tproxy_inbound_and_loopback_reentry() -> None:
    tracer = restored("tproxy/v4.restore")
    inbound = tracer.trace(parse_flow_line("inbound tcp 10.10.10.20:8080"))
    assert (inbound.verdict, inbound.port, inbound.table) == ("tproxy", 15006, "mangle")
    assert tracer.trace(parse_flow_line("inbound tcp 10.10.10.20:80")).verdict == "not-captured"
    # nat lets app-to-app traffic on lo through, but mangle PREROUTING sees it again when it comes back in on lo
    local = tracer.trace(parse_flow_line("outbound tcp 10.10.10.20:8080"))
    assert local.verdict == "tproxy"
    assert any(s.chain == "PREROUTING" for s in local.steps)


def test_ipv6_plan() -> None:
    tracer = restored("ipv6/v4.restore", "ipv6/v6.restore")
    assert tracer.trace(parse_flow_line("outbound tcp [2001:db8::7]:80")).verdict == "redirect"


def test_inbound_all_and_kubevirt() -> None:
    inbound_all = restored("inbound-all/v4.restore")
    assert inbound_all.trace(parse_flow_line("inbound tcp 10.10.10.20:22")).verdict == "not-captured"
    assert inbound_all.trace(parse_flow_line("inbound tcp 10.10.10.20:1234")).port == 15006


FOREIGN = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -p tcp --dport 7000 -j RETURN
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -p tcp -m statistic --mode random --probability 0.5 -j RETURN
-A OUTPUT -p tcp -j ISTIO_REDIRECT
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8081 -j DNAT --to-destination 172.17.0.2:80
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
*mangle
:PREROUTING DROP [0:0]
-A PREROUTING -i eth0 -p udp -j ACCEPT
COMMIT
"""


def test_live_foreign_rules_unknown_and_policies() -> None:
    tracer = tracer_for_saves({4: FOREIGN}, HOST)
    user_return = tracer.trace(parse_flow_line("outbound tcp 192.0.2.7:7000"))
    assert user_return.verdict == "not-captured"
    assert user_return.steps[0].origin == "not installed by istio-vm"
    unknown = tracer.trace(parse_flow_line("outbound tcp 192.0.2.7:80"))
    assert unknown.captured is None
    assert "-m statistic" in unknown.sentence
    assert unknown.rule == "-A OUTPUT -p tcp -m statistic --mode random --probability 0.5 -j RETURN"
    assert tracer.trace(parse_flow_line("outbound udp 192.0.2.7:80")).verdict == "not-captured"
    dnat = tracer.trace(parse_flow_line("outbound tcp 10.10.10.20:8081"))
    assert dnat.verdict == "unknown"
    assert "DNAT" in dnat.sentence
    assert tracer.trace(parse_flow_line("inbound tcp 10.10.10.20:8081")).verdict == "dropped"  # mangle policy
    assert tracer.trace(parse_flow_line("inbound udp 10.10.10.20:8081")).verdict == "not-captured"
    unreadable = tracer.trace(parse_flow_line("outbound tcp [2001:db8::1]:80"))  # no IPv6 save
    assert (unreadable.captured, unreadable.sentence) == (None, "unknown: the IPv6 rules could not be read")


@pytest.mark.parametrize(("words", "named"), [
    ("sideways tcp 1.2.3.4:80", "direction"), ("inbound sctp 1.2.3.4:80", "protocol"),
    ("inbound tcp 1.2.3:80", "'1.2.3'"), ("inbound tcp 1.2.3.4:0", "'0'"), ("inbound tcp 1.2.3.4", "no port"),
    ("inbound tcp 1.2.3.4:80 --src ::1", "family"), ("outbound tcp 1.2.3.4:80 --uid x", "--uid"),
    ("outbound tcp [::1:80", r"not \[ADDR\]:PORT"), ("outbound tcp 1.2.3.4:80 --bogus 1", "--bogus"),
])
def test_bad_flows_name_the_word(words: str, named: str) -> None:
    with pytest.raises(FlowError, match=named):
        parse_flow_line(words)


def test_make_flow_defaults() -> None:
    flow = make_flow("outbound", "udp", "[fd00::1]:53", src="[fd00::2]:1000", uid="5")
    assert (flow.family, flow.dst, flow.dport, flow.src, flow.sport, flow.uid, flow.gid) == \
        (6, "fd00::1", 53, "fd00::2", 1000, 5, 0)


def test_kubevirt_interface_is_handled_as_outbound() -> None:
    tracer = restored("kubevirt-1.9/v4.restore")
    result = tracer.trace(parse_flow_line("inbound tcp 10.0.2.2:80 --iface eth1"))
    assert (result.verdict, result.port) == ("redirect", 15001), result.text()
    assert result.steps[0].rule == "-A PREROUTING -i eth1 -j ISTIO_REDIRECT"  # the last -I 1 is first


def test_cli_trace_text_json_flows_and_bad_words(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(DATA / "reference-vm" / "resolv.conf", tmp_path / "resolv.conf")
    env = DATA / "reference-vm" / "cluster.env"
    assert cli.main(iptables_args(tmp_path, env, "trace", "outbound", "udp", "10.10.10.6:53")) == 0
    assert capsys.readouterr().out.endswith("captured: redirected to 15053 (the agent's DNS proxy) by nat OUTPUT "
                                            "rule 4\n")
    flows = tmp_path / "flows"
    flows.write_text("# a comment\noutbound tcp 192.0.2.1:80\n\ninbound tcp [fd00::1]:8080\n")
    assert cli.main(iptables_args(tmp_path, env, "trace", "--json", "--flows", str(flows))) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["captured"], d["verdict"], d["port"]) for d in lines] == [(True, "redirect", 15001),
                                                                         (False, "not-captured", 8080)]
    flows.write_text("outbound tcp 192.0.2.1:80\noutbound tcp 192.0.2.1:99999\n")
    assert cli.main(iptables_args(tmp_path, env, "trace", "--flows", str(flows))) == ExitStatus.USAGE == 64
    assert capsys.readouterr().err.endswith(f"istio-vm: error: {flows}:2: DST: '99999' is not a port "
                                            "(1-65535)\n")
    bad_uid = iptables_args(tmp_path, env, "trace", "inbound", "tcp", "10.0.0.1:80", "--uid", "x")
    assert cli.main(bad_uid) == ExitStatus.USAGE
    assert "--uid: 'x'" in capsys.readouterr().err


def test_live_tracer_reads_the_backend_saves_and_routes() -> None:
    fake = FakeRunner(saves={"iptables-nft-save": FOREIGN})
    fake.handlers.append(lambda a, i: Completed(a, 0, "192.0.2.7 via 10.0.0.1 dev ens5 src 10.0.0.5 uid 0\n")
                         if a[:3] == ("ip", "route", "get") else None)
    config = config_of(**REFERENCE_ENV, ISTIO_IPTABLES_BACKEND="nft", ISTIO_VM_RUN_DIR="/nonexistent/run")
    tracer = commands.tracer(config, live=True, runner=fake)
    result = tracer.trace(parse_flow_line("outbound tcp 192.0.2.7:7000"))
    assert result.verdict == "not-captured"
    assert ("ip", "route", "get", "192.0.2.7") in fake.argvs
    assert fake.argvs[:2] == [("iptables-nft-save",), ("ip6tables-nft-save",)]
    origins = {r.saved.line: r.origin for rules in tracer.rulesets[4].chains.values() for r in rules}
    assert origins["-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"] == "Set by: ENVOY_PORT=15001 (default)."
    assert origins["-A OUTPUT -p tcp --dport 7000 -j RETURN"] == "not installed by istio-vm"
