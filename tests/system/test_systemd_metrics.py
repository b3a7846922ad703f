"""ISTIO_VM_METRICS_FILE in a real systemd: the file read with Prometheus' parser through start, a crash and
the restart after it, drift found by the verify unit, `systemctl restart` and stop, each value checked
against what the journal says of the same moment. See docs/operations.md, *Metrics*.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from testbed.wait import wait_for
from tests.metrics_text import parse_metrics
from tests.system.container_vm import UNIT, Vm, agent_mode, start, why_no_container

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.root,
    pytest.mark.skipif(bool(why_no_container()), reason=why_no_container() or "-"),
]
TEXTFILE_DIR = PurePosixPath("/var/lib/prometheus/node-exporter")
METRICS = TEXTFILE_DIR / "istio-sidecar.prom"
VERIFY_UNIT = "istio-sidecar-verify.service"


def metrics(vm: Vm) -> dict[str, float]:
    return parse_metrics(vm.c.path(METRICS).read_text())


def settled(vm: Vm, want: dict[str, float], what: str) -> dict[str, float]:
    """The file once it shows `want` (the supervisor writes right after the change the journal reports)."""
    seen: dict[str, dict[str, float]] = {}

    def shows() -> bool:
        seen["m"] = metrics(vm)
        return all(seen["m"].get(k) == v for k, v in want.items())

    wait_for(shows, 30, what)
    return seen["m"]


def test_the_metrics_file_follows_start_crash_restart_drift_and_stop_as_the_journal_does(vm: Vm) -> None:
    # node_exporter's directory, writable by istio-proxy's group (docs/operations.md).
    vm.c.run(["install", "-d", "-o", "root", "-g", "istio-proxy", "-m", "0775", str(TEXTFILE_DIR)])
    agent_mode(vm, ISTIO_VM_METRICS_FILE=str(METRICS))
    first = start(vm)
    m = settled(vm, {"istio_vm_proxy_ready": 1}, "ready in the file")
    assert (m["istio_vm_up"], m["istio_vm_epoch"], m['istio_vm_state{state="running"}']) == (1, 0, 1)
    version = vm.istio_vm("--version").stdout.split()[-1]
    assert m[f'istio_vm_build_info{{version="{version}"}}'] == 1
    planned = vm.istio_vm("iptables", "plan", "--format", "restore").stdout
    v4, v6 = planned.split("# ip6tables-restore (IPv6)\n")
    assert m['istio_vm_iptables_rules{family="ipv4"}'] == sum(line.startswith("-A ") for line in v4.splitlines())
    assert m['istio_vm_iptables_rules{family="ipv6"}'] == sum(line.startswith("-A ") for line in v6.splitlines())
    assert m['istio_vm_capture_policy_info{policy="fail-closed"}'] == 1
    assert m['istio_vm_capture_part{part="inbound"}'] == m['istio_vm_capture_part{part="outbound"}'] == 1
    assert sum(v for k, v in m.items() if k.startswith("istio_vm_proxy_restarts_total")) == 0
    stat = vm.c.run(["stat", "-c", "%U %a", str(METRICS)]).stdout.split()
    assert stat == ["istio-proxy", "644"]  # node_exporter (another user) reads it

    # A crash: the journal's "Restarting" entry and the file agree on the reason, epoch and counts.
    vm.c.run(["kill", "-KILL", str(first)])
    restarting = vm.wait(lambda e: e.get("ISTIO_EVENT") == "restart" and "ISTIO_RESTART_REASON" in e)
    assert restarting["ISTIO_RESTART_REASON"] == "signal"
    ready = vm.event("ready", 1)
    m = settled(vm, {"istio_vm_epoch": 1, "istio_vm_proxy_ready": 1}, "epoch 1 ready in the file")
    assert int(ready["ISTIO_EPOCH"]) == m["istio_vm_epoch"]
    assert m['istio_vm_proxy_restarts_total{reason="signal"}'] == 1
    assert m['istio_vm_proxy_last_exit_info{detail="SIGKILL",kind="signal"}'] == 1
    assert vm.show("NRestarts")["NRestarts"] == "0"  # istio-vm restarted the proxy, not systemd
    assert "istio_vm_verify_ok" not in m  # no verify since this start

    # Drift: a rule added by hand; the verify unit (as the timer runs it) finds it, and the file says so.
    vm.c.run(["iptables", "-t", "nat", "-I", "ISTIO_OUTPUT", "1", "-d", "192.0.2.9/32", "-j", "RETURN"])
    verify = vm.c.systemctl("start", VERIFY_UNIT, check=False, timeout=60)
    assert verify.returncode != 0
    told = vm.c.journal("--unit", VERIFY_UNIT)
    drifts = [e for e in told if e.get("ISTIO_EVENT") == "drift"]
    assert len(drifts) == 1, "\n".join(e["MESSAGE"] for e in told)
    [drift] = drifts
    m = settled(vm, {"istio_vm_verify_ok": 0}, "the drift in the file")
    for kind in ("missing", "unexpected", "other_backend"):
        assert m[f'istio_vm_verify_drift_lines{{kind="{kind}"}}'] == int(drift[f"ISTIO_DRIFT_{kind.upper()}"])
    assert m['istio_vm_verify_drift_lines{kind="unexpected"}'] >= 1
    # The repair operations.md gives, then the next check: ok again.
    vm.istio_vm("iptables", "install")
    vm.c.systemctl("reset-failed", VERIFY_UNIT)
    vm.c.systemctl("start", VERIFY_UNIT, timeout=60)
    m = settled(vm, {"istio_vm_verify_ok": 1}, "the repaired rules in the file")
    assert sum(v for k, v in m.items() if k.startswith("istio_vm_verify_drift_lines")) == 0

    # systemctl restart: a new istio-vm, a new start time, counters from 0, no verify yet.
    started = m["istio_vm_start_time_seconds"]
    vm.c.systemctl("restart", UNIT, timeout=120)
    m = settled(vm, {"istio_vm_proxy_ready": 1, "istio_vm_epoch": 0}, "the new start in the file")
    assert m["istio_vm_start_time_seconds"] > started
    assert m['istio_vm_proxy_restarts_total{reason="signal"}'] == 0
    assert "istio_vm_verify_ok" not in m

    # Stop: up 0 with the exit status systemd recorded; no capture or rule series (they are gone).
    vm.c.systemctl("stop", UNIT, timeout=60)
    m = metrics(vm)
    assert (m["istio_vm_up"], m["istio_vm_proxy_ready"], m['istio_vm_state{state="stopped"}']) == (0, 0, 1)
    assert m["istio_vm_exit_status"] == int(vm.show("ExecMainStatus")["ExecMainStatus"]) == 0
    assert not [k for k in m if k.startswith(("istio_vm_capture_part", "istio_vm_iptables_rules", "istio_vm_epoch"))]
    assert [p.name for p in vm.c.path(TEXTFILE_DIR).iterdir()] == ["istio-sidecar.prom"]  # no temporary left
