"""The proxy's lifecycle as an explicit state machine: epochs, readiness, backoff, crash loop, drain.

Pure logic: the loop (loop.py) tells it what happened (spawned, ready, exited, a signal, time
passed) and carries out the actions it answers with. Every change of state goes through `_enter`,
checked against ALLOWED and logged once with the old and new state. Time comes from an injected
monotonic clock, so every deadline is testable without sleeping.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from istio_vm import loggers
from istio_vm.config.model import Supervision
from istio_vm.errors import ExitStatus
from istio_vm.iptables.parts import ALL_PARTS, Part, describe_parts

log = loggers.logger(__name__)


class State(enum.StrEnum):
    NEW = "new"  # not started yet
    STARTING = "starting"  # current epoch spawned, not ready yet
    RUNNING = "running"  # current epoch ready
    RELOADING = "reloading"  # envoy hot restart: the next epoch starts while the old one serves
    BACKOFF = "backoff"  # waiting before the next epoch after an exit
    DRAINING = "draining"  # stop requested: envoy drains its listeners
    STOPPING = "stopping"  # the proxy was told to exit; waiting for it
    STOPPED = "stopped"  # done: exit_status is final


S = State
ALLOWED: dict[State, frozenset[State]] = {
    S.NEW: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.DRAINING, S.STOPPING, S.STOPPED}),
    S.RUNNING: frozenset({S.RELOADING, S.BACKOFF, S.DRAINING, S.STOPPING, S.STOPPED}),
    S.RELOADING: frozenset({S.RUNNING, S.BACKOFF, S.DRAINING, S.STOPPING, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.DRAINING, S.STOPPING, S.STOPPED}),  # a previous epoch may still run
    S.DRAINING: frozenset({S.STOPPING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Policy:
    hot_restart: bool = False  # envoy mode: SIGHUP starts the next epoch beside the running one
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    backoff_reset: float = 60.0  # an epoch up this long was stable: the next delay starts over
    max_restarts: int = 5
    restart_window: float = 300.0
    termination_drain: float = 5.0
    stop_timeout: float = 10.0
    # Readiness while an epoch starts: every probe_first for the first probe_quick_for (Envoy is LIVE
    # ~80-90 ms after its spawn, so READY=1 follows within ~10 ms), then the delays doubling up to
    # probe_max; an epoch still starting after probe_patient_after waits on something else (istiod) and
    # is probed every probe_interval. Once ready, nothing is probed.
    probe_first: float = 0.01
    probe_quick_for: float = 0.5
    probe_max: float = 0.04
    probe_patient_after: float = 30.0
    probe_interval: float = 0.5
    poll_interval: float = 0.25  # active-connection polls while draining
    capture_follows: frozenset[Part] = frozenset()  # ISTIO_VM_CAPTURE's parts on only while an epoch is ready

    @classmethod
    def of(cls, supervision: Supervision, *, hot_restart: bool) -> Policy:
        s = supervision
        return cls(hot_restart=hot_restart, backoff_initial=s.backoff_initial, backoff_max=s.backoff_max,
                   backoff_reset=s.backoff_reset, max_restarts=s.max_restarts, restart_window=s.restart_window,
                   termination_drain=s.termination_drain, stop_timeout=s.stop_timeout)


# Actions the loop carries out.
@dataclass(frozen=True, slots=True)
class Spawn:
    epoch: int
    restart_epoch: int  # envoy's --restart-epoch: the parent's + 1 for a hot restart, else 0


@dataclass(frozen=True, slots=True)
class Signal:
    pid: int
    signal: int


@dataclass(frozen=True, slots=True)
class KillTree:
    """SIGKILL the epoch's process group and every untracked descendant of the supervisor."""

    pid: int


@dataclass(frozen=True, slots=True)
class Drain:
    """envoy: fail health checks and drain listeners gracefully (one admin port serves every epoch)."""


@dataclass(frozen=True, slots=True)
class ProbeReady:
    epoch: int
    restart_epoch: int  # Envoy is ready only once the epoch we started answers, not its parent


@dataclass(frozen=True, slots=True)
class CountConnections:
    """envoy: ask the admin port how many downstream connections are still open."""


@dataclass(frozen=True, slots=True)
class Notify:
    message: str  # sd_notify(3) text, e.g. "READY=1", "STATUS=..."


@dataclass(frozen=True, slots=True)
class SetCapture:
    """Exactly these capture parts on (the fail-open policies' helper switches the others off)."""

    on: frozenset[Part]
    reason: str  # for the journal, e.g. "epoch 1 ready"


