"""Benchmark: how long istio-vm's commands take to start, against a bare interpreter in the same run.

    sudo .venv/bin/python -m benchmarks.cli_startup [--runs 40] [--json]

Wall time of whole processes (fork to exit, stdout to /dev/null), the variants interleaved run by run:
bare `python -c pass` (the venv's interpreter, as the console scripts use it), `python -c 'import argparse'`
(the parser library alone), `istio-vm --help`, `istio-vm iptables plan` (the reference VM's cluster.env) and
`istio-vm config`, and two floors: the libraries `iptables plan` cannot do without (argparse, typing,
ipaddress, python-dotenv's lexer) and those install adds (logging, subprocess, json). Medians, and each as a
ratio to the bare interpreter. Nothing touches the host's rules.
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

from benchmarks.compiled import compile_package

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "reference-vm"
GOALS = {"istio-vm --help": 2.5, "istio-vm iptables plan": 3.0}
# argparse, typing (python-dotenv's lexer needs it), ipaddress, and the lexer's two modules from their files.
LIBRARIES = (
    "import argparse, ipaddress, typing, importlib.util as u\n"
    "d = u.find_spec('dotenv').submodule_search_locations[0]\n"
    "for n in ('parser', 'variables'):\n"
    "    s = u.spec_from_file_location('dotenv.' + n, d + '/' + n + '.py')\n"
    "    s.loader.exec_module(u.module_from_spec(s))\n")


def commands(workdir: Path) -> dict[str, list[str]]:
    python = sys.executable
    istio_vm = str(Path(python).parent / "istio-vm")
    sidecar, cluster = workdir / "sidecar.env", workdir / "cluster.env"
    sidecar.write_text("")
    cluster.write_text((DATA / "cluster.env").read_text())
    for path in (sidecar, cluster):
        path.chmod(0o644)
    files = ["--sidecar-env", str(sidecar), "--cluster-env", str(cluster)]
    return {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import argparse'": [python, "-c", "import argparse"],
        # What no istio-vm code can go below: the libraries `iptables plan` must load (the design's lexer
        # among them, loaded as config/envfile.py loads it), and with those that install adds.
        "floor: plan's libraries": [python, "-c", LIBRARIES],
        "floor: install's libraries": [python, "-c", LIBRARIES + "import logging, subprocess, json"],
        "istio-vm --help": [istio_vm, "--help"],
        "istio-vm iptables plan": [istio_vm, *files, "iptables", "plan", "--resolv-conf", str(DATA / "resolv.conf")],
        "istio-vm config": [istio_vm, *files, "config", "--resolv-conf", str(DATA / "resolv.conf")],
    }


def main(argv: list[str] | None = None) -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    env = {**os.environ, "PROXY_UID": "997", "EXEC_USER": "root"}
    with tempfile.TemporaryDirectory(prefix="istio-vm-startup-") as tmp:
        os.chmod(tmp, 0o755)
        cmds = commands(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.runs):
            for name, argv_ in cmds.items():
                start = time.perf_counter()
                done = subprocess.run(argv_, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
                times[name].append((time.perf_counter() - start) * 1000)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    bare = statistics.median(times["python -c pass"])
    results = {name: {"median_ms": round(statistics.median(v), 2), "ratio": round(statistics.median(v) / bare, 2),
                      **({"goal": GOALS[name]} if name in GOALS else {})} for name, v in times.items()}
    if args.json:
        print(json.dumps({"runs": args.runs, "load_average": os.getloadavg()[0], "results": results}, indent=1))
        return 0
    print(f"medians of {args.runs} runs (load average {os.getloadavg()[0]:.2f})")
    for name, r in results.items():
        goal = f"  goal {r['goal']}x: {'met' if r['ratio'] <= r['goal'] else 'NOT met'}" if "goal" in r else ""
        print(f"  {name:30} {r['median_ms']:7.2f} ms  {r['ratio']:5.2f}x{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
