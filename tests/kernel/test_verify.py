"""verify: planned vs live in canonical form; exit status, diff and JSON, with real rules in a netns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm.iptables import apply, verify
from istio_vm.iptables.backend import BACKENDS
from istio_vm.iptables.rules import Plan
from testbed.netns import Netns
from tests import netns_iptables
from tests.helpers import text

REF = text("reference-vm/expected-v4.restore")
TPROXY = text("tproxy/v4.restore")


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Netns.temporary("verify") as namespace:
        yield namespace


def run_verify(ns: Netns, backend: str, v4: str, v6: str = "") -> verify.VerifyResult:
    with ns.entered():
        return verify.compare(Plan.from_restore(v4, v6), backend=backend)


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_match_after_install_even_among_foreign_rules(ns: Netns, backend: str, tmp_path: Path) -> None:
    netns_iptables.restore(ns, backend, 4, netns_iptables.FOREIGN_V4)
    with ns.entered():
        apply.install_plan(Plan.from_restore(TPROXY), backend=backend, run_dir=str(tmp_path))
    result = run_verify(ns, backend, TPROXY)
    assert not result.drift
    assert result.diff() == ""
    # two saves, one scratch namespace; with legacy in use, nft's two saves too (Istio rules there would capture)
    assert result.processes == (3 if backend == "nft" else 5)
    # every planned line (and the two table headers), in canonical form
    assert len(result.families[0].planned) == 2 + sum(line.startswith("-") for line in TPROXY.splitlines())


@pytest.mark.root
@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_is_shown_as_a_diff_of_istio_rules(ns: Netns, backend: str, tmp_path: Path) -> None:
    with ns.entered():
        apply.install_plan(Plan.from_restore(REF), backend=backend, run_dir=str(tmp_path))
    ns.run(netns_iptables.tool(backend, 4), "-t", "nat", "-D", "ISTIO_OUTPUT", "-m", "owner", "--uid-owner", "997",
           "-j", "RETURN")
    ns.run(netns_iptables.tool(backend, 4), "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-m", "owner",
           "--uid-owner", "997", "-j", "RETURN")  # what a 1.9 restart piles up
    result = run_verify(ns, backend, REF)
    assert result.drift
    diff = result.diff()
    assert diff.startswith("--- planned IPv4\n+++ live IPv4\n")
    assert "\n-" + "-A ISTIO_OUTPUT -m owner --uid-owner 997 -j RETURN\n" in diff
    assert "\n+" + "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN\n" in diff
    data = json.loads(result.to_json())
    assert data["drift"] is True
    assert data["families"]["4"]["missing"] == ["-A ISTIO_OUTPUT -m owner --uid-owner 997 -j RETURN"]
    assert data["families"]["4"]["unexpected"] == [
        "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN"]
    assert data["families"]["6"]["drift"] is False


@pytest.mark.root
def test_nothing_installed_is_drift_and_empty_plan_on_clean_host_is_not(ns: Netns) -> None:
    result = run_verify(ns, "nft", REF)
    assert result.drift
    assert json.loads(result.to_json())["families"]["4"]["live"] == []
    empty = run_verify(ns, "nft", "")
    assert not empty.drift
    assert empty.processes == 2  # nothing planned: no scratch namespace


@pytest.mark.root
def test_rule_order_matters(ns: Netns, tmp_path: Path) -> None:
    with ns.entered():
        apply.install_plan(Plan.from_restore(REF), backend="nft", run_dir=str(tmp_path))
    first, moved = "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32", "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n"
    swapped = REF.replace(moved, "").replace(first, moved + first)
    data = json.loads(run_verify(ns, "nft", swapped).to_json())
    assert data["drift"] is True
    assert data["families"]["4"]["order_differs"] is True