@dataclass(frozen=True, slots=True)
class ReloadDone:
    """The outcome of a reload, for the `istio-vm reload` waiting for it (request None: a plain SIGHUP)."""

    request: str | None
    ok: bool
    message: str


Action = Spawn | Signal | KillTree | Drain | ProbeReady | CountConnections | Notify | SetCapture | ReloadDone


@dataclass(slots=True)
class Epoch:
    number: int
    restart_epoch: int
    started: float
    pid: int | None = None
    ready: bool = False


@dataclass(slots=True)
class _RestartBudget:
    """Exits within the window (crash loop) and consecutive quick exits (backoff)."""

    failures: deque[float] = field(default_factory=deque)
    consecutive: int = 0

    def exceeded(self, now: float, policy: Policy) -> bool:
        """Count an exit at `now`; True when it makes more than max_restarts within restart_window."""
        self.failures.append(now)
        while self.failures and self.failures[0] < now - policy.restart_window:
            self.failures.popleft()
        return len(self.failures) > policy.max_restarts

    def delay(self, stable: bool, policy: Policy) -> float:
        """The next backoff: doubling per consecutive quick exit, reset by a stable run, capped."""
        self.consecutive = 1 if stable else self.consecutive + 1
        return min(policy.backoff_initial * 2.0 ** (self.consecutive - 1), policy.backoff_max)


