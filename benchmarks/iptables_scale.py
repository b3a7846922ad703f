"""Benchmark: install, re-install, clean and verify at 1 to 5000 rules, against the floor and Istio 1.9's replay.

    sudo .venv/bin/python -m benchmarks.iptables_scale [--runs 5] [--sizes 1,100,1000,5000] [--json]

The reference VM's cluster.env with ISTIO_INBOUND_PORTS of N ports ("ports", N rules in ISTIO_INBOUND) or
ISTIO_SERVICE_EXCLUDE_CIDR of N CIDRs ("cidrs", N rules in ISTIO_OUTPUT). Every timed operation runs in a
new network namespace (created, and for re-install/clean/verify filled by an untimed install, outside the
timing), entered by this thread; the variants alternate within each run. Wall time, medians of --runs.

ours     istio_vm.iptables.apply.install_plan / clean_host and verify.compare, in this interpreter (the plan
         built beforehand): what `istio-vm start` and a long-lived caller spend.
floor    the kernel work the operation must do, as bare processes with the same inputs (taken from a dry run):
         install/re-install/clean: the two saves, then one `iptables-nft-restore --noflush` of the text ours
         writes; verify: the two saves, then `unshare --net` restoring the plan and saving it back.
cli      `istio-vm iptables install|clean|verify` on that cluster.env: a new process, config and plan included.
replay   Istio 1.9's commands (bash): install = the 34 clean commands, iptables-save, iptables-restore
         --noflush of the plan, ip6tables-restore --noflush of nothing, iptables-save; clean = the 34 clean
         commands. (1.9 had no verify.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.compiled import compile_package
from istio_vm.config.load import load
from istio_vm.config.sources import Sources
from istio_vm.iptables import apply, verify
from istio_vm.iptables.plan import build_plan
from istio_vm.iptables.rules import Plan
from testbed.netns import Netns

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "reference-vm"
CLEAN_19 = (DATA / "clean-commands-1.9.txt").read_text().splitlines()
ENV = {"PROXY_UID": "997", "EXEC_USER": "root"}
OPERATIONS = ("install", "re-install", "clean", "verify")


# The run dirs (state file, lock) on a tmpfs, as /run/istio-vm is on every systemd host: on this machine's ext4
# the state file's two fsyncs alone add ~0.7 ms to each install that a VM never pays.
RUN_DIR_FS = "/dev/shm"


@contextlib.contextmanager
def namespace() -> Iterator[Netns]:
    with Netns.temporary("scale-bench") as ns, ns.entered():
        yield ns


def cluster_env(workdir: Path, series: str, n: int) -> Path:
    if series == "ports":
        extra = "ISTIO_INBOUND_PORTS='" + ",".join(str(10000 + i) for i in range(n)) + "'\n"
    else:
        extra = "ISTIO_SERVICE_EXCLUDE_CIDR='" + ",".join(f"10.{i // 250}.{i % 250}.0/24" for i in range(n)) + "'\n"
    path = workdir / f"cluster-{series}-{n}.env"
    path.write_text((DATA / "cluster.env").read_text() + extra)
    path.chmod(0o644)
    return path


def run_checked(argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def cli(env_file: Path, run_dir: str, *command: str) -> list[str]:
    return [str(Path(sys.executable).parent / "istio-vm"), "--sidecar-env", "/nonexistent", "--cluster-env",
            str(env_file), "iptables", *command, *(["--resolv-conf", str(DATA / "resolv.conf")]
                                                     if command[0] != "clean" else [])]


def replay_script(workdir: Path, plan: Plan, name: str, install: bool) -> Path:
    rules, empty = workdir / f"{name}.rules", workdir / f"{name}.empty"
    rules.write_text(plan.restore(4))
    empty.write_text("")
    lines = ["#!/bin/bash", *(f"{command} >/dev/null 2>&1" for command in CLEAN_19)]
    if install:
        lines += ["iptables-save >/dev/null", f"iptables-restore --noflush {rules} || exit 1",
                  f"ip6tables-restore --noflush {empty} || exit 1", "iptables-save >/dev/null"]
    lines.append("exit 0")  # the clean commands' errors are ignored, as 1.9 did
    script = workdir / f"{name}.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def floor_restore(text: str) -> None:
    run_checked(["iptables-nft-save"])
    run_checked(["ip6tables-nft-save"])
    if text:
        run_checked(["iptables-nft-restore", "--noflush", "--wait=30"], text)


def floor_verify(plan: Plan) -> None:
    run_checked(["iptables-nft-save"])
    run_checked(["ip6tables-nft-save"])
    run_checked(["unshare", "--net", "--", "sh", "-c", "iptables-nft-restore --wait=10 && iptables-nft-save"],
                plan.restore(4))


def measure(series: str, n: int, runs: int, workdir: Path) -> dict[str, Any]:
    env_file = cluster_env(workdir, series, n)
    environ = {**os.environ, **ENV}
    config = load(Sources(sidecar_env="/nonexistent", cluster_env=str(env_file),
                          resolv_conf=str(DATA / "resolv.conf")), environ)
    plan = build_plan(config.capture)
    rules = len(plan.v4) + len(plan.v6)
    replay_install = replay_script(workdir, plan, f"replay-{series}-{n}", install=True)
    replay_clean = replay_script(workdir, plan, f"replay-clean-{series}-{n}", install=False)

    def fresh() -> str:
        return tempfile.mkdtemp(dir=workdir)

    def install(run_dir: str) -> None:
        apply.install_plan(plan, run_dir=run_dir)

    # Inputs of the floor: what ours writes, from dry runs (untimed) in a namespace in each state.
    with namespace():
        first_text = apply.install_plan(plan, run_dir=fresh(), dry_run=True).families[0].restore_input
        done = fresh()
        install(done)
        again_text = apply.install_plan(plan, run_dir=done, dry_run=True).families[0].restore_input
        clean_text = apply.clean_host(run_dir=done, dry_run=True).families[0].restore_input

    variants: dict[str, dict[str, Callable[[str], object]]] = {
        "install": {
            "ours": install, "floor": lambda d: floor_restore(first_text),
            "cli": lambda d: run_checked(cli(env_file, d, "install"), env={**environ, "ISTIO_VM_RUN_DIR": d}),
            "replay": lambda d: run_checked(["bash", str(replay_install)]),
        },
        "re-install": {
            "ours": install, "floor": lambda d: floor_restore(again_text),
            "cli": lambda d: run_checked(cli(env_file, d, "install"), env={**environ, "ISTIO_VM_RUN_DIR": d}),
            "replay": lambda d: run_checked(["bash", str(replay_install)]),
        },
        "clean": {
            "ours": lambda d: apply.clean_host(run_dir=d), "floor": lambda d: floor_restore(clean_text),
            "cli": lambda d: run_checked(cli(env_file, d, "clean"), env={**environ, "ISTIO_VM_RUN_DIR": d}),
            "replay": lambda d: run_checked(["bash", str(replay_clean)]),
        },
        "verify": {
            "ours": lambda d: verify.compare(plan, run_dir=d), "floor": lambda d: floor_verify(plan),
            "cli": lambda d: run_checked(cli(env_file, d, "verify"), env={**environ, "ISTIO_VM_RUN_DIR": d}),
        },
    }
    times: dict[str, dict[str, list[float]]] = {op: {v: [] for v in vs} for op, vs in variants.items()}
    for _ in range(runs):
        for op, vs in variants.items():
            for name, fn in vs.items():
                run_dir = fresh()
                with namespace():
                    if op != "install":
                        install(run_dir)  # the state the operation starts from, untimed
                    start = time.perf_counter()
                    fn(run_dir)
                    times[op][name].append((time.perf_counter() - start) * 1000)
    medians = {op: {name: round(statistics.median(v), 2) for name, v in vs.items()} for op, vs in times.items()}
    ratios: dict[str, dict[str, float]] = {}
    for op, m in medians.items():
        ratios[op] = {"ours/floor": round(m["ours"] / m["floor"], 2)}
        if "replay" in m:
            ratios[op]["cli/replay"] = round(m["cli"] / m["replay"], 2)
    ratios["verify"]["verify/install (ours)"] = round(medians["verify"]["ours"] / medians["install"]["ours"], 2)
    ratios["verify"]["verify/install (cli)"] = round(medians["verify"]["cli"] / medians["install"]["cli"], 2)
    return {"series": series, "n": n, "rules": rules, "median_ms": medians, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="1,100,1000,5000")
    parser.add_argument("--series", default="ports,cidrs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (creates network namespaces)", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="istio-vm-scale-", dir=RUN_DIR_FS) as tmp:
        for series in args.series.split(","):
            for n in (int(s) for s in args.sizes.split(",")):
                results.append(measure(series, n, args.runs, Path(tmp)))
                if not args.json:
                    print_row(results[-1])
    if args.json:
        print(json.dumps({"runs": args.runs, "load_average": os.getloadavg()[0], "results": results}, indent=1))
    return 0


def print_row(r: dict[str, Any]) -> None:
    print(f"== {r['series']} N={r['n']} ({r['rules']} plan rules), medians in ms")
    for op, m in r["median_ms"].items():
        figures = "  ".join(f"{name} {ms:8.2f}" for name, ms in m.items())
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in r["ratios"][op].items())
        print(f"  {op:10} {figures}   {ratios}")


if __name__ == "__main__":
    sys.exit(main())
