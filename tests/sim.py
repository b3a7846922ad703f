"""The supervise loop in simulated time: fakes of its seams (clock, selector, processes, admin).

`Sim` runs the real `Loop` and `Supervisor` against fake processes whose stdout and stderr are real
pipes. Time is a fake clock that the selector advances to the next scripted event or deadline
instead of sleeping, so minutes of backoff and drain take milliseconds; a loop that would block
forever fails the test instead.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from istio_vm.journal import JournalSocket
from istio_vm.service.loop import Loop
from istio_vm.service.machine import Policy, Supervisor
from istio_vm.service.notify import Notifier
from istio_vm.service.processes import Child
from istio_vm.service.proxy_command import ProxyCommand
from istio_vm.service.proxy_output import ProxyOutput
from istio_vm.service.signals import SignalQueue

EXIT_0, EXIT_1 = 0, 1 << 8  # wait statuses of `exit 0` and `exit 1`
KILLED, TERMED = signal.SIGKILL, signal.SIGTERM  # wait statuses of deaths by signal

AGENT = ProxyCommand("pilot-agent", ("/usr/local/bin/pilot-agent", "proxy"), (), {"A": "1"})
ENVOY = ProxyCommand("envoy", ("/usr/local/bin/envoy", "-c", "/etc/envoy.yaml"), ("--base-id", "0"), {"A": "1"},
                     hot_restart=True, admin_port=15000, shared_memory="/dev/shm/envoy_shared_memory_0")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.start = self.now = now

    def __call__(self) -> float:
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - self.start


@dataclass(frozen=True)
class Event:
    """One thing the loop did, in order: relayed a proxy line ("line", with its journal fields), or
    logged a record of its own ("log", with the record's journal fields: ISTIO_EVENT and so on)."""

    kind: str
    text: str
    fields: Mapping[str, Any]


@dataclass
class FakeChild:
    pid: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    writers: dict[str, int]  # stream -> write end of its pipe
    readers: tuple[int, int]  # the read ends the loop got (stdout, stderr)
    signals: list[int] = field(default_factory=list)
    status: int | None = None  # the wait status, once it has exited


class Sim:
    """One loop, its fakes, and a script of timed events (`at`)."""

    def __init__(self, command: ProxyCommand = AGENT, *, policy: Policy | None = None,
                 watchdog_interval: float | None = None, output_target: str = "journal", log_dir: str = "",
                 journal: JournalSocket | None = None) -> None:
        self.clock = FakeClock()
        self.events: list[Event] = []
        self.notifications: list[str] = []
        self.notified_at: list[float] = []  # the simulated time of each notification, after the start
        self.children: dict[int, FakeChild] = {}
        self.removed: list[str] = []
        self.killed: list[tuple[int, tuple[int, ...]]] = []
        self.ready_after: float = 0.0  # sim seconds after which the admin port answers ready
        self.connections: list[int | None] = [0]  # answers of active_connections, the last one repeats
        self.drains = 0
        self.ready_calls: list[int] = []
        self.ready_calls_at: list[float] = []  # when each readiness probe ran, after the start
        self.spawn_error: OSError | None = None
        self.on_signal: Callable[[FakeChild, int], None] = lambda child, signum: None
        self.late_output: dict[int, bytes] = {}  # pid -> what it writes between the loop's select and reap
        self._script: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._pids = itertools.count(1000)
        self._exits: list[int] = []
        self.queue = SignalQueue()
        policy = policy or Policy(hot_restart=command.hot_restart, backoff_initial=1.0)
        self.supervisor = Supervisor(policy, clock=self.clock)
        self.output = ProxyOutput(output_target, name=command.name, log_dir=log_dir, journal=journal,
                                  journal_sender=None if journal else lambda **fields: self.events.append(
                                      Event("line", fields["MESSAGE"], fields)))
        self.loop = Loop(self.supervisor, command, _Processes(self), Notifier(self._notify), self.output,
                         _Admin(self), clock=self.clock, watchdog_interval=watchdog_interval,
                         selector=_SimSelector(self))

    # ---- the script -----------------------------------------------------------------------------
    def at(self, seconds: float, action: Callable[[], None]) -> None:
        """Run `action` when the simulated clock reaches `seconds` after the start."""
        heapq.heappush(self._script, (self.clock.start + seconds, next(self._order), action))

    def signal_at(self, seconds: float, signum: int) -> None:
        self.at(seconds, lambda: self.queue.put(signum))

    def write(self, pid: int, data: bytes, stream: str = "stdout") -> None:
        os.write(self.children[pid].writers[stream], data)

    def exit(self, pid: int, status: int, *, racing: bytes = b"") -> None:
        """The child ends: its pipes close, and its wait status waits to be reaped.

        `racing` is written to its stdout (and the pipes closed) only when the loop reaps it: output
        that arrived after the loop's select returned, which the loop must still relay.
        """
        child = self.children[pid]
        child.status = status
        if racing:
            self.late_output[pid] = racing
        else:
            self._close(child)
        self._exits.append(pid)

    def _close(self, child: FakeChild) -> None:
        for fd in child.writers.values():
            os.close(fd)
        child.writers = {}

    def lines(self) -> list[str]:
        """What the proxy wrote, as relayed."""
        return [e.text for e in self.events if e.kind == "line"]

    def logged(self) -> list[str]:
        """What the loop and the machine logged."""
        return [e.text for e in self.events if e.kind == "log"]

    def run(self, timeout: float = 3600.0) -> int:
        """Run the loop to its end (at most `timeout` simulated seconds); its exit status."""
        self._deadline = self.clock.start + timeout
        handler = _Recorder(self.events)
        logger = logging.getLogger("istio_vm")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            return self.loop.run(self.queue)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            self.queue.close()
            self.output.close()
            for child in self.children.values():
                for fd in child.writers.values():
                    os.close(fd)

    # ---- the fakes' side ------------------------------------------------------------------------
    def _notify(self, message: str) -> bool:
        self.notifications.append(message)
        self.notified_at.append(self.clock.elapsed)
        return True

    def _due(self, until: float | None) -> tuple[float, Callable[[], None]] | None:
        if self._script and (until is None or self._script[0][0] <= until):
            when, _, action = heapq.heappop(self._script)
            return when, action
        return None


class _Recorder(logging.Handler):
    def __init__(self, events: list[Event]) -> None:
        super().__init__()
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        fields = {key: value for key, value in vars(record).items() if key.isupper()}
        self.events.append(Event("log", record.getMessage(), fields))


class _SimSelector(selectors.BaseSelector):
    """A real selector over the real pipes, whose waiting advances the fake clock instead of sleeping."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.real = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.real.unregister(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.real.get_map()

    def close(self) -> None:
        self.real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self.real.select(0)
        if ready:
            return ready
        sim, clock = self.sim, self.sim.clock
        until = None if timeout is None else clock.now + timeout
        due = sim._due(until)
        if due is not None:
            clock.now = max(clock.now, due[0])
            due[1]()
        elif until is None:
            raise AssertionError(f"the loop would sleep forever at +{clock.elapsed:.2f}s (nothing scheduled)")
        else:
            clock.now = until
        if clock.now > sim._deadline:
            raise AssertionError(f"the loop is still running after {clock.elapsed:.0f} simulated seconds")
        return self.real.select(0)


class _Processes:
    """ProcessOps over fake children with real pipes."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        if self.sim.spawn_error is not None:
            raise self.sim.spawn_error
        pid = next(self.sim._pids)
        fds = {name: os.pipe() for name in ("stdout", "stderr")}
        for read_end, _ in fds.values():
            os.set_blocking(read_end, False)
        self.sim.children[pid] = FakeChild(pid, tuple(argv), dict(env), {n: w for n, (_, w) in fds.items()},
                                           (fds["stdout"][0], fds["stderr"][0]))
        return Child(pid, fds["stdout"][0], fds["stderr"][0])

    def signal(self, pid: int, signum: int) -> None:
        child = self.sim.children[pid]
        child.signals.append(signum)
        if child.status is None:
            self.sim.on_signal(child, signum)

    def kill_tree(self, pid: int, keep: Iterable[int]) -> None:
        self.sim.killed.append((pid, tuple(keep)))
        child = self.sim.children[pid]
        if child.status is None:
            self.sim.exit(pid, KILLED)

    def reap(self) -> list[tuple[int, int]]:
        reaped = []
        for pid in self.sim._exits:
            child = self.sim.children[pid]
            late = self.sim.late_output.pop(pid, b"")
            if late:
                os.write(child.writers["stdout"], late)
                self.sim._close(child)
            status = child.status
            assert status is not None
            reaped.append((pid, status))
        self.sim._exits = []
        return reaped

    def remove_foreign(self, path: str) -> None:
        self.sim.removed.append(path)


class _Admin:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def ready(self, restart_epoch: int) -> bool:
        self.sim.ready_calls.append(restart_epoch)
        self.sim.ready_calls_at.append(self.sim.clock.elapsed)
        return self.sim.clock.elapsed >= self.sim.ready_after

    def drain(self) -> None:
        self.sim.drains += 1

    def active_connections(self) -> int | None:
        answers = self.sim.connections
        return answers.pop(0) if len(answers) > 1 else answers[0]