@dataclass(slots=True)
class Supervisor:
    """One proxy, one epoch at a time (two during an envoy hot restart)."""

    policy: Policy
    clock: Callable[[], float] = time.monotonic
    state: State = field(init=False, default=State.NEW)
    exit_status: int | None = field(init=False, default=None)
    current: Epoch | None = field(init=False, default=None)
    epochs: dict[int, Epoch] = field(init=False, default_factory=dict)  # running epochs by pid
    restarts: int = field(init=False, default=0)
    _next_epoch: int = field(init=False, default=0)
    _budget: _RestartBudget = field(init=False, default_factory=_RestartBudget)
    _deadline: float | None = field(init=False, default=None)  # of the state: backoff, drain or stop end
    _next_probe: float | None = field(init=False, default=None)
    _probe_delay: float = field(init=False, default=0.0)  # the last delay between two readiness probes
    _forced: bool = field(init=False, default=False)  # the tree had to be killed
    _killed: set[int] = field(init=False, default_factory=set)  # epochs' pids we SIGKILLed ourselves
    capture: frozenset[Part] = field(init=False, default=ALL_PARTS)  # what install put in, then SetCapture's
    _reload_request: str | None = field(init=False, default=None)  # the reload under way, if any
    _replacing: Epoch | None = field(init=False, default=None)  # agent mode: the epoch a reload stops
    _down_since: float | None = field(init=False, default=None)  # agent mode: when the replaced epoch exited
    # For the metrics file (metrics.py): epochs started to replace another, by reason, and the last lost one's end.
    restart_reasons: dict[str, int] = field(init=False, default_factory=dict)
    last_exit: tuple[str, str] | None = field(init=False, default=None)  # (kind, detail): exit_kind()
    exits_lost: int = field(init=False, default=0)  # how many times last_exit was set

    # ---- events -----------------------------------------------------------------------------
    def start(self) -> list[Action]:
        return [*self._set_capture(ready=False, reason="no epoch ready yet"), *self._spawn(restart_epoch=0)]

    def spawned(self, epoch: int, pid: int) -> list[Action]:
        record = self._epoch_by_number(epoch)
        record.pid = pid
        self.epochs[pid] = record
        log.info("Epoch %s starting, pid %s", epoch, pid,
                 extra={"ISTIO_EVENT": "start", "ISTIO_EPOCH": epoch, "ISTIO_CHILD_PID": pid})
        return [self._status()]

    def spawn_failed(self, epoch: int, reason: str) -> list[Action]:
        """The epoch could not even be started (e.g. the binary is missing): like an exit."""
        record = self._epoch_by_number(epoch)
        log.error("Epoch %s could not start: %s", epoch, reason, extra={"ISTIO_EVENT": "exit", "ISTIO_EPOCH": epoch})
        return self._lost(record, reason, ("spawn_failed", reason))

    def ready(self, epoch: int) -> list[Action]:
        record = self.current
        if record is None or record.number != epoch or record.ready:
            return []
        record.ready = True
        self._next_probe = None
        log.info("Epoch %s ready, pid %s", epoch, record.pid,
                 extra={"ISTIO_EVENT": "ready", "ISTIO_EPOCH": epoch, "ISTIO_CHILD_PID": record.pid})
        actions: list[Action] = self._set_capture(ready=True, reason=f"epoch {epoch} ready")
        if self.state is State.RELOADING:
            actions.append(self._reload_done(True, self._reloaded_message(record)))
        if self.state in (State.STARTING, State.RELOADING):
            self._enter(State.RUNNING)
            actions.append(Notify("READY=1"))
        actions.append(self._status())
        return actions

    def exited(self, pid: int, status: int) -> list[Action]:
        record = self.epochs.pop(pid, None)
        if record is None:
            return []  # an orphan the supervisor reaped as subreaper: nothing to decide
        reason = describe_exit(status, killed_by_us=pid in self._killed)
        self._killed.discard(pid)
        extra = {"ISTIO_EVENT": "exit", "ISTIO_EPOCH": record.number, "ISTIO_CHILD_PID": pid}
        if self.state in (State.DRAINING, State.STOPPING):
            log.info("Epoch %s exited: %s", record.number, reason, extra=extra)
            leftovers = KillTree(pid)  # e.g. an Envoy that pilot-agent left behind
            if self.epochs:
                return [leftovers, self._status()]
            return [leftovers, *self._finish(clean=not self._forced and exited_cleanly(status))]
        if self.state is State.RELOADING and record is self._replacing:
            log.info("Epoch %s exited for the reload: %s", record.number, reason, extra=extra)
            self._replacing, self._down_since, self._deadline = None, self.clock(), None
            return [KillTree(pid), *self._spawn(restart_epoch=0)]
        if record is not self.current:
            level = loggers.INFO if exited_cleanly(status) else loggers.WARNING
            log.log(level, "Epoch %s (previous) exited: %s", record.number, reason, extra=extra)
            return [*self._lift_if_none_ready(f"epoch {record.number} exited"), self._status()]
        log.error("Epoch %s exited: %s", record.number, reason, extra=extra)
        return self._lost(record, reason, exit_kind(status))

    def terminate(self) -> list[Action]:
        """SIGTERM or SIGINT: drain, then stop; a second one shortens the drain."""
        now = self.clock()
        if self.state is State.STOPPED:
            return []
        if self.state in (State.DRAINING, State.STOPPING):
            log.warning("Second stop request: shortening the drain", extra={"ISTIO_EVENT": "drain"})
            if self.state is State.DRAINING:
                return self._stop_now(now)
            self._forced = True
            return self._kill_epochs()
        live = list(self.epochs)
        self.current = None
        pending = [self._reload_done(False, "stop requested")] if self._reload_request is not None else []
        self._replacing = None
        if not live:
            log.info("Stop requested while no proxy runs", extra={"ISTIO_EVENT": "drain"})
            return [*pending, Notify("STOPPING=1"), *self._finish(clean=True)]
        # The open policies lift before the proxy stops: new connections go straight through, not to a
        # proxy that is about to close its listeners.
        actions: list[Action] = [*pending, Notify("STOPPING=1"), *self._set_capture(ready=False, reason="stopping")]
        if self.policy.hot_restart:
            self._enter(State.DRAINING, deadline=now + self.policy.termination_drain)
            self._next_probe = now
            log.info("Draining: listeners drain for up to %.1fs", self.policy.termination_drain,
                     extra={"ISTIO_EVENT": "drain"})
            actions.append(Drain())
        else:
            # pilot-agent drains Envoy itself on SIGTERM (for TERMINATION_DRAIN_DURATION).
            self._enter(State.STOPPING, deadline=now + self.policy.termination_drain + self.policy.stop_timeout)
            log.info("Stopping: SIGTERM to pilot-agent, which drains Envoy for %.1fs",
                     self.policy.termination_drain, extra={"ISTIO_EVENT": "drain"})
            actions += [Signal(pid, signal.SIGTERM) for pid in live]
        actions.append(self._status())
        return actions

    def reload_refusal(self) -> str | None:
        """Why a reload cannot be carried out now (None: it can), e.g. while an epoch is still starting."""
        if self.state is State.BACKOFF:
            return None  # the next epoch will start with the new settings
        if self.state is not State.RUNNING or self.current is None:
            return f"the proxy is {self.state}, not running: try again"
        if len(self.epochs) > 1:
            # A third Envoy would terminate the draining one at once, cutting its connections.
            return "the previous epoch is still handing over (ENVOY_PARENT_SHUTDOWN_TIME_S): try again"
        return None

    def reload(self, request: str | None = None, changed: bool = True) -> list[Action]:
        """SIGHUP, with new settings in place when `request` names an `istio-vm reload`.

        envoy mode: the next epoch starts as a hot restart (with the new flags and environment).
        agent mode: pilot-agent is restarted only when its argv or environment `changed`.
        """
        refusal = self.reload_refusal()
        if refusal is not None:
            log.warning("Reload refused: %s", refusal, extra={"ISTIO_EVENT": "reload"})
            return [ReloadDone(request, False, refusal)]
        if self.state is State.BACKOFF:
            message = f"the proxy is waiting to restart: epoch {self._next_epoch} will start with the new settings"
            log.info("Reload: %s", message, extra={"ISTIO_EVENT": "reload"})
            return [ReloadDone(request, True, message)]
        assert self.current is not None
        if not self.policy.hot_restart:
            if request is None:
                log.warning("SIGHUP without new settings ignored: pilot-agent has no hot restart "
                            "(istio-vm reload re-reads the files)", extra={"ISTIO_EVENT": "reload"})
                return []
            if not changed:
                message = "pilot-agent's arguments and environment are unchanged: not restarted"
                log.info("Reload: %s", message, extra={"ISTIO_EVENT": "reload"})
                return [ReloadDone(request, True, message)]
            now = self.clock()
            self._reload_request, self._replacing = request, self.current
            self._count_restart("reload")
            self._enter(State.RELOADING, deadline=now + self.policy.termination_drain + self.policy.stop_timeout)
            self._next_probe = None
            log.info("Reload: pilot-agent's arguments or environment changed: stopping epoch %s, then starting "
                     "epoch %s", self.current.number, self._next_epoch,
                     extra={"ISTIO_EVENT": "reload", "ISTIO_EPOCH": self.current.number})
            return [Notify("RELOADING=1"), Signal(self.current.pid, signal.SIGTERM)] if self.current.pid else []
        self._reload_request = request
        self._count_restart("hot_restart")
        self._enter(State.RELOADING)
        log.info("Hot restart: starting epoch %s beside epoch %s", self._next_epoch, self.current.number,
                 extra={"ISTIO_EVENT": "restart", "ISTIO_EPOCH": self._next_epoch})
        return [Notify("RELOADING=1"), *self._spawn(restart_epoch=self.current.restart_epoch + 1)]

    def _reload_done(self, ok: bool, message: str) -> ReloadDone:
        done = ReloadDone(self._reload_request, ok, message)
        self._reload_request, self._down_since = None, None
        return done

    def _reloaded_message(self, record: Epoch) -> str:
        if self._down_since is None:
            return f"epoch {record.number} ready (pid {record.pid})"
        gap = self.clock() - self._down_since
        log.info("Reload: pilot-agent was down for %.2fs", gap, extra={"ISTIO_EVENT": "reload"})
        return f"epoch {record.number} ready (pid {record.pid}); pilot-agent was down for {gap:.2f}s"

    def reopen_logs(self) -> list[Action]:
        """SIGUSR1: Envoy reopens its access logs on SIGUSR1 too, so every epoch gets it; pilot-agent would not."""
        if not self.policy.hot_restart:
            return []
        return [Signal(pid, signal.SIGUSR1) for pid in self.epochs]

    def connections(self, count: int | None) -> list[Action]:
        """Active downstream connections while draining (None: unknown, wait for the deadline)."""
        if self.state is not State.DRAINING or count is None or count > 0:
            return []
        log.info("Drained: no active connections left", extra={"ISTIO_EVENT": "drain"})
        return self._stop_now(self.clock())

    def tick(self) -> list[Action]:
        """Act on deadlines that have passed."""
        now = self.clock()
        actions: list[Action] = []
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self.state is State.BACKOFF:
                actions += self._spawn(restart_epoch=0)
            elif self.state is State.DRAINING:
                log.info("Drain period of %.1fs over", self.policy.termination_drain, extra={"ISTIO_EVENT": "drain"})
                actions += self._stop_now(now)
            elif self.state is State.RELOADING and self._replacing is not None and self._replacing.pid is not None:
                log.warning("Epoch %s did not exit within %.1fs for the reload: killing its process tree",
                            self._replacing.number, self.policy.termination_drain + self.policy.stop_timeout,
                            extra={"ISTIO_EVENT": "reload"})
                actions.append(KillTree(self._replacing.pid))
            elif self.state is State.STOPPING:
                log.warning("The proxy did not exit within %.1fs: killing its process tree",
                            self.policy.stop_timeout, extra={"ISTIO_EVENT": "drain"})
                self._forced = True
                actions += self._kill_epochs()
        if self._next_probe is not None and now >= self._next_probe:
            if self.state is State.DRAINING:
                self._next_probe = now + self.policy.poll_interval
                actions.append(CountConnections())
            elif self.current is not None and not self.current.ready:
                self._next_probe = now + self._next_probe_delay(now - self.current.started)
                actions.append(ProbeReady(self.current.number, self.current.restart_epoch))
        return actions

    def next_deadline(self) -> float | None:
        """When tick() has work next; None means: sleep until something happens."""
        times = [t for t in (self._deadline, self._next_probe) if t is not None]
        return min(times) if times else None

    # ---- internals ----------------------------------------------------------------------------
    def _enter(self, state: State, *, deadline: float | None = None) -> None:
        """The one place the state changes: checked against ALLOWED, logged once, with its deadline."""
        if state not in ALLOWED[self.state]:
            raise AssertionError(f"transition {self.state} -> {state} is not allowed")
        log.info("State %s -> %s", self.state, state,
                 extra={"ISTIO_EVENT": "state", "ISTIO_STATE": str(state), "ISTIO_PREVIOUS_STATE": str(self.state)})
        self.state = state
        self._deadline = deadline

    def _spawn(self, restart_epoch: int) -> list[Action]:
        now = self.clock()
        record = Epoch(self._next_epoch, restart_epoch, now)
        self._next_epoch += 1
        self.current = record
        if self.state is not State.RELOADING:
            self._enter(State.STARTING)
        self._probe_delay = self.policy.probe_first
        self._next_probe = now + self._probe_delay
        return [Spawn(record.number, restart_epoch)]

    def _next_probe_delay(self, starting_for: float) -> float:
        """probe_first while the start is young, then doubling to probe_max, then probe_interval once the
        start takes long."""
        if starting_for >= self.policy.probe_patient_after:
            return self.policy.probe_interval
        if starting_for < self.policy.probe_quick_for:
            return self.policy.probe_first
        self._probe_delay = min(self._probe_delay * 2.0, self.policy.probe_max)
        return self._probe_delay

    def _epoch_by_number(self, number: int) -> Epoch:
        if self.current is not None and self.current.number == number:
            return self.current
        raise ValueError(f"epoch {number} is not the current epoch")

    def _count_restart(self, reason: str) -> None:
        self.restart_reasons[reason] = self.restart_reasons.get(reason, 0) + 1

    def _lost(self, record: Epoch, reason: str, kind: tuple[str, str]) -> list[Action]:
        """The current epoch is gone: fall back to the previous one, restart later, or give up."""
        now = self.clock()
        self.last_exit, self.exits_lost = kind, self.exits_lost + 1
        survivors = sorted(self.epochs.values(), key=lambda e: e.number)
        actions: list[Action] = [] if record.pid is None else [KillTree(record.pid)]
        if self.state is State.RELOADING and survivors:
            self.current = survivors[-1]
            done = self._reload_done(False, f"epoch {record.number} failed ({reason}); epoch "
                                     f"{self.current.number} keeps serving with the previous settings")
            self._enter(State.RUNNING)
            log.error("Hot restart to epoch %s failed (%s); epoch %s keeps serving", record.number, reason,
                      self.current.number, extra={"ISTIO_EVENT": "restart", "ISTIO_EPOCH": record.number})
            return [*actions, done, Notify("READY=1"), self._status()]
        if self.state is State.RELOADING:
            actions.append(self._reload_done(False, f"epoch {record.number} with the new settings failed ({reason}); "
                                             "restarting it with the previous settings"))
        if self._budget.exceeded(now, self.policy):
            log.error("Giving up: %s exits within %.0fs (ISTIO_VM_MAX_RESTARTS=%s); last: %s",
                      len(self._budget.failures), self.policy.restart_window, self.policy.max_restarts, reason,
                      extra={"ISTIO_EVENT": "exit", "ISTIO_EPOCH": record.number})
            self.current = None
            return [*actions, *self._set_capture(ready=False, reason="giving up"), *self._kill_epochs(),
                    *self._finish(status=ExitStatus.CRASH_LOOP)]
        delay = self._budget.delay(now - record.started >= self.policy.backoff_reset, self.policy)
        self.current = None
        actions += self._lift_if_none_ready(f"epoch {record.number} exited")
        self.restarts += 1
        self._count_restart(kind[0])
        self._enter(State.BACKOFF, deadline=now + delay)
        self._next_probe = None
        log.warning("Restarting in %.1fs (restart %s)", delay, self.restarts,
                    extra={"ISTIO_EVENT": "restart", "ISTIO_EPOCH": self._next_epoch, "ISTIO_RESTART_REASON": kind[0]})
        return [*actions, self._status()]

    def _kill_epochs(self) -> list[Action]:
        """KillTree for every live epoch, remembered so their SIGKILL is not blamed on the OOM killer."""
        self._killed.update(self.epochs)
        return [KillTree(pid) for pid in self.epochs]

    def _stop_now(self, now: float) -> list[Action]:
        self._enter(State.STOPPING, deadline=now + self.policy.stop_timeout)
        self._next_probe = None
        return [*[Signal(pid, signal.SIGTERM) for pid in self.epochs], self._status()]

    def _finish(self, *, clean: bool = True, status: int | None = None) -> list[Action]:
        self.exit_status = status if status is not None else ExitStatus.OK if clean else ExitStatus.FAILURE
        self._enter(State.STOPPED)
        self._next_probe = None
        return [self._status()]

    def _set_capture(self, *, ready: bool, reason: str) -> list[Action]:
        """SetCapture when the policy has parts that follow the proxy and they change; else nothing."""
        if not self.policy.capture_follows:
            return []
        on = ALL_PARTS if ready else ALL_PARTS - self.policy.capture_follows
        if on == self.capture:
            return []
        self.capture = on
        return [SetCapture(on, reason)]

    def _lift_if_none_ready(self, reason: str) -> list[Action]:
        """The last ready epoch is gone (a hot restart's parent still serving counts as ready): lift."""
        if any(e.ready for e in self.epochs.values()) or (self.current is not None and self.current.ready):
            return []
        return self._set_capture(ready=False, reason=reason)

    def _status(self) -> Notify:
        capture = f", capture: {describe_parts(self.capture)}" if self.policy.capture_follows else ""
        return Notify(f"STATUS={self.status_text()}{capture}")

    def status_text(self) -> str:
        restarts = f"{self.restarts} restart{'' if self.restarts == 1 else 's'}"
        record = self.current
        if self.state in (State.STARTING, State.RUNNING) and record is not None:
            return f"epoch {record.number} {self.state}, pid {record.pid}, {restarts}"
        if self.state is State.RELOADING and record is not None:
            return f"epoch {record.number} starting (hot restart), pid {record.pid}, {restarts}"
        if self.state is State.BACKOFF:
            return f"waiting to start epoch {self._next_epoch}, {restarts}"
        pids = ", ".join(str(p) for p in sorted(self.epochs)) or "none"
        return f"{self.state}, pids {pids}, {restarts}"


