"""install/clean with a recording fake Runner: exact argv sequences, process counts, injected failures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from istio_vm.errors import ApplyError
from istio_vm.iptables import apply, state
from istio_vm.iptables.found import Owners
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import Completed
from tests.fakes import FakeRunner
from tests.helpers import ip_commands, text

REF = text("reference-vm/expected-v4.restore")
TPROXY = text("tproxy/v4.restore")
TPROXY_IP = ip_commands("tproxy/ip-commands.json")
V6 = text("ipv6/v6.restore")
V6_IP = ip_commands("ipv6/ip-commands.json")
SAVE4, SAVE6 = ("iptables-nft-save",), ("ip6tables-nft-save",)
RESTORE4 = ("iptables-nft-restore", "--noflush", "--wait=30")
RESTORE6 = ("ip6tables-nft-restore", "--noflush", "--wait=30")
EMPTY_NAT = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
             ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n")


@pytest.fixture
def run_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run")


@pytest.fixture
def proc_net(tmp_path: Path) -> str:
    """No legacy table in the (fake) network namespace."""
    path = tmp_path / "proc-net"
    path.mkdir()
    return str(path)


def plan_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in "-:"]


def test_reference_vm_on_a_clean_host_takes_three_processes(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    report = apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == [SAVE4, SAVE6, RESTORE4]
    assert fake.input_of(*RESTORE4) == "*nat\n" + "\n".join(plan_lines(REF)) + "\nCOMMIT\n"
    assert report.processes == 3
    assert report.backend == "nft"
    assert report.families[0].added[0] == "nat: -N ISTIO_INBOUND"
    assert not report.families[0].removed
    assert not report.families[1].restore_input  # clean IPv6, nothing planned: not run
    recorded = json.loads((Path(run_dir) / state.STATE_FILE).read_text())
    assert recorded == {"version": 1, "backend": "nft", "ip_commands": [],
                        "owners": {"gids": [], "interfaces": [], "marks": [], "uids": []}}


def test_reinstall_removes_what_is_found_in_the_same_transaction(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner(saves={"iptables-nft-save": text("golden/reference.nft.save")})
    apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    restore_input = fake.input_of(*RESTORE4)
    assert restore_input is not None
    lines = restore_input.splitlines()
    assert lines[0] == "*nat"
    assert lines[-1] == "COMMIT"
    assert len(lines) == 2 + 13 + 23
    assert lines[1:14] == [f"-D {r}" for r in ("PREROUTING -p tcp -j ISTIO_INBOUND", "OUTPUT -p tcp -j ISTIO_OUTPUT",
                           "OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN",
                           "OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 997 -j RETURN",
                           "OUTPUT -d 10.10.10.6/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053")] + [
        f"-{op} ISTIO_{c}" for op in "FX" for c in ("INBOUND", "IN_REDIRECT", "OUTPUT", "REDIRECT")]


def test_ipv6_leftovers_are_removed_even_when_nothing_is_planned_for_ipv6(run_dir: str, proc_net: str) -> None:
    v6_found = "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n-A PREROUTING -p tcp -j ISTIO_INBOUND\nCOMMIT\n"
    fake = FakeRunner(saves={"ip6tables-nft-save": v6_found})
    apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == [SAVE4, SAVE6, RESTORE4, RESTORE6]
    assert fake.input_of(*RESTORE6) == ("*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-F ISTIO_INBOUND\n"
                                        "-X ISTIO_INBOUND\nCOMMIT\n")


def test_tproxy_tests_first_then_ip_batch_then_restore(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    plan = Plan.from_restore(TPROXY, "", TPROXY_IP)
    report = apply.install_plan(plan, run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == [SAVE4, SAVE6, ("iptables-nft-restore", "--test", "--noflush", "--wait=30"),
                          ("ip", "-force", "-batch", "-"), RESTORE4]
    assert fake.input_of("ip") == ("rule del fwmark 1337 lookup 133\nroute del local default dev lo table 133\n"
                                   "rule add fwmark 1337 lookup 133\nroute add local default dev lo table 133\n")
    assert report.families[0].restore_input.count("COMMIT") == 2
    assert json.loads((Path(run_dir) / state.STATE_FILE).read_text())["ip_commands"] == TPROXY_IP


def test_a_failed_test_run_changes_nothing(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    fake.fail(lambda a, i: "--test" in a, stderr="iptables-restore: line 30 failed")
    with pytest.raises(ApplyError, match="nothing changed") as raised:
        apply.install_plan(Plan.from_restore(TPROXY, "", TPROXY_IP), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert raised.value.stderr == "iptables-restore: line 30 failed"
    assert len(fake.calls) == 3
    assert not (Path(run_dir) / state.STATE_FILE).exists()


def test_ipv6_failure_rolls_back_both_families_and_the_ip_commands(run_dir: str, proc_net: str) -> None:
    installed4 = text("golden/reference.nft.save")
    fake = FakeRunner(saves={"iptables-nft-save": EMPTY_NAT, "ip6tables-nft-save": EMPTY_NAT})

    def restore4(argv: tuple[str, ...], _: str | None) -> Completed | None:
        if argv == RESTORE4:
            fake.saves["iptables-nft-save"] = installed4  # the IPv4 restore committed
        return None

    fake.handlers.append(restore4)
    fake.fail(lambda a, i: a == RESTORE6, stderr="ip6tables-restore v1.8.9 (nf_tables): line 3 failed")
    with pytest.raises(ApplyError, match="host left as found") as raised:
        apply.install_plan(Plan.from_restore(REF, V6, V6_IP), run_dir=run_dir, runner=fake, proc_net=proc_net)
    error = raised.value
    assert error.host_as_before
    assert "line 3 failed" in error.stderr
    assert "line 3 failed" in str(error)
    assert fake.argvs[:5] == [SAVE4, SAVE6, ("ip", "-force", "-batch", "-"), RESTORE4, RESTORE6]
    rollback = fake.calls[5:]
    # each family written is read back: IPv4 changed (undone with --noflush, Istio's rules only),
    # IPv6's failed restore changed nothing (no restore); then the ip commands are undone
    assert [a for a, _ in rollback] == [SAVE4, RESTORE4, SAVE6, ("ip", "-force", "-batch", "-")]
    undo = rollback[1][1]
    assert undo is not None
    assert undo.startswith("*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n")
    assert "-N " not in undo  # nothing of Istio's was there before
    assert rollback[3][1] == "addr del ::6/128 dev lo\naddr add ::6/128 dev lo\n"  # undo add, redo the del
    assert not (Path(run_dir) / state.STATE_FILE).exists()


def test_a_restore_that_changed_nothing_is_not_a_rollback_incomplete(run_dir: str, proc_net: str) -> None:
    """The xtables lock held by another program: the restore fails whole after --wait; nothing to undo."""
    fake = FakeRunner()
    fake.fail(lambda a, i: a == RESTORE4, returncode=4, stderr="Another app is currently holding the xtables lock")
    with pytest.raises(ApplyError, match="host left as found") as raised:
        apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert raised.value.host_as_before
    assert "ROLLBACK INCOMPLETE" not in str(raised.value)
    assert fake.argvs == [SAVE4, SAVE6, RESTORE4, SAVE4]  # read back, found unchanged, nothing run


def test_clean_is_per_family_an_ipv6_failure_keeps_no_ipv4_rule(run_dir: str, proc_net: str) -> None:
    installed4 = text("golden/reference.nft.save")
    fake = FakeRunner(saves={"iptables-nft-save": installed4, "ip6tables-nft-save": installed4})
    fake.fail(lambda a, i: a == RESTORE6, stderr="ip6tables-restore: line 2 failed")
    with pytest.raises(ApplyError, match=r"clean failed for IPv6: .*line 2 failed \(IPv4 cleaned\)"):
        apply.clean_host(run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == [SAVE4, SAVE6, RESTORE4, RESTORE6]  # no rollback of the IPv4 removal
    assert state.read(run_dir).backend == "nft"  # kept for a retry


def test_clean_removes_19_shaped_rules_only_with_this_configs_values(run_dir: str, proc_net: str) -> None:
    """A host that never ran Istio: `-i eth1 -j RETURN`, a CONNMARK with another mark, another uid's
    DNS RETURN are someone else's; the same shapes with this configuration's values are Istio's."""
    save = ("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -i eth1 -j RETURN\n"
            "-A PREROUTING -i kv0 -j RETURN\n"
            "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1000 -j RETURN\n"
            "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN\nCOMMIT\n"
            "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -m mark --mark 0x1 -j CONNMARK --save-mark\n"
            "-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark\nCOMMIT\n")
    fake = FakeRunner(saves={"iptables-nft-save": save})
    owners = Owners.of(uids="997", gids="997", marks="1337", interfaces="kv0")
    apply.clean_host(run_dir=run_dir, runner=fake, proc_net=proc_net, owners=owners)
    removed = fake.input_of("iptables-nft-restore", "--test", "--noflush")
    assert removed is not None
    assert removed.splitlines() == [
        "*nat", "-D PREROUTING -i kv0 -j RETURN",
        "-D OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN", "COMMIT",
        "*mangle", "-D PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark", "COMMIT"]


