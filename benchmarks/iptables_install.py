"""Benchmark: installing the reference VM's rules, Istio 1.9's way versus istio-vm's, in fresh netns.

    sudo .venv/bin/python -m benchmarks.iptables_install [--runs 20] [--json]

Each run uses a new network namespace (created and deleted outside the timing) and times, as wall
time from this process with the thread moved into the namespace:
  replay   bash running 1.9's logged sequence: the 34 clean commands of clean-commands-1.9.txt,
           iptables-save, iptables-restore --noflush <file of expected-v4.restore>,
           ip6tables-restore --noflush <empty file>, iptables-save (plain `iptables`, as 1.9 ran it)
  ours     istio_vm.iptables.apply.install_plan() of expected-v4.restore, called in this interpreter
           (what `istio-vm start` spends, the interpreter being up already)
  ours-cli `istio-vm iptables install` on the reference VM's cluster.env and resolv.conf (PROXY_UID=997):
           the command as an operator runs it, interpreter start-up, config and plan included
  floor    one bare `iptables-nft-restore` of the same text (replacing the nat table whole)
Two scenarios: "first start" (empty namespace) and "restart" (the rules already installed once
the same way, untimed). Spawns are counted in a separate run with `strace -f -e trace=execve`
(successful execve calls, minus the measured program itself); for ours also by Runner calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.compiled import compile_package
from istio_vm.iptables import apply
from istio_vm.iptables.rules import Plan
from testbed.netns import Netns

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "reference-vm"
RULES = (DATA / "expected-v4.restore").read_text()
CLEAN_19 = (DATA / "clean-commands-1.9.txt").read_text().splitlines()


# The run dirs (state file, lock) on a tmpfs, as /run/istio-vm is on every systemd host: on this machine's ext4
# the state file's two fsyncs alone add ~0.7 ms to each install that a VM never pays.
RUN_DIR_FS = "/dev/shm"


@contextlib.contextmanager
def namespace() -> Iterator[Netns]:
    """A fresh network namespace, entered by this thread (children inherit it), always deleted."""
    with Netns.temporary("apply-bench") as ns, ns.entered():
        yield ns


def replay_script(workdir: Path) -> Path:
    rules, empty = workdir / "iptables-rules.txt", workdir / "ip6tables-rules.txt"
    rules.write_text(RULES)
    empty.write_text("")
    lines = ["#!/bin/bash", "# Istio 1.9.4's commands for one VM start, in order; every clean error ignored"]
    lines += [f"{command} >/dev/null 2>&1" for command in CLEAN_19]
    lines += ["iptables-save >/dev/null", f"iptables-restore --noflush {rules} || exit 1",
              f"ip6tables-restore --noflush {empty} || exit 1", "iptables-save >/dev/null"]
    script = workdir / "replay-1.9.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def run_checked(argv: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def cli_argv(run_dir: str) -> list[str]:
    """`istio-vm iptables install` of the reference VM (it writes exactly expected-v4.restore)."""
    return ["env", "PROXY_UID=997", "EXEC_USER=root", f"ISTIO_VM_RUN_DIR={run_dir}",
            str(Path(sys.executable).parent / "istio-vm"), "--sidecar-env", "/nonexistent",
            "--cluster-env", str(DATA / "cluster.env"), "iptables", "install",
            "--resolv-conf", str(DATA / "resolv.conf")]


def variants(workdir: Path) -> dict[str, Callable[[str], object]]:
    script = replay_script(workdir)

    def ours(run_dir: str) -> object:
        return apply.install_plan(Plan.from_restore(RULES), run_dir=run_dir)

    return {
        "replay": lambda run_dir: run_checked(["bash", str(script)]),
        "ours": ours,
        "ours-cli": lambda run_dir: run_checked(cli_argv(run_dir)),
        # Without --noflush: replaces the nat table whole, so it also works when the rules are there.
        "floor": lambda run_dir: run_checked(["iptables-nft-restore"], RULES),
    }


def timed(fn: Callable[[str], object], workdir: Path, restart: bool) -> float:
    run_dir = tempfile.mkdtemp(dir=workdir)
    with namespace():
        if restart:
            fn(run_dir)  # the previous start, same way, untimed
        start = time.perf_counter()
        fn(run_dir)
        return (time.perf_counter() - start) * 1000


def spawns(argv: list[str], workdir: Path, restart: bool) -> int:
    """Successful execve calls of argv and all its descendants, minus argv's own."""
    trace = workdir / f"trace-{uuid.uuid4().hex[:6]}"
    with namespace():
        if restart:
            run_checked(argv)
        run_checked(["strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace), *argv])
    calls = [line for line in trace.read_text().splitlines() if "execve(" in line and line.rstrip().endswith("= 0")]
    return len(calls) - (2 if argv[0] == "env" else 1)  # argv's own execs (env, then istio-vm)


def main() -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (creates network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="istio-vm-bench-", dir=RUN_DIR_FS) as tmp:
        workdir = Path(tmp)
        fns = variants(workdir)
        for scenario, restart in (("first start", False), ("restart", True)):
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.runs):
                for name, fn in fns.items():  # interleaved, so drift in machine load hits all alike
                    times[name].append(timed(fn, workdir, restart))
            with namespace():
                report = apply.install_plan(Plan.from_restore(RULES), run_dir=tempfile.mkdtemp(dir=workdir))
                runner_calls = report.processes
            counted: dict[str, object] = {"ours (Runner calls)": runner_calls}
            if shutil.which("strace"):
                counted["replay (strace execve)"] = spawns(["bash", str(workdir / "replay-1.9.sh")], workdir, restart)
                counted["ours-cli (strace execve)"] = spawns(cli_argv(tempfile.mkdtemp(dir=workdir)), workdir,
                                                             restart)
                counted["floor (strace execve)"] = 1
            medians = {name: statistics.median(values) for name, values in times.items()}
            results[scenario] = {
                "runs": args.runs,
                "median_ms": {k: round(v, 2) for k, v in medians.items()},
                "ratio replay/ours": round(medians["replay"] / medians["ours"], 2),
                "ratio replay/ours-cli": round(medians["replay"] / medians["ours-cli"], 2),
                "ratio ours/floor": round(medians["ours"] / medians["floor"], 2),
                "spawns": counted,
            }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for scenario, r in results.items():
        print(f"== {scenario} ({r['runs']} runs, each in a fresh network namespace; medians)")
        for name, ms in r["median_ms"].items():  # type: ignore[attr-defined]
            print(f"  {name:9} {ms:8.2f} ms")
        for key in ("ratio replay/ours", "ratio replay/ours-cli", "ratio ours/floor"):
            print(f"  {key}: {r[key]}")
        for key, value in r["spawns"].items():  # type: ignore[attr-defined]
            print(f"  spawns, {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
