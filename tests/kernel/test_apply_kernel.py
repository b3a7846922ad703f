"""install and clean against the real kernel, in a throw-away network namespace, on both backends."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from istio_vm.errors import ApplyError
from istio_vm.iptables import apply
from istio_vm.iptables.backend import BACKENDS, binary, legacy_tables
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import Completed, SubprocessRunner
from testbed.netns import Netns
from tests import netns_iptables
from tests.helpers import ip_commands, text
from tests.make_golden import generate

pytestmark = pytest.mark.root

REF = text("reference-vm/expected-v4.restore")
TPROXY = text("tproxy/v4.restore")
TPROXY_IP = ip_commands("tproxy/ip-commands.json")
V4_ON_V6_HOST = text("ipv6/v4.restore")
V6 = text("ipv6/v6.restore")
V6_IP = ip_commands("ipv6/ip-commands.json")
SCENARIOS = {"reference": (REF, "", []), "tproxy": (TPROXY, "", TPROXY_IP), "ipv6": (V4_ON_V6_HOST, V6, V6_IP)}


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Netns.temporary("k") as namespace:
        yield namespace


@pytest.fixture
def run_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run")


def install(ns: Netns, backend: str, run_dir: str, scenario: str) -> apply.Report:
    v4, v6, ip = SCENARIOS[scenario]
    with ns.entered():
        return apply.install_plan(Plan.from_restore(v4, v6, ip), backend=backend, run_dir=run_dir)


def clean(ns: Netns, backend: str | None, run_dir: str) -> apply.Report:
    with ns.entered():
        return apply.clean_host(backend=backend, run_dir=run_dir)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_installs_leave_exactly_one_copy(ns: Netns, backend: str, run_dir: str) -> None:
    reports = [install(ns, backend, run_dir, "reference") for _ in range(3)]
    assert netns_iptables.save(ns, backend, 4) == text(f"golden/reference.{backend}.save")
    assert netns_iptables.save(ns, backend, 6) == ""
    assert [r.processes for r in reports] == [3, 3, 3]  # save v4, save v6, one restore: nothing else


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_clean_after_install_restores_the_state_before(ns: Netns, backend: str, scenario: str,
                                                       run_dir: str) -> None:
    netns_iptables.restore(ns, backend, 4, netns_iptables.FOREIGN_V4)
    before = netns_iptables.state(ns, backend)
    install(ns, backend, run_dir, scenario)
    install(ns, backend, run_dir, scenario)
    assert netns_iptables.state(ns, backend) != before
    clean(ns, None, run_dir)  # the backend comes from the state file
    assert netns_iptables.state(ns, backend) == before
    # Idempotent: a second clean only reads (the foreign legacy rules make detection look at legacy too).
    assert all(argv[0].endswith("-save") for argv in clean(ns, None, run_dir).commands)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clean_takes_no_plan_so_a_changed_config_leaves_nothing(ns: Netns, backend: str, run_dir: str) -> None:
    before = netns_iptables.state(ns, backend)
    install(ns, backend, run_dir, "tproxy")
    install(ns, backend, run_dir, "ipv6")  # config changed: TPROXY's mangle rules and ip rule/route must go
    after_b = netns_iptables.state(ns, backend)
    with Netns.temporary("fresh") as fresh:
        install(fresh, backend, str(Path(run_dir).parent / "fresh"), "ipv6")
        assert after_b == netns_iptables.state(fresh, backend)
    clean(ns, backend, run_dir)
    assert netns_iptables.state(ns, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftovers_of_19_are_fully_removed_and_foreign_rules_kept(ns: Netns, backend: str, run_dir: str) -> None:
    netns_iptables.restore(ns, backend, 4, netns_iptables.FOREIGN_V4)
    before = netns_iptables.state(ns, backend)
    netns_iptables.leftovers_19(ns, backend)
    assert netns_iptables.save(ns, backend, 4).count("--dport 53 -m owner --uid-owner 997 -j RETURN") == 5
    report = clean(ns, backend, run_dir)
    assert [argv[0] for argv in report.commands] == [binary(backend, 4, "save"), binary(backend, 6, "save"),
                                                     binary(backend, 4, "restore"),  # --test: nat + mangle
                                                     binary(backend, 4, "restore")]
    assert netns_iptables.state(ns, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_install_over_19_leftovers_leaves_one_copy(ns: Netns, backend: str, run_dir: str) -> None:
    netns_iptables.leftovers_19(ns, backend)
    install(ns, backend, run_dir, "reference")
    assert netns_iptables.save(ns, backend, 4) == text(f"golden/reference.{backend}.save")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", ["bad ipv6 rule", "bad ip command", "bad ipv4 rule in mangle"])
def test_a_failure_leaves_both_families_and_ip_state_as_before(ns: Netns, backend: str, fault: str,
                                                                run_dir: str) -> None:
    netns_iptables.restore(ns, backend, 4, netns_iptables.FOREIGN_V4)
    install(ns, backend, run_dir, "tproxy")  # something of ours is there already, with ip state
    before = netns_iptables.state(ns, backend)
    v4, v6, ip = V4_ON_V6_HOST, V6, list(V6_IP)
    if fault == "bad ipv6 rule":
        v6 = v6.replace("COMMIT", "-A ISTIO_OUTPUT -j NO_SUCH_CHAIN\nCOMMIT")
    elif fault == "bad ip command":
        ip.append(["ip", "-f", "inet", "route", "add", "local", "default", "dev", "nosuchdev0", "table", "134"])
    else:
        v4 = TPROXY.replace("-A ISTIO_DIVERT -j ACCEPT", "-A ISTIO_DIVERT -j NO_SUCH_TARGET")
    with ns.entered(), pytest.raises(ApplyError) as raised:
        apply.install_plan(Plan.from_restore(v4, v6, ip), backend=backend, run_dir=run_dir)
    assert raised.value.host_as_before
    assert raised.value.stderr  # the tool's own words
    assert netns_iptables.state(ns, backend) == before
    clean(ns, backend, run_dir)  # the state file still describes what is installed


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_on_first_install_leaves_a_clean_host(ns: Netns, backend: str, run_dir: str) -> None:
    before = netns_iptables.state(ns, backend)
    broken = Plan.from_restore(REF, V6.replace("--to-ports 15001", "--to-ports notaport"), V6_IP)
    with ns.entered(), pytest.raises(ApplyError, match="IPv6"):
        apply.install_plan(broken, backend=backend, run_dir=run_dir)
    assert netns_iptables.state(ns, backend) == before
    assert not (Path(run_dir) / "iptables-state.json").exists()


def test_detection_picks_nft_on_a_clean_host_and_creates_no_legacy_table(ns: Netns, run_dir: str) -> None:
    report = install(ns, None, run_dir, "reference")  # type: ignore[arg-type]
    assert report.backend == "nft"
    assert report.processes == 3
    with ns.entered():
        assert legacy_tables(4) == []
        assert legacy_tables(6) == []


def test_detection_picks_legacy_only_when_only_legacy_has_rules(ns: Netns, run_dir: str, tmp_path: Path) -> None:
    netns_iptables.leftovers_19(ns, "legacy")
    with ns.entered():
        report = apply.install_plan(Plan.from_restore(REF), run_dir=run_dir)
    assert report.backend == "legacy"
    # 1.9's clean commands instantiated legacy tables in both families, so both are looked at.
    assert [argv[0] for argv in report.commands] == ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save",
                                                     "ip6tables-legacy-save", "iptables-legacy-restore",
                                                     "iptables-legacy-restore"]
    assert netns_iptables.save(ns, "legacy", 4) == text("golden/reference.legacy.save")
    assert netns_iptables.save(ns, "nft", 4) == ""
    # nft has rules too: nft wins, and the Istio rules in legacy are removed (they would capture traffic twice).
    with Netns.temporary("both") as other:
        netns_iptables.restore(other, "legacy", 4, REF)
        netns_iptables.restore(other, "nft", 4, netns_iptables.FOREIGN_V4)
        with other.entered():
            assert apply.install_plan(Plan.from_restore(REF), run_dir=str(tmp_path / "other")).backend == "nft"
        assert "ISTIO" not in netns_iptables.save(other, "legacy", 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", ["reference", "tproxy", "leftovers-1.9"])
def test_golden_dumps_match_this_machines_iptables(backend: str, scenario: str) -> None:
    assert generate(scenario, backend) == text(f"golden/{scenario}.{backend}.save")


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_tproxy_installs_leave_one_ip_rule_and_route(ns: Netns, backend: str, run_dir: str) -> None:
    reports = [install(ns, backend, run_dir, "tproxy") for _ in range(3)]
    assert ns.ip("rule").stdout.count("fwmark 0x539 lookup 133") == 1  # ip rule add alone would pile up
    assert ns.ip("route", "show", "table", "133").stdout.count("local default dev lo") == 1
    assert netns_iptables.save(ns, backend, 4) == text(f"golden/tproxy.{backend}.save")
    # save v4, save v6, --test (nat + mangle), one ip -batch, one restore
    assert [r.processes for r in reports] == [5, 5, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_undoes_only_istios_rules_and_keeps_a_rule_added_meanwhile(ns: Netns, backend: str,
                                                                            run_dir: str) -> None:
    """Another program adds a nat OUTPUT rule while the install runs; the IPv6 restore then fails.
    The rollback puts Istio's IPv4 state back and leaves that rule (a whole-table restore deleted it)."""
    install(ns, backend, run_dir, "reference")
    foreign = ["-t", "nat", "-I", "OUTPUT", "1", "-d", "192.0.2.9/32", "-j", "ACCEPT"]

    class Meanwhile(SubprocessRunner):
        def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float) -> Completed:
            if argv[0] == binary(backend, 6, "restore"):
                super().run([binary(backend, 4, "").rstrip("-"), *foreign], timeout=timeout)
                return Completed(tuple(argv), 1, "", "line 2 failed")
            return super().run(argv, input=input, timeout=timeout)

    before = netns_iptables.state(ns, backend)
    with ns.entered(), pytest.raises(ApplyError, match="host left as found") as raised:
        apply.install_plan(Plan.from_restore(V4_ON_V6_HOST, V6, V6_IP), backend=backend, run_dir=run_dir,
                           runner=Meanwhile())
    assert raised.value.host_as_before
    after = netns_iptables.state(ns, backend)
    assert "-A OUTPUT -d 192.0.2.9/32 -j ACCEPT" in after["v4"]
    after["v4"] = after["v4"].replace("-A OUTPUT -d 192.0.2.9/32 -j ACCEPT\n", "")
    assert after == before
