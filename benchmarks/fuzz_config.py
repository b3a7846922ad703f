"""Benchmark-style run of the config fuzzer: many seeds in process, and cases through the real CLI.

    .venv/bin/python -m benchmarks.fuzz_config [--seeds 10] [--cases 5000] [--cli 200] [--json]

in-process  `python -m testbed.fuzz_config --seed S --cases N` for S = 1..seeds, each in a fresh
            interpreter under RLIMIT_AS = its start + 100 MB and a 5 s alarm per case: the contract is
            exit 0 or 78, one bounded line per problem, no other exception, at most 2 s per case
cli         `istio-vm config` (reads and checks everything, touches no iptables) on `--cli` cases as a new
            process: exit 0 or 78, no traceback, every stderr line an `istio-vm: ` line, wall time and
            peak RSS (wait4) per process
Baselines of the same run: the unmutated reference VM loaded and planned in process (median of 200), and
`istio-vm config` on it (median of 10); figures are ratios to them. Exit status 1 on any violation.
The in-tree gate is smaller (tests/unit/test_fuzz_config.py, tests/kernel/test_fuzz_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from istio_vm.config.load import load
from istio_vm.config.sources import Sources
from istio_vm.iptables.plan import build_plan
from testbed.fuzz_config import FUZZ_ENVIRON, FUZZ_HOST, ROOT, Mutator, clear, describe

REFERENCE = ROOT / "tests" / "data" / "reference-vm"
ISTIO_VM = str(Path(sys.executable).parent / "istio-vm")


def baseline_in_process(runs: int = 200) -> float:
    sources = Sources(sidecar_env="/nonexistent", cluster_env=str(REFERENCE / "cluster.env"),
                      resolv_conf=str(REFERENCE / "resolv.conf"))
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        build_plan(load(sources, FUZZ_ENVIRON, FUZZ_HOST).capture)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cli(sidecar: str, cluster: str, resolv: str) -> tuple[int, str, float, int]:
    """`istio-vm config` as a new process: status, stderr, wall seconds, peak RSS in bytes."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PROXY_UID": "997", "EXEC_USER": "root"}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen([ISTIO_VM, "--sidecar-env", sidecar, "--cluster-env", cluster, "config",
                                    "--resolv-conf", resolv], env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        err.seek(0)
        text = err.read().decode(errors="replace")
    return process.returncode, text, seconds, usage.ru_maxrss * 1024


def run_cli(cases: int, seed: int) -> dict[str, Any]:
    ref = cli("/nonexistent", str(REFERENCE / "cluster.env"), str(REFERENCE / "resolv.conf"))
    baseline = statistics.median(cli("/nonexistent", str(REFERENCE / "cluster.env"),
                                     str(REFERENCE / "resolv.conf"))[2] for _ in range(10))
    mutator = Mutator(seed)
    times: list[float] = []
    peaks: list[int] = []
    violations: list[str] = []
    statuses: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="istio-vm-fuzz-cli-") as tmp:
        directory = Path(tmp)
        for _ in range(cases):
            case = mutator.case(directory)
            s = case.sources
            status, err, seconds, peak = cli(str(s.sidecar_env), str(s.cluster_env), s.resolv_conf)
            times.append(seconds)
            peaks.append(peak)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status not in (0, 78) or "Traceback" in err or seconds > 2 or peak > 100 << 20 or not all(
                    line.startswith("istio-vm: ") for line in err.splitlines()):
                violations.append(f"{describe(case)}: exit {status}, {seconds:.2f}s, {peak >> 20} MiB: {err[-300:]}")
            clear(directory)
    times.sort()
    return {"cases": cases, "statuses": statuses, "violations": violations, "reference_status": ref[0],
            "baseline_seconds": round(baseline, 4), "p50_seconds": round(times[len(times) // 2], 4),
            "max_seconds": round(times[-1], 4), "max_over_baseline": round(times[-1] / baseline, 2),
            "peak_rss_mib_max": round(max(peaks) / 2**20, 1), "reference_rss_mib": round(ref[3] / 2**20, 1)}


def run_in_process(seeds: int, cases: int) -> dict[str, Any]:
    baseline = baseline_in_process()
    reports: list[dict[str, Any]] = []
    for seed in range(1, seeds + 1):
        done = subprocess.run([sys.executable, "-m", "testbed.fuzz_config", "--seed", str(seed), "--cases",
                               str(cases)], capture_output=True, text=True, timeout=3600, check=False)
        reports.append(json.loads(done.stdout) if done.stdout else {"violations": [done.stderr[-2000:]]})
    statuses: dict[str, int] = {}
    for report in reports:
        for key, count in report.get("statuses", {}).items():
            statuses[key] = statuses.get(key, 0) + count
    worst = max(r.get("case_seconds", {}).get("max", 0.0) for r in reports)
    p99 = max(r.get("case_seconds", {}).get("p99", 0.0) for r in reports)
    seconds = sum(r.get("seconds", 0.0) for r in reports)
    return {"seeds": seeds, "cases": seeds * cases, "statuses": statuses,
            "violations": [v for r in reports for v in r["violations"]],
            "baseline_seconds": round(baseline, 5), "cases_per_second": round(seeds * cases / seconds, 1),
            "p99_over_baseline": round(p99 / baseline, 1), "max_seconds": round(worst, 3),
            "max_over_baseline": round(worst / baseline, 1),
            "max_rss_growth_mb": max(r.get("max_rss_growth_mb", 0.0) for r in reports),
            "slowest": max((r.get("slowest", [0.0, ""]) for r in reports), key=lambda s: s[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_config", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="in-process runs, one seed each (default 10)")
    parser.add_argument("--cases", type=int, default=5000, help="cases per seed (default 5000)")
    parser.add_argument("--cli", type=int, default=200, help="cases through `istio-vm config` (default 200)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {"in_process": run_in_process(args.seeds, args.cases), "cli": run_cli(args.cli, seed=10_000)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ip, c = result["in_process"], result["cli"]
        print(f"in process: {ip['cases']} cases ({ip['seeds']} seeds), statuses {ip['statuses']}, "
              f"{len(ip['violations'])} violations")
        print(f"  {ip['cases_per_second']} cases/s; baseline (reference VM load + plan) "
              f"{ip['baseline_seconds'] * 1e3:.2f} ms; "
              f"p99 case {ip['p99_over_baseline']}x, slowest {ip['max_seconds'] * 1e3:.0f} ms "
              f"({ip['max_over_baseline']}x); max RSS growth {ip['max_rss_growth_mb']} MB")
        print(f"  slowest: {ip['slowest'][1]}")
        print(f"cli: {c['cases']} cases, statuses {c['statuses']}, {len(c['violations'])} violations; "
              f"baseline `istio-vm config` {c['baseline_seconds'] * 1e3:.0f} ms; p50 {c['p50_seconds'] * 1e3:.0f} ms, "
              f"slowest {c['max_seconds'] * 1e3:.0f} ms ({c['max_over_baseline']}x); "
              f"peak RSS {c['peak_rss_mib_max']} MiB "
              f"(reference {c['reference_rss_mib']} MiB)")
        for violation in (ip["violations"] + c["violations"])[:20]:
            print("VIOLATION", violation)
    return 1 if result["in_process"]["violations"] or result["cli"]["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