def test_values_recorded_by_the_last_install_count_for_clean(run_dir: str, proc_net: str) -> None:
    """The configuration changed since the install (another KUBE_VIRT_INTERFACES): the state file's
    values still make the installed rules Istio's."""
    apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=FakeRunner(), proc_net=proc_net,
                       owners=Owners.of(interfaces="kv0"))
    save = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -i kv0 -j RETURN\nCOMMIT\n"
    fake = FakeRunner(saves={"iptables-nft-save": save})
    apply.clean_host(run_dir=run_dir, runner=fake, proc_net=proc_net, owners=Owners.of(interfaces="kv1"))
    assert fake.input_of(*RESTORE4) == "*nat\n-D PREROUTING -i kv0 -j RETURN\nCOMMIT\n"


def test_failed_ip_add_undoes_only_what_was_applied(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    fake.handlers.append(lambda a, i: Completed(a, 1, "", "RTNETLINK answers: No such device\n"
                                                      "Command failed -:1\nCommand failed -:4\n")
                         if a[0] == "ip" and i and i.startswith("rule del") else None)
    with pytest.raises(ApplyError, match="route add local default dev lo table 133 failed") as raised:
        apply.install_plan(Plan.from_restore(TPROXY, "", TPROXY_IP), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert "No such device" in raised.value.stderr
    # No iptables restore ran (ip goes first), so only the ip lines that worked are undone, in reverse.
    assert fake.argvs[-1] == ("ip", "-force", "-batch", "-")
    assert RESTORE4 not in fake.argvs
    assert fake.calls[-1][1] == "rule del fwmark 1337 lookup 133\nroute add local default dev lo table 133\n"


def test_previous_state_file_survives_a_failed_install(run_dir: str, proc_net: str) -> None:
    state.write(run_dir, state.RunState("nft", tuple(tuple(c) for c in TPROXY_IP)))
    fake = FakeRunner()
    fake.fail(lambda a, i: a == RESTORE4)
    with pytest.raises(ApplyError):
        apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert state.read(run_dir).ip_commands == tuple(tuple(c) for c in TPROXY_IP)


def test_a_timeout_is_a_failure_with_rollback(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    fake.fail(lambda a, i: a == RESTORE4, returncode=124, stderr="timed out after 60s")
    with pytest.raises(ApplyError, match="timed out"):
        apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs[-1] == SAVE4  # the rollback reads back what the killed restore did (here: nothing)


def test_legacy_is_used_only_when_rules_exist_only_in_legacy(run_dir: str, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "ip_tables_names").write_text("nat\n")
    legacy = text("golden/reference.legacy.save")
    fake = FakeRunner(saves={"iptables-legacy-save": legacy})
    report = apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=str(proc))
    assert fake.argvs == [SAVE4, SAVE6, ("iptables-legacy-save",),
                          ("iptables-legacy-restore", "--noflush", "--wait=30")]
    assert report.backend == "legacy"
    assert "only in the legacy" in report.backend_reason
    # the next run uses the recorded backend without probing
    fake2 = FakeRunner(saves={"iptables-legacy-save": legacy})
    apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake2, proc_net=str(proc))
    assert fake2.argvs == [("iptables-legacy-save",), ("ip6tables-legacy-save",),
                           ("iptables-legacy-restore", "--noflush", "--wait=30")]


def test_nft_wins_when_both_backends_have_rules(run_dir: str, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "ip_tables_names").write_text("nat\n")
    fake = FakeRunner(saves={"iptables-legacy-save": text("golden/reference.legacy.save"),
                             "iptables-nft-save": "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"})
    with caplog.at_level(logging.WARNING):
        report = apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=str(proc))
    assert report.backend == "nft"
    # ours installed in nft, then the Istio rules left in legacy removed (they would capture traffic twice)
    assert fake.argvs[-3:] == [RESTORE4, ("iptables-legacy-save",),
                               ("iptables-legacy-restore", "--noflush", "--wait=30")]
    assert (fake.input_of("iptables-legacy-restore") or "").startswith("*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n")
    assert "Istio rules exist in the legacy backend" in caplog.text
    assert "Removing the Istio rules found in the legacy backend (IPv4): nft is in use" in caplog.text


