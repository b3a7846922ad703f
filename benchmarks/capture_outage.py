"""Benchmark: a 3 s proxy outage under steady outbound load, per ISTIO_VM_CAPTURE policy, side by side.

    sudo .venv/bin/python -m benchmarks.capture_outage [--outage 3] [--cycles 10] [--json]

For each policy, `istio-vm start` (agent mode, the pilot-agent double, the reference VM's cluster.env)
runs in a "vm" network namespace joined to a "client" namespace (the outside: a TCP destination on
10.99.0.1:8000 and a DNS responder on 10.99.0.1:53, the VM's nameserver). The benchmark plays the proxy's
listeners (TCP 15001, UDP 15053 in the vm), open only while the proxy is ready. An ordinary user (uid
12345) in the vm alternates TCP connections and DNS queries; then the proxy is SIGKILLed and its next
epoch held unready for --outage seconds. Counted: operations that failed (refused, no answer), that
went through the proxy's listeners, and that bypassed the proxy (reached the destination directly).

Then --cycles outages in a row with fail-open: the lift and the reinstall as istio-vm logs them
(ISTIO_CAPTURE_MS: from the machine's decision, made when the exit is reaped or the readiness seen, to
the helper's answer), median and p95, as a ratio to the baseline: one in-process install_plan() of
the same reference plan into a fresh namespace, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from istio_vm.iptables import apply
from istio_vm.iptables.rules import Plan
from testbed.netns import CLIENT_V4, Netns, Pair, pair, resolv_conf
from testbed.service import REFERENCE_CLUSTER_ENV, Service, ensure_user, service
from testbed.wait import wait_for

POLICIES = ("fail-closed", "outbound-fail-open", "fail-open")
APP_UID = 12345
DNS_QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01"
REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "reference-vm" / "expected-v4.restore"
CAPTURE_LINE = re.compile(r"Capture: (?P<state>[a-z ]+) \((?P<why>[^)]*)\), (?P<ms>[0-9.]+) ms")


class Listeners:
    """TCP and UDP listeners in a namespace, counting what reaches them (UDP: answered), in threads."""

    def __init__(self, ns: Netns, address: str, tcp: int, udp: int, name: str) -> None:
        self.ns, self.address, self.ports, self.name = ns, address, (tcp, udp), name
        self.counts: Counter[str] = Counter()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def open(self) -> None:
        with self.ns.entered():
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.address, self.ports[0]))
            tcp.listen(128)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.address, self.ports[1]))
        self._stop = threading.Event()
        self._sockets = [tcp, udp]
        self._threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self._sockets]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop serving and release the ports (the threads are joined before the sockets close)."""
        self._stop.set()
        for t in self._threads:
            t.join()
        for s in self._sockets:
            s.close()
        self._sockets, self._threads = [], []

    def _serve(self, s: socket.socket) -> None:
        s.settimeout(0.02)  # so close() is seen within 20 ms
        while not self._stop.is_set():
            try:
                if s.type == socket.SOCK_STREAM:
                    conn, _ = s.accept()
                    self.counts["tcp"] += 1
                    conn.close()
                else:
                    data, peer = s.recvfrom(512)
                    self.counts["dns"] += 1
                    s.sendto(data, peer)
            except TimeoutError:
                continue


