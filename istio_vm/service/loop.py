"""The supervise loop: one thread, one `select`, every effect of the supervisor's decisions.

It sleeps until a signal, child output or a deadline (backoff, readiness probe, drain, watchdog)
needs it, then feeds what happened to the `Supervisor` and carries out the actions it answers with.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from istio_vm.config.model import Config
from istio_vm.logs import ChildOutput
from istio_vm.service import proxy_admin, proxy_command
from istio_vm.service.machine import (
    Action,
    CountConnections,
    Drain,
    Exit,
    KillTree,
    Notify,
    Policy,
    ProbeReady,
    Signal,
    Spawn,
    State,
    Supervisor,
)
from istio_vm.service.notify import Notifier
from istio_vm.service.processes import Child, ProcessOps
from istio_vm.service.signals import SignalQueue

log = logging.getLogger(__name__)
MAX_LINE = 65536  # a longer line is relayed in pieces rather than buffered without bound


class ProxyAdmin(Protocol):
    def ready(self, restart_epoch: int) -> bool: ...
    def drain(self) -> None: ...
    def active_connections(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class AgentAdmin:
    port: int = 15021

    def ready(self, restart_epoch: int) -> bool:
        return proxy_admin.agent_ready(self.port)

    def drain(self) -> None:  # pilot-agent drains Envoy itself on SIGTERM
        pass

    def active_connections(self) -> int | None:
        return None


@dataclass(frozen=True, slots=True)
class EnvoyAdmin:
    port: int
    inbound_only: bool

    def ready(self, restart_epoch: int) -> bool:
        return proxy_admin.envoy_ready(self.port, restart_epoch)

    def drain(self) -> None:
        proxy_admin.drain(self.port, inbound_only=self.inbound_only)

    def active_connections(self) -> int | None:
        return proxy_admin.active_connections(self.port)


def policy(config: Config) -> Policy:
    s = config.supervision
    return Policy(
        hot_restart=s.proxy == "envoy", backoff_initial=s.backoff_initial, backoff_max=s.backoff_max,
        backoff_reset=s.backoff_reset, max_restarts=s.max_restarts, restart_window=s.restart_window,
        termination_drain=s.termination_drain, stop_timeout=s.stop_timeout,
    )


def admin_for(config: Config) -> ProxyAdmin:
    s = config.supervision
    if s.proxy == "envoy":
        return EnvoyAdmin(s.admin_port, inbound_only=s.drain_listeners == "inbound")
    return AgentAdmin()


@dataclass(slots=True)
class _Stream:
    epoch: int
    pid: int
    name: str  # "stdout" or "stderr"
    pending: bytes = b""


@dataclass
class Daemon:
    config: Config
    ops: ProcessOps
    notifier: Notifier
    output: ChildOutput
    proxy: ProxyAdmin
    identity_env: Mapping[str, str] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    watchdog_interval: float | None = None  # half of systemd's WATCHDOG_USEC
    supervisor: Supervisor = field(init=False)
    _selector: selectors.BaseSelector = field(init=False, default_factory=selectors.DefaultSelector)
    _restart_epochs: dict[int, int] = field(init=False, default_factory=dict)
    _next_watchdog: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(policy(self.config), clock=self.clock)

    def run(self, signals: SignalQueue) -> int:
        """Supervise until the proxy is stopped (or given up on); the exit status of istio-vm."""
        self._selector.register(signals.wakeup, selectors.EVENT_READ, None)
        if self.watchdog_interval:
            self._next_watchdog = self.clock()
        self._execute(self.supervisor.start())
        while self.supervisor.state is not State.STOPPED:
            for key, _ in self._selector.select(self._timeout()):
                if key.data is not None:
                    self._read(key)
            for signum in signals.drain():
                self._on_signal(signum)
            # Read what the children wrote before reaping them, so their last words are kept.
            for pid, wait_status in self.ops.reap():
                self._execute(self.supervisor.exited(pid, wait_status))
            self._execute(self.supervisor.tick())
            self._watchdog()
        self._flush_output()
        return 1 if self.supervisor.exit_status is None else self.supervisor.exit_status

    # ---- events ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("Received %s", signal.Signals(signum).name, extra={"ISTIO_EVENT": "drain"})
            self._execute(self.supervisor.terminate())
        elif signum == signal.SIGHUP:
            log.info("Received SIGHUP", extra={"ISTIO_EVENT": "restart"})
            self._execute(self.supervisor.reload())
        elif signum == signal.SIGUSR1:
            log.info("Received SIGUSR1: reopening log files")
            self.output.reopen()
            if self.supervisor.policy.hot_restart:  # Envoy reopens its access logs; pilot-agent would not
                for pid in self.supervisor.epochs:
                    self.ops.signal(pid, signal.SIGUSR1)
        # SIGCHLD only wakes the loop: every iteration reaps.

    def _read(self, key: selectors.SelectorKey) -> bool:
        """Relay what the child wrote; False once nothing more is there (for now, or for good)."""
        stream: _Stream = key.data
        try:
            data = os.read(key.fd, MAX_LINE)
        except BlockingIOError:
            return False
        if not data:
            self._close(key.fd, stream)
            return False
        lines = (stream.pending + data).split(b"\n")
        stream.pending = lines.pop()
        if len(stream.pending) >= MAX_LINE:
            lines.append(stream.pending)
            stream.pending = b""
        for line in lines:
            self.output.line(stream.epoch, stream.pid, stream.name, line.decode("utf-8", "replace"))
        return True

    def _close(self, fd: int, stream: _Stream) -> None:
        if stream.pending:
            self.output.line(stream.epoch, stream.pid, stream.name, stream.pending.decode("utf-8", "replace"))
        self._selector.unregister(fd)
        os.close(fd)

    def _flush_output(self) -> None:
        """After the last exit: relay what is left in the pipes, then close them."""
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                while self._read(key):
                    pass
            if key.fd in self._selector.get_map():
                if key.data is None:
                    self._selector.unregister(key.fd)
                else:
                    self._close(key.fd, key.data)
        self._selector.close()

    def _timeout(self) -> float | None:
        times = [t for t in (self.supervisor.next_deadline(), self._next_watchdog) if t is not None]
        return max(0.0, min(times) - self.clock()) if times else None

    def _watchdog(self) -> None:
        if self._next_watchdog is None or self.watchdog_interval is None or self.clock() < self._next_watchdog:
            return
        self.notifier.send("WATCHDOG=1")
        self._next_watchdog = self.clock() + self.watchdog_interval

    # ---- actions ------------------------------------------------------------------------------
    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Spawn(epoch=epoch, restart_epoch=restart_epoch):
                    self._spawn(epoch, restart_epoch)
                case Signal(pid=pid, signal=signum):
                    self.ops.signal(pid, signum)
                case KillTree(pid=pid):
                    self.ops.kill_tree(pid, keep=self.supervisor.epochs.keys())
                case Drain():
                    self.proxy.drain()
                case ProbeReady(epoch=epoch):
                    if self.proxy.ready(self._restart_epochs.get(epoch, 0)):
                        self._execute(self.supervisor.ready(epoch))
                case CountConnections():
                    self._execute(self.supervisor.connections(self.proxy.active_connections()))
                case Notify(message=message):
                    self.notifier.send(message)
                case Exit():
                    pass  # the loop ends: the supervisor is STOPPED

    def _spawn(self, epoch: int, restart_epoch: int) -> None:
        if self.config.supervision.proxy == "envoy":
            argv = proxy_command.envoy_command(self.config, restart_epoch)
            if restart_epoch == 0:
                _remove_foreign_shared_memory(self.config.supervision.base_id)
        else:
            argv = proxy_command.agent_command(self.config)
        log.info("Epoch %s command: %s", epoch, " ".join(argv), extra={"ISTIO_EPOCH": epoch})
        self._restart_epochs[epoch] = restart_epoch
        try:
            started: Child = self.ops.spawn(argv, proxy_command.environment(self.config, self.identity_env))
        except OSError as e:
            self._execute(self.supervisor.spawn_failed(epoch, f"{argv[0]}: {e.strerror or e}"))
            return
        for fd, name in ((started.stdout, "stdout"), (started.stderr, "stderr")):
            self._selector.register(fd, selectors.EVENT_READ, _Stream(epoch, started.pid, name))
        self._execute(self.supervisor.spawned(epoch, started.pid))


def _remove_foreign_shared_memory(base_id: int) -> None:
    """Envoy's hot-restart memory left by another user (e.g. an old run as root) makes a fresh
    epoch 0 abort ("cannot open shared memory region"); ours is reused safely, even after a SIGKILL."""
    path = f"/dev/shm/envoy_shared_memory_{base_id * 10}"
    try:
        if os.stat(path).st_uid != os.geteuid():
            os.unlink(path)
            log.info("Removed %s (left by another user)", path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("Cannot remove %s: %s", path, e)
