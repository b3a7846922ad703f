"""The supervise loop: one thread, one `select`, every effect of the supervisor's decisions.

It sleeps until a signal, child output or a deadline (backoff, readiness probe, drain, watchdog)
needs it, then feeds what happened to the `Supervisor` (machine.py) and carries out the actions it
answers with. It decides nothing itself: which signal means what is the table SIGNALS, and what
to do is the machine's answer.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from istio_vm import loggers
from istio_vm.iptables.parts import ALL_PARTS, Part, describe_parts
from istio_vm.service.machine import (
    Action,
    CountConnections,
    Drain,
    KillTree,
    Notify,
    ProbeReady,
    ReloadDone,
    SetCapture,
    Signal,
    Spawn,
    State,
    Supervisor,
)
from istio_vm.service.notify import Notifier
from istio_vm.service.processes import Child, ProcessOps
from istio_vm.service.proxy_admin import ProxyAdmin
from istio_vm.service.proxy_command import ProxyCommand
from istio_vm.service.proxy_output import ProxyOutput
from istio_vm.service.signals import SignalQueue

if TYPE_CHECKING:  # capture_helper loads the apply engine: only a policy that follows the proxy needs it
    from istio_vm.service.capture_helper import CaptureHelper
    from istio_vm.service.machine import Policy
    from istio_vm.service.metrics_file import MetricsWriter
    from istio_vm.service.reload import ReloadChannel

log = loggers.logger(__name__)
MAX_LINE = 65536  # a longer line is relayed in pieces rather than buffered without bound

# What each signal asks of the machine: its event, and the ISTIO_EVENT of the "Received" entry.
# SIGUSR1 also reopens our log files; SIGCHLD only wakes the loop, which reaps every iteration anyway.
SIGNALS: dict[int, tuple[Callable[[Supervisor], list[Action]], str | None]] = {
    signal.SIGTERM: (Supervisor.terminate, "drain"),
    signal.SIGINT: (Supervisor.terminate, "drain"),
    signal.SIGHUP: (Supervisor.reload, "restart"),
    signal.SIGUSR1: (Supervisor.reopen_logs, None),
}


@dataclass(slots=True)
class _Stream:
    epoch: int
    pid: int
    name: str  # "stdout" or "stderr"
    pending: bytes = b""


@dataclass
class Loop:
    supervisor: Supervisor
    command: ProxyCommand
    ops: ProcessOps
    notifier: Notifier
    output: ProxyOutput
    admin: ProxyAdmin
    clock: Callable[[], float] = time.monotonic
    watchdog_interval: float | None = None  # half of systemd's WATCHDOG_USEC
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    reloads: ReloadChannel | None = None  # where `istio-vm reload` leaves new settings and reads the outcome
    _next_watchdog: float | None = field(init=False, default=None)
    capture: CaptureHelper | None = None  # the fail-open policies' privileged helper
    first: Child | OSError | None = None  # epoch 0, spawned by start.py before the loop (or why it failed)
    _capture_on: frozenset[Part] = field(init=False, default=ALL_PARTS)
    _before_reload: tuple[ProxyCommand, Policy] | None = field(init=False, default=None)
    metrics: MetricsWriter | None = None  # ISTIO_VM_METRICS_FILE
    _reloads_done: dict[bool, int] = field(init=False, default_factory=dict)  # by outcome, for the metrics

    def run(self, signals: SignalQueue) -> int:
        """Supervise until the proxy is stopped (or given up on); the exit status of istio-vm."""
        self.selector.register(signals.wakeup, selectors.EVENT_READ, None)
        if self.watchdog_interval:
            self._next_watchdog = self.clock()
        if self.capture is not None:
            self._capture_on = self.capture.on
        self._execute(self.supervisor.start())
        while self.supervisor.state is not State.STOPPED:
            for key, _ in self.selector.select(self._timeout()):
                if key.data is not None:
                    self._read(key)
            for signum in signals.drain():
                self._on_signal(signum)
            # Read what the children wrote before reaping them, so their last words are kept.
            for pid, wait_status in self.ops.reap():
                self._execute(self.supervisor.exited(pid, wait_status))
            self._execute(self.supervisor.tick())
            self._watchdog()
            self.notifier.flush()  # what a full notify socket held back
            self.output.flush()  # and a full journal socket
            self._update_metrics()
        self._flush_output()
        self._update_metrics()  # stopped: up 0, with the exit status
        return 1 if self.supervisor.exit_status is None else self.supervisor.exit_status

    def _update_metrics(self) -> None:
        """The metrics file, rewritten when anything in it changed (the writer compares the text)."""
        if self.metrics is None:
            return
        s = self.supervisor
        self.metrics.update(
            state=str(s.state), ready=any(e.ready for e in s.epochs.values()),
            epoch=None if s.current is None else s.current.number, restarts=s.restart_reasons,
            reloads=self._reloads_done, last_exit=s.last_exit, exits_seen=s.exits_lost,
            capture=self._capture_on if self.capture is not None else ALL_PARTS,
            exit_status=s.exit_status)

    # ---- events ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGUSR2:  # `istio-vm iptables verify` recorded its result (metrics_file.py)
            if self.metrics is not None:
                self.metrics.read_verify()
            return
        if signum not in SIGNALS:
            return
        event, journal_event = SIGNALS[signum]
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            log.info("Received %s: reopening log files", name)
            self.output.reopen()
        else:
            log.info("Received %s", name, extra={"ISTIO_EVENT": journal_event})
        if signum == signal.SIGHUP and self.reloads is not None:
            self._reload(self.reloads)
            return
        self._execute(event(self.supervisor))

    def _reload(self, reloads: ReloadChannel) -> None:
        """SIGHUP from `istio-vm reload`: the new settings take over, unless the machine cannot reload now."""
        request = reloads.take()
        if request is None:  # a plain `kill -HUP`: the same settings again
            self._execute(self.supervisor.reload())
            return
        changed = (request.command.argv(0), dict(request.command.environment)) != (
            self.command.argv(0), dict(self.command.environment))
        if request.rules is not None and self.metrics is not None:  # reload installed them already
            self.metrics.new_rules(dict(request.rules))
        if self.supervisor.reload_refusal() is None:
            self._before_reload = (self.command, self.supervisor.policy)
            # ISTIO_VM_CAPTURE needs a restart (reload.RESTART_ONLY): the parts that follow the proxy stay.
            self.command = request.command
            self.supervisor.policy = dataclasses.replace(
                request.policy, capture_follows=self.supervisor.policy.capture_follows)
        self._execute(self.supervisor.reload(request.id, changed))

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
        self.selector.unregister(fd)
        os.close(fd)

    def _flush_output(self) -> None:
        """After the last exit: relay what is left in the pipes, then close them."""
        for key in list(self.selector.get_map().values()):
            if key.data is not None:
                while self._read(key):
                    pass
            if key.fd in self.selector.get_map():
                if key.data is None:
                    self.selector.unregister(key.fd)
                else:
                    self._close(key.fd, key.data)
        self.selector.close()

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
                    helper = () if self.capture is None else (self.capture.pid,)  # its own session: spared
                    self.ops.kill_tree(pid, keep=[*self.supervisor.epochs.keys(), *helper])
                case Drain():
                    self.admin.drain()
                case ProbeReady(epoch=epoch, restart_epoch=restart_epoch):
                    if self.admin.ready(restart_epoch):
                        self._execute(self.supervisor.ready(epoch))
                case CountConnections():
                    self._execute(self.supervisor.connections(self.admin.active_connections()))
                case Notify(message=message):
                    self.notifier.send(message)
                case SetCapture(on=on, reason=reason):
                    self._set_capture(on, reason)
                case ReloadDone(request=request, ok=ok, message=message):
                    self._reloads_done[ok] = self._reloads_done.get(ok, 0) + 1
                    if not ok and self._before_reload is not None:  # what runs now is the previous settings
                        self.command, self.supervisor.policy = self._before_reload
                    self._before_reload = None
                    if request is not None and self.reloads is not None:
                        self.reloads.report(request, ok, message)

    def _set_capture(self, on: frozenset[Part], reason: str) -> None:
        """Ask the helper for each part that changes; one journal entry with the new state and the time taken."""
        if self.capture is None:
            return
        began = self.clock()
        if on == self._capture_on:  # at start: install put exactly these in place already
            log.info("Capture: %s (%s), as installed", describe_parts(on), reason,
                     extra={"ISTIO_EVENT": "capture", "ISTIO_CAPTURE": describe_parts(on)})
            return
        try:
            for switch_on, parts in ((True, on - self._capture_on), (False, self._capture_on - on)):
                if parts:  # one request (one restore per family) for all the parts going the same way
                    self.capture.switch(parts, switch_on)
                    self._capture_on = self._capture_on | parts if switch_on else self._capture_on - parts
        except OSError as e:
            log.error("Capture not switched to %s (%s): %s; now %s", describe_parts(on), reason, e,
                      describe_parts(self._capture_on), extra={"ISTIO_EVENT": "capture",
                                                                "ISTIO_CAPTURE": describe_parts(self._capture_on)})
            return
        took = (self.clock() - began) * 1000
        log.info("Capture: %s (%s), %.1f ms", describe_parts(on), reason, took,
                 extra={"ISTIO_EVENT": "capture", "ISTIO_CAPTURE": describe_parts(on),
                        "ISTIO_CAPTURE_MS": f"{took:.1f}"})

    def _spawn(self, epoch: int, restart_epoch: int) -> None:
        argv = self.command.argv(restart_epoch)
        first, self.first = self.first, None
        if first is None and restart_epoch == 0 and self.command.shared_memory is not None:
            # Envoy's hot-restart memory left by another user (e.g. an old run as root) makes a fresh
            # epoch 0 abort ("cannot open shared memory region"); ours is reused safely, even after a SIGKILL.
            self.ops.remove_foreign(self.command.shared_memory)
        log.info("Epoch %s command: %s", epoch, " ".join(argv), extra={"ISTIO_EPOCH": epoch})
        try:
            if isinstance(first, OSError):
                raise first
            started: Child = self.ops.spawn(argv, self.command.environment) if first is None else first
        except OSError as e:
            self._execute(self.supervisor.spawn_failed(epoch, f"{argv[0]}: {e.strerror or e}"))
            return
        for fd, name in ((started.stdout, "stdout"), (started.stderr, "stderr")):
            self.selector.register(fd, selectors.EVENT_READ, _Stream(epoch, started.pid, name))
        self._execute(self.supervisor.spawned(epoch, started.pid))