def load(seconds: float) -> dict[str, int]:
    """In the vm as an ordinary user, for `seconds`: TCP connections in one thread, DNS queries (0.3 s
    timeout, as a resolver's first try) in another, each a few ms apart."""
    counts: Counter[str] = Counter()
    end = time.monotonic() + seconds

    def tcp() -> None:
        while time.monotonic() < end:
            try:
                socket.create_connection((CLIENT_V4, 8000), timeout=0.5).close()
                counts["tcp ok"] += 1
            except OSError:
                counts["tcp failed"] += 1
            time.sleep(0.002)

    def dns() -> None:
        while time.monotonic() < end:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
                q.settimeout(0.3)
                try:
                    q.sendto(DNS_QUERY, (CLIENT_V4, 53))
                    q.recv(512)
                    counts["dns ok"] += 1
                except OSError:
                    counts["dns failed"] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=tcp), threading.Thread(target=dns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(counts)


@contextlib.contextmanager
def vm_service(p: Pair, policy: str) -> Iterator[Service]:
    ensure_user("istio-proxy")
    with resolv_conf(p.vm.name, CLIENT_V4), service(
            {"ISTIO_VM_BACKOFF_INITIAL": "0.1s", "TERMINATION_DRAIN_DURATION": "1s"}, netns=p.vm.name) as svc:
        svc.env.pop("ISTIO_CUSTOM_IP_TABLES")
        svc.env.pop("PROXY_UID")
        svc.env["DOUBLE_READY_FILE"] = str(svc.workdir / "ready")
        svc.write_env(REFERENCE_CLUSTER_ENV.read_text() + f"ISTIO_VM_CAPTURE={policy}\nISTIO_VM_MAX_RESTARTS=1000\n"
                      "ISTIO_VM_BACKOFF_MAX=0.2s\n")
        yield svc


def outage(policy: str, seconds: float) -> dict[str, Any]:
    with pair("capbench") as p, vm_service(p, policy) as svc:
        proxy = Listeners(p.vm, "0.0.0.0", 15001, 15053, "proxy")
        outside = Listeners(p.client, CLIENT_V4, 8000, 53, "destination")
        outside.open()
        proxy.open()
        gate = svc.workdir / "ready"
        gate.touch()
        svc.start()
        svc.wait_notification("READY=1")
        result: dict[str, Any] = {}
        def run_load() -> None:
            # A separate process (exec'd: it inherits none of the listeners, which a fork would keep open).
            done = subprocess.run(["ip", "netns", "exec", p.vm.name, "setpriv", f"--reuid={APP_UID}",
                                   f"--regid={APP_UID}", "--clear-groups", sys.executable, "-m",
                                   "benchmarks.capture_outage", "--load", str(seconds + 3.0)],
                                  capture_output=True, text=True, timeout=seconds + 60, check=True,
                                  cwd=Path(__file__).resolve().parent.parent)
            result.update(json.loads(done.stdout))

        runner = threading.Thread(target=run_load)
        runner.start()
        wait_for(lambda: proxy.counts["tcp"] > 100, 30, "steady load through the proxy")
        gate.unlink()
        proxy.close()
        os.kill(svc.records("start")[-1]["pid"], signal.SIGKILL)
        time.sleep(seconds)
        proxy.open()
        gate.touch()
        svc.wait_notification("STATUS=epoch 1 running")
        runner.join()
        proxy.close()
        outside.close()
        failed = result.get("tcp failed", 0) + result.get("dns failed", 0)
        return {"policy": policy, "operations": sum(result.values()), "failed": failed,
                "through proxy": proxy.counts["tcp"] + proxy.counts["dns"],
                "bypassed": outside.counts["tcp"] + outside.counts["dns"], "load": result,
                "capture changes": [m.group(0) for m in CAPTURE_LINE.finditer(svc.log())]}


def latencies(cycles: int) -> dict[str, list[float]]:
    with pair("capbench") as p, vm_service(p, "fail-open") as svc:
        gate = svc.workdir / "ready"
        gate.touch()
        svc.start()
        svc.wait_notification("READY=1")
        for epoch in range(1, cycles + 1):
            gate.unlink()
            os.kill(svc.records("start")[-1]["pid"], signal.SIGKILL)
            wait_for(lambda e=epoch: len(svc.records("start")) > e, 10, "the next epoch")  # type: ignore[misc]
            gate.touch()
            svc.wait_notification(f"STATUS=epoch {epoch} running")
        # epoch 0's ready, then a lift and a reinstall per cycle (start installs the lifted state itself)
        wait_for(lambda: len(CAPTURE_LINE.findall(svc.log())) >= 2 * cycles + 1, 5, "the capture entries")
        found = [m.groupdict() for m in CAPTURE_LINE.finditer(svc.log())]
    return {"lift": [float(m["ms"]) for m in found if "exited" in m["why"]],
            "reinstall": [float(m["ms"]) for m in found if m["why"].startswith("epoch") and "ready" in m["why"]
                          and m["why"] != "epoch 0 ready"]}


def baseline(runs: int) -> list[float]:
    plan = Plan.from_restore(REFERENCE.read_text())
    times = []
    for _ in range(runs):
        with Netns.temporary("capbase") as ns, ns.entered():
            run_dir = f"/tmp/capbase-{ns.name}"
            began = time.perf_counter()
            apply.install_plan(plan, run_dir=run_dir)
            times.append((time.perf_counter() - began) * 1000)
            shutil.rmtree(run_dir, ignore_errors=True)
    return times


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=3.0)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--load", type=float, help=argparse.SUPPRESS)  # the load generator itself
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load)))
        return 0
    rows = [outage(policy, args.outage) for policy in POLICIES]
    lat = latencies(args.cycles)
    base = baseline(args.cycles)
    figures = {"outage_seconds": args.outage, "policies": rows,
               "latency_ms": {k: {"median": statistics.median(v), "p95": p95(v), "n": len(v)} for k, v in lat.items()},
               "baseline_install_ms": {"median": statistics.median(base), "p95": p95(base)}}
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{args.outage:g} s outage under load (an ordinary user's TCP connections and DNS queries):")
    print(f"{'policy':<20} {'operations':>10} {'failed':>8} {'through proxy':>14} {'bypassed':>9}")
    for r in rows:
        print(f"{r['policy']:<20} {r['operations']:>10} {r['failed']:>8} {r['through proxy']:>14} {r['bypassed']:>9}")
    b = figures["baseline_install_ms"]["median"]
    for what, v in figures["latency_ms"].items():
        print(f"{what}: median {v['median']:.1f} ms ({v['median'] / b:.2f}x baseline), p95 {v['p95']:.1f} ms, "
              f"n={v['n']}")
    print(f"baseline (one in-process install_plan of the reference plan): median {b:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