def test_backend_override_never_probes(run_dir: str, tmp_path: Path) -> None:
    fake = FakeRunner()
    apply.install_plan(Plan.from_restore(REF), backend="legacy", run_dir=run_dir, runner=fake, proc_net=str(tmp_path))
    assert fake.argvs == [("iptables-legacy-save",), ("ip6tables-legacy-save",),
                          ("iptables-legacy-restore", "--noflush", "--wait=30")]
    with pytest.raises(ApplyError, match="unknown iptables backend"):
        apply.install_plan(Plan.from_restore(REF), backend="xt", run_dir=run_dir, runner=FakeRunner(),
                           proc_net=str(tmp_path))


def test_clean_on_a_clean_host_only_reads(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    report = apply.clean_host(run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == [SAVE4, SAVE6]
    assert report.processes == 2


def test_clean_removes_found_rules_and_recorded_ip_state(run_dir: str, proc_net: str) -> None:
    state.write(run_dir, state.RunState("nft", tuple(tuple(c) for c in TPROXY_IP + V6_IP)))
    fake = FakeRunner(saves={"iptables-nft-save": text("golden/tproxy.nft.save")})
    report = apply.clean_host(run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == [SAVE4, SAVE6, ("iptables-nft-restore", "--test", "--noflush", "--wait=30"), RESTORE4,
                          ("ip", "-force", "-batch", "-")]  # nat + mangle: tested first
    assert fake.input_of("ip") == ("addr del ::6/128 dev lo\nroute del local default dev lo table 133\n"
                                   "rule del fwmark 1337 lookup 133\n")
    assert "*mangle\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n" in report.families[0].restore_input
    assert not (Path(run_dir) / state.STATE_FILE).exists()


def test_dry_run_only_reads(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    plan = Plan.from_restore(TPROXY, V6, TPROXY_IP)
    report = apply.install_plan(plan, run_dir=run_dir, runner=fake, proc_net=proc_net, dry_run=True)
    assert fake.argvs == [SAVE4, SAVE6]
    assert report.dry_run
    assert report.families[1].restore_input.startswith("*nat\n-N ISTIO_INBOUND\n")


def test_unreadable_ipv6_is_skipped_only_when_nothing_is_planned_for_it(run_dir: str, proc_net: str) -> None:
    fake = FakeRunner()
    fake.fail(lambda a, i: a == SAVE6, stderr="can't initialize ip6tables table `nat'")
    assert apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net).processes == 3
    with pytest.raises(ApplyError, match="cannot read the IPv6 rules"):
        apply.install_plan(Plan.from_restore(REF, V6), run_dir=run_dir, runner=fake, proc_net=proc_net)


@pytest.mark.parametrize(("plan", "commands", "message"), [
    ("-A OUTPUT -j RETURN\n", [], "outside a table"),
    ("* nat\n-A OUTPUT -j RETURN\n", [], "no COMMIT"),
    (REF, [["ip", "link", "set", "lo", "up"]], "only `ip rule|route|address"),
    (REF, [["ip", "-n", "x", "rule", "add", "fwmark", "1"]], "unsupported ip option"),
])
def test_bad_input_cannot_even_become_a_plan(plan: str, commands: list[list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):  # so install_plan never sees it: nothing runs
        Plan.from_restore(plan, "", commands)


def test_a_bad_recorded_ip_command_is_refused_before_anything_changes(run_dir: str, proc_net: str) -> None:
    Path(run_dir).mkdir()
    (Path(run_dir) / state.STATE_FILE).write_text('{"backend": "nft", "ip_commands": [["ip", "link", "set"]]}')
    fake = FakeRunner()
    with pytest.raises(ApplyError, match=f"{state.STATE_FILE}: only `ip rule"):
        apply.install_plan(Plan.from_restore(REF), run_dir=run_dir, runner=fake, proc_net=proc_net)
    assert fake.argvs == []
