"""The state machine's capture actions (ISTIO_VM_CAPTURE's open policies): lift when the last ready epoch is
gone, install when the next is ready, never during a hot restart, lift before the proxy stops."""

from __future__ import annotations

import signal

from istio_vm.iptables.parts import ALL_PARTS, CapturePolicy, Part
from istio_vm.service.machine import Action, Drain, Policy, SetCapture, Signal, Spawn, State, Supervisor

INBOUND = frozenset({Part.INBOUND})
KILLED = signal.SIGKILL


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def captures(actions: list[Action]) -> list[frozenset[Part]]:
    return [a.on for a in actions if isinstance(a, SetCapture)]


def make(policy: str = "outbound-fail-open", *, hot_restart: bool = False) -> tuple[Supervisor, Clock]:
    clock = Clock()
    follows = CapturePolicy(policy).follows_proxy
    return Supervisor(Policy(hot_restart=hot_restart, capture_follows=follows, backoff_initial=1.0), clock=clock), clock


def test_lifted_before_the_first_spawn_and_installed_when_ready() -> None:
    sv, _ = make()
    actions = sv.start()
    assert captures(actions) == [INBOUND]
    assert isinstance(actions[0], SetCapture)  # before the Spawn
    assert isinstance(actions[1], Spawn)
    sv.spawned(0, 100)
    ready = sv.ready(0)
    assert captures(ready) == [ALL_PARTS]
    assert ready.index(next(a for a in ready if isinstance(a, SetCapture))) == 0  # before READY=1
    assert sv.status_text() == "epoch 0 running, pid 100, 0 restarts"
    assert ready[-1].message == "STATUS=epoch 0 running, pid 100, 0 restarts, capture: all"  # type: ignore[union-attr]


def test_outage_lifts_on_reaping_and_reinstalls_on_the_next_ready() -> None:
    sv, clock = make("fail-open")
    sv.start()
    sv.spawned(0, 100)
    sv.ready(0)
    lost = sv.exited(100, KILLED)
    assert captures(lost) == [frozenset()]
    assert lost[-1].message.endswith("capture: none")  # type: ignore[union-attr]
    clock.now += 1.0
    assert [a for a in sv.tick() if isinstance(a, Spawn)] == [Spawn(1, 0)]
    sv.spawned(1, 101)
    assert captures(sv.ready(1)) == [ALL_PARTS]


def test_exit_before_ready_changes_nothing_more() -> None:
    sv, _ = make()
    sv.start()
    sv.spawned(0, 100)
    assert captures(sv.exited(100, KILLED)) == []  # already lifted: nothing was ready


def test_hot_restart_never_lifts() -> None:
    sv, _ = make("fail-open", hot_restart=True)
    sv.start()
    sv.spawned(0, 100)
    sv.ready(0)
    actions = sv.reload()
    sv.spawned(1, 101)
    actions += sv.ready(1)
    actions += sv.exited(100, 0)  # the parent leaves after the handover
    assert captures(actions) == []
    # A failed hot restart falls back to the parent, still ready: no lift either.
    actions = sv.reload()
    sv.spawned(2, 102)
    actions += sv.exited(102, KILLED)
    assert captures(actions) == []
    assert sv.state is State.RUNNING


def test_stop_lifts_before_the_drain_or_the_sigterm() -> None:
    for hot_restart in (True, False):
        sv, _ = make(hot_restart=hot_restart)
        sv.start()
        sv.spawned(0, 100)
        sv.ready(0)
        actions = sv.terminate()
        first_stop = next(i for i, a in enumerate(actions) if isinstance(a, Drain | Signal))
        lift = next(i for i, a in enumerate(actions) if isinstance(a, SetCapture))
        assert lift < first_stop
        assert captures(actions) == [INBOUND]


def test_fail_closed_emits_no_capture_action() -> None:
    sv, _ = make("fail-closed")
    actions = sv.start()
    sv.spawned(0, 100)
    actions += sv.ready(0) + sv.exited(100, KILLED) + sv.terminate()
    assert captures(actions) == []
    assert "capture" not in sv.status_text()
