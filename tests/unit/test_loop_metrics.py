"""The loop keeps ISTIO_VM_METRICS_FILE: start, crash, restart, verify (SIGUSR2), hot restart, stop, in
simulated time; each state read back with Prometheus' parser."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from istio_vm.iptables.parts import ALL_PARTS
from istio_vm.service.machine import Policy
from istio_vm.service.metrics_file import VERIFY_RESULT, MetricsWriter
from tests.metrics_text import parse_metrics
from tests.sim import AGENT, ENVOY, EXIT_0, EXIT_1, TERMED, Sim
from tests.unit.test_loop import exit_on_sigterm


def with_metrics(sim: Sim, tmp_path: Path) -> tuple[Path, list[dict[str, float]]]:
    path = tmp_path / "istio-sidecar.prom"
    sim.loop.metrics = MetricsWriter(str(path), str(tmp_path), "0.1.0", "fail-closed",
                                     lambda on: {4: 23 if on == ALL_PARTS else 0, 6: 0}, wall=lambda: 1000.0)
    return path, []


def look(path: Path, seen: list[dict[str, float]]) -> None:
    seen.append(parse_metrics(path.read_text()))


def test_crash_restart_verify_and_stop_in_the_file(tmp_path: Path) -> None:
    sim = Sim(AGENT, policy=Policy(backoff_initial=1.0))
    path, seen = with_metrics(sim, tmp_path)
    exit_on_sigterm(sim)
    sim.at(0.5, lambda: look(path, seen))
    sim.at(1.0, lambda: sim.exit(1000, EXIT_1))
    sim.at(1.5, lambda: look(path, seen))  # in the backoff
    sim.at(2.5, lambda: look(path, seen))  # epoch 1 ready
    def verified() -> None:  # what `istio-vm iptables verify` records before its SIGUSR2
        (tmp_path / VERIFY_RESULT).write_text(json.dumps(
            {"time": 990.0, "drift": {"missing": 0, "unexpected": 2, "other_backend": 0}}))

    sim.at(3.0, verified)
    sim.signal_at(3.1, signal.SIGUSR2)
    sim.at(3.5, lambda: look(path, seen))
    sim.signal_at(4.0, signal.SIGTERM)
    assert sim.run() == 0
    look(path, seen)
    running, backoff, again, drifted, stopped = seen
    assert (running["istio_vm_up"], running["istio_vm_proxy_ready"], running["istio_vm_epoch"]) == (1, 1, 0)
    assert running['istio_vm_iptables_rules{family="ipv4"}'] == 23
    assert running['istio_vm_proxy_restarts_total{reason="exit"}'] == 0
    assert (backoff["istio_vm_proxy_ready"], backoff['istio_vm_state{state="backoff"}']) == (0, 1)
    assert backoff['istio_vm_proxy_restarts_total{reason="exit"}'] == 1
    assert backoff['istio_vm_proxy_last_exit_info{detail="1",kind="exit"}'] == 1
    assert (again["istio_vm_proxy_ready"], again["istio_vm_epoch"]) == (1, 1)
    assert "istio_vm_verify_ok" not in again
    assert (drifted["istio_vm_verify_ok"], drifted['istio_vm_verify_drift_lines{kind="unexpected"}']) == (0, 2)
    assert drifted["istio_vm_verify_timestamp_seconds"] == 990.0
    assert (stopped["istio_vm_up"], stopped["istio_vm_exit_status"], stopped['istio_vm_state{state="stopped"}']) == (
        0, 0, 1)
    assert sim.supervisor.restarts == 1
    assert "Received SIGUSR2" not in sim.logged()  # not a machine event; the file is its only effect


def test_a_hot_restart_and_a_signal_kill_are_counted_by_reason(tmp_path: Path) -> None:
    sim = Sim(ENVOY)
    path, seen = with_metrics(sim, tmp_path)
    exit_on_sigterm(sim, TERMED)
    sim.signal_at(1.0, signal.SIGHUP)
    sim.at(2.0, lambda: sim.exit(1000, EXIT_0))  # epoch 0 leaves after the hand-over
    sim.at(2.5, lambda: look(path, seen))
    sim.at(3.0, lambda: sim.exit(1001, signal.SIGKILL))
    sim.at(3.5, lambda: look(path, seen))
    sim.signal_at(6.0, signal.SIGTERM)
    sim.run()
    hot, killed = seen
    assert hot['istio_vm_proxy_restarts_total{reason="hot_restart"}'] == 1
    assert (hot["istio_vm_epoch"], hot['istio_vm_reloads_total{result="ok"}']) == (1, 1)
    assert killed['istio_vm_proxy_restarts_total{reason="signal"}'] == 1
    assert killed['istio_vm_proxy_last_exit_info{detail="SIGKILL",kind="signal"}'] == 1