# ---- wait statuses in words ---------------------------------------------------------------------
def describe_exit(status: int, *, killed_by_us: bool = False) -> str:
    """Why a child ended, as operators read it in the journal (after supervisor's decode_wait_status
    and gunicorn's "Perhaps out of memory?", said only of a SIGKILL istio-vm did not send).

    >>> describe_exit(256)
    'exited with status 1'
    >>> describe_exit(9)
    'killed by SIGKILL (perhaps out of memory?)'
    >>> describe_exit(9, killed_by_us=True)
    'killed by SIGKILL (sent by istio-vm)'
    """
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        text = f"killed by {name}"
        if os.WCOREDUMP(status):
            text += " (core dumped)"
        elif number == signal.SIGKILL:
            text += " (sent by istio-vm)" if killed_by_us else " (perhaps out of memory?)"
        return text
    return f"ended with wait status {status:#x}"


def exit_kind(status: int) -> tuple[str, str]:
    """A wait status as the metrics file labels it: ("exit", "1") or ("signal", "SIGKILL").

    >>> exit_kind(256), exit_kind(9)
    (('exit', '1'), ('signal', 'SIGKILL'))
    """
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return "signal", signal.Signals(number).name
        except ValueError:
            return "signal", str(number)
    return "exit", str(os.WEXITSTATUS(status)) if os.WIFEXITED(status) else f"{status:#x}"


def exited_cleanly(status: int) -> bool:
    """Exit status 0, or the SIGTERM we sent: a proxy that stopped as asked."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status) == 0
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
