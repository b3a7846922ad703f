"""A chaos soak of `istio-vm start`: random faults while invariants are checked throughout.

One round: start the service (iptables installed in its network namespace), wait for READY, then
for a random time do random things (SIGKILL of the proxy or of a grandchild, SIGHUP storms in envoy
mode, SIGUSR1, a notify socket nobody reads, a full log disk: a small tmpfs under ISTIO_LOG_DIR),
checking after each one that no more epochs run than may, that istio-vm's fds and memory do not
grow, and that the capture rules are in; then SIGTERM at that random moment, and check the exit
status, that nothing is left running, and that `iptables clean` leaves no Istio rule. Used by
tests/kernel/test_chaos.py (seconds) and benchmarks/chaos_soak.py (as long as asked).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from testbed.envoy import base_id, remove_shm
from testbed.service import Service, service
from testbed.wait import process_gone, wait_for

LOG_DISK = "256k"  # the tmpfs under ISTIO_LOG_DIR: small enough to fill in a moment
FD_SLACK = 8  # pipes of two epochs and a transient admin socket above the first READY's count
RSS_SLACK = 24 << 20


@dataclass
class Round:
    """What one round did and saw."""

    seed: int
    actions: dict[str, int] = field(default_factory=dict)
    max_epochs: int = 0
    fds: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    exit_status: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    logged: dict[str, int] = field(default_factory=dict)  # how often istio-vm logged these faults

    def count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A tmpfs of LOG_DISK mounted on `path` (world-writable, as the log dir is for istio-proxy)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LOG_DISK},mode=0777", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class Chaos:
    def __init__(self, svc: Service, rng: random.Random, *, envoy: bool) -> None:
        self.svc, self.rng, self.envoy = svc, rng, envoy
        self.log_dir = Path(svc.env["ISTIO_LOG_DIR"])
        self.filler = self.log_dir / "filler"
        self.stalled = False

    def proxies(self) -> list[psutil.Process]:
        """The supervised epochs: the daemon's live children running the proxy (not an orphan it
        adopted as subreaper and is about to kill)."""
        marker = "envoy" if self.envoy else "pilot_agent.py"
        found = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.svc.daemon_pid()).children():
                with contextlib.suppress(psutil.Error):
                    if child.status() != psutil.STATUS_ZOMBIE and any(marker in w for w in child.cmdline()[:2]):
                        found.append(child)
        return found

    def grandchildren(self) -> list[psutil.Process]:
        found = []
        for proxy in self.proxies():
            with contextlib.suppress(psutil.Error):
                found += proxy.children(recursive=True)
        return found

    def actions(self) -> list[tuple[str, Callable[[], None]]]:
        table: list[tuple[str, Callable[[], None]]] = [
            ("kill proxy", lambda: self._kill(self.proxies())),
            ("kill grandchild", lambda: self._kill(self.grandchildren())),
            ("sigusr1", lambda: self.svc.signal(signal.SIGUSR1)),
            ("notify stall", self._toggle_stall),
            ("disk full", self._toggle_disk),
            ("pause", lambda: None),
        ]
        if self.envoy:
            table.append(("sighup storm", self._sighups))
        return table

    def _kill(self, processes: list[psutil.Process]) -> None:
        if processes:
            with contextlib.suppress(psutil.Error):
                self.rng.choice(processes).kill()

    def _sighups(self) -> None:
        for _ in range(self.rng.randint(3, 20)):
            self.svc.signal(signal.SIGHUP)

    def _toggle_stall(self) -> None:
        self.stalled = not self.stalled  # while stalled, nobody reads the notify socket
        if not self.stalled:
            self.svc.notify.read()

    def _toggle_disk(self) -> None:
        if self.filler.exists():
            self.filler.unlink()
            return
        for log in ("istio.log", "istio.err.log"):  # their last page full too (a hole to the boundary):
            with contextlib.suppress(OSError):     # the next line needs a page the disk has not
                size = (self.log_dir / log).stat().st_size
                os.truncate(self.log_dir / log, -(-size // 4096) * 4096 + (4096 if size % 4096 == 0 else 0))
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for size in (65536, 4096, 1):  # until ENOSPC, down to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"x" * size)
        finally:
            os.close(fd)

    def check(self, result: Round) -> None:
        epochs = len(self.proxies())
        result.max_epochs = max(result.max_epochs, epochs)
        if epochs > (2 if self.envoy else 1):
            result.problems.append(f"{epochs} epochs at once")
        with contextlib.suppress(psutil.Error):
            daemon = psutil.Process(self.svc.daemon_pid())
            result.fds.append(daemon.num_fds())
            result.rss.append(daemon.memory_info().rss)
        if not self.stalled:
            self.svc.notify.read()
        if "ISTIO_OUTPUT" not in istio_rules(self.svc):
            result.problems.append("the capture rules are gone while istio-vm runs")


def istio_rules(svc: Service) -> str:
    saved = subprocess.run(["ip", "netns", "exec", svc.netns, "iptables-nft-save", "-t", "nat"], capture_output=True,
                           text=True, check=True, timeout=30).stdout
    return "\n".join(line for line in saved.splitlines() if "ISTIO" in line)


def run_round(svc: Service, seed: int, seconds: float, *, envoy: bool) -> Round:
    """One start, `seconds` of chaos (then SIGTERM), and the checks; problems in Round.problems."""
    rng = random.Random(seed)
    result = Round(seed)
    began = time.monotonic()
    chaos = Chaos(svc, rng, envoy=envoy)
    svc.notify.messages.clear()
    svc.start()
    svc.wait_notification("READY=1", timeout=30)
    chaos.check(result)
    baseline_fds, baseline_rss = result.fds[0], result.rss[0]
    actions = chaos.actions()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        name, act = rng.choice(actions)
        act()
        result.count(name)
        time.sleep(rng.uniform(0.02, 0.4))  # the chaos's own pace, not a synchronisation
        chaos.check(result)
        if svc.proc is not None and svc.proc.poll() is not None:
            result.problems.append(f"istio-vm exited by itself with status {svc.proc.returncode}")
            break
    chaos.stalled = True  # SIGTERM with nobody reading notifications, and maybe a full disk
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit(timeout=60)
    result.exit_status = status
    if status not in (0, 1):  # 0: drained; 1: the proxy had to be killed (docs/operations.md)
        result.problems.append(f"exit status {status}; log tail:\n{err[-2000:]}")
    if "Traceback" in err:
        result.problems.append(f"a traceback in istio-vm's log:\n{err[-3000:]}")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(process_gone(p.pid) for p in svc.processes()), 10, "the proxy's processes")
    if left := [p.pid for p in svc.processes() if not process_gone(p.pid)]:
        result.problems.append(f"left running: {left}")
    if max(result.fds) > baseline_fds + FD_SLACK:
        result.problems.append(f"fds grew: {baseline_fds} -> {max(result.fds)}")
    if result.rss[-1] > baseline_rss + RSS_SLACK:
        result.problems.append(f"memory grew: {baseline_rss >> 20} -> {result.rss[-1] >> 20} MiB")
    clean = svc.run("iptables", "clean")
    if clean.returncode != 0 or istio_rules(svc):
        result.problems.append(f"clean: {clean.returncode} {clean.stderr[-500:]} left {istio_rules(svc)!r}")
    with contextlib.suppress(FileNotFoundError):
        chaos.filler.unlink()
    result.seconds = time.monotonic() - began
    for event in ("dropping its lines", "lines were dropped", "notify socket is full", "sent by istio-vm"):
        result.logged[event] = err.count(event)
    return result


@contextlib.contextmanager
def chaos_service(envoy: Path | None, netns: str | None = None) -> Iterator[Service]:
    """A service for the soak: rules installed by istio-vm, files log target on a small tmpfs, a
    notify socket with a tiny receive buffer, restarts that never give up."""
    settings = {"ISTIO_VM_BACKOFF_INITIAL": "0.05s", "ISTIO_VM_BACKOFF_MAX": "0.2s", "ISTIO_VM_MAX_RESTARTS": "1000",
                "TERMINATION_DRAIN_DURATION": "1s", "ISTIO_VM_STOP_TIMEOUT": "3s", "ISTIO_LOG_TARGET": "files"}
    base = base_id() if envoy is not None else None
    with service(netns=netns) as svc:
        svc.notify.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        svc.env.pop("ISTIO_CUSTOM_IP_TABLES", None)
        if envoy is not None and base is not None:
            for fixed in ("ISTIO_VM_BACKOFF_INITIAL", "TERMINATION_DRAIN_DURATION"):  # envoy_mode sets them
                settings.pop(fixed)
            svc.envoy_mode(envoy, base, ENVOY_DRAIN_TIME_S="1", ENVOY_PARENT_SHUTDOWN_TIME_S="2", **settings)
        else:
            svc.env.pop("PROXY_UID", None)
            svc.write_env("".join(f"{k}={v}\n" for k, v in settings.items()))
        try:
            with small_disk(Path(svc.env["ISTIO_LOG_DIR"])):
                yield svc
        finally:
            if base is not None:
                remove_shm(base)
            os.sync()
