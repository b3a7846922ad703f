"""The supervisor's state machine with a fake clock: epochs, readiness, backoff, crash loop, drain."""

from __future__ import annotations

import itertools
import logging
import random
import signal
from collections.abc import Iterator, Sequence

import pytest

from istio_vm.errors import ExitStatus
from istio_vm.service.machine import (
    ALLOWED,
    Action,
    CountConnections,
    Drain,
    KillTree,
    Notify,
    Policy,
    ProbeReady,
    ReloadDone,
    Signal,
    Spawn,
    State,
    Supervisor,
)

EXIT_1 = 1 << 8  # wait status of `exit 1`
KILLED = signal.SIGKILL  # wait status of a SIGKILL death
TERMED = signal.SIGTERM


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**policy: object) -> tuple[Supervisor, Clock]:
    clock = Clock()
    return Supervisor(Policy(**policy), clock=clock), clock  # type: ignore[arg-type]


def started(sv: Supervisor, pid: int = 100) -> None:
    [spawn] = sv.start()
    assert spawn == Spawn(0, 0)
    sv.spawned(0, pid)


def notifications(actions: Sequence[object]) -> list[str]:
    return [a.message for a in actions if isinstance(a, Notify)]


def test_ready_only_after_the_probe_succeeds() -> None:
    sv, clock = make(probe_first=0.01, probe_max=0.04)
    started(sv)
    assert sv.state is State.STARTING
    assert sv.next_deadline() == pytest.approx(clock.now + 0.01)
    assert sv.tick() == []  # not yet
    clock.advance(0.01)
    assert sv.tick() == [ProbeReady(0, 0)]
    assert sv.next_deadline() == pytest.approx(clock.now + 0.01)
    clock.advance(0.01)
    assert sv.tick() == [ProbeReady(0, 0)]  # still not ready: probe again
    actions = sv.ready(0)
    assert notifications(actions) == ["READY=1", "STATUS=epoch 0 running, pid 100, 0 restarts"]
    assert sv.state is State.RUNNING
    assert sv.next_deadline() is None  # idle: nothing to poll


def probe_times(sv: Supervisor, clock: Clock, until: float) -> list[float]:
    """When the machine asks for a readiness probe while nothing answers, relative to the spawn."""
    start, times = clock.now, []
    while (deadline := sv.next_deadline()) is not None and deadline - start <= until:
        clock.now = deadline
        if any(isinstance(a, ProbeReady) for a in sv.tick()):
            times.append(round(clock.now - start, 6))
    return times


def test_probes_start_fast_double_to_the_cap_then_slow_down_for_a_long_start() -> None:
    sv, clock = make(probe_first=0.01, probe_quick_for=0.5, probe_max=0.04, probe_patient_after=1.0,
                     probe_interval=0.5)
    started(sv)
    times = probe_times(sv, clock, until=2.2)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise([0.0, *times])]
    quick = next(i for i, gap in enumerate(gaps) if gap > 0.01)  # every 10 ms for the first 0.5 s
    assert 0.5 <= times[quick - 1] < 0.52
    assert gaps[quick:quick + 3] == pytest.approx([0.02, 0.04, 0.04])  # then doubling, capped at 40 ms
    fast = len([t for t in times if t < 1.0])
    assert gaps[quick + 1:fast + 1] == pytest.approx([0.04] * (fast - quick))  # 40 ms apart up to 1 s
    slow = times[fast:]  # then every 0.5 s: a start this long waits on something else
    assert len(slow) == 3
    assert 1.0 <= slow[0] < 1.04
    assert [b - a for a, b in itertools.pairwise(slow)] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("how", ["hot restart", "restart after an exit"])
def test_every_new_epoch_is_probed_fast_again(how: str) -> None:
    sv, clock = make(hot_restart=True, probe_first=0.01, probe_max=0.04, probe_patient_after=1.0, backoff_initial=1)
    started(sv)
    probe_times(sv, clock, until=5.0)  # a slow first start: probes are 0.5 s apart by now
    sv.ready(0)
    if how == "hot restart":
        assert sv.reload()[-1] == Spawn(1, 1)
    else:
        sv.exited(100, EXIT_1)
        clock.advance(1)
        assert sv.tick() == [Spawn(1, 0)]
    sv.spawned(1, 101)
    assert probe_times(sv, clock, until=0.1)[:3] == [0.01, 0.02, 0.03]


def test_restart_with_exponential_backoff_and_reset_after_stable_period() -> None:
    sv, clock = make(backoff_initial=1, backoff_max=4, backoff_reset=60, max_restarts=10)
    started(sv)
    delays = []
    for n in range(4):
        actions = sv.exited(100 + n, EXIT_1)
        assert KillTree(100 + n) in actions  # whatever the epoch left behind goes too
        assert sv.state is State.BACKOFF
        deadline = sv.next_deadline()
        assert deadline is not None
        delays.append(deadline - clock.now)
        clock.advance(delays[-1] - 0.01)
        assert sv.tick() == []
        clock.advance(0.01)
        assert sv.tick() == [Spawn(n + 1, 0)]
        sv.spawned(n + 1, 101 + n)
    assert delays == [1, 2, 4, 4]  # doubles, capped
    assert sv.restarts == 4
    clock.advance(61)  # stable long enough: the next delay starts over
    sv.exited(104, EXIT_1)
    assert sv.next_deadline() == pytest.approx(clock.now + 1)


def test_crash_loop_gives_up_with_distinct_status() -> None:
    sv, clock = make(backoff_initial=1, backoff_max=1, max_restarts=2, restart_window=60)
    started(sv)
    for n in range(2):
        sv.exited(100 + n, EXIT_1)
        clock.advance(1)
        assert sv.tick() == [Spawn(n + 1, 0)]
        sv.spawned(n + 1, 101 + n)
    actions = sv.exited(102, KILLED)
    assert notifications(actions)[-1].startswith("STATUS=stopped")
    assert sv.state is State.STOPPED
    assert sv.exit_status == ExitStatus.CRASH_LOOP == 69


def test_failures_outside_the_window_do_not_count() -> None:
    sv, clock = make(backoff_initial=1, max_restarts=1, restart_window=10)
    started(sv)
    sv.exited(100, EXIT_1)
    clock.advance(11)
    sv.tick()
    sv.spawned(1, 101)
    sv.exited(101, EXIT_1)
    assert sv.state is State.BACKOFF  # not given up


def test_exit_0_of_pilot_agent_is_a_failure_too() -> None:
    # pilot-agent 1.9 exits 0 when Envoy crashes: it must still be restarted.
    sv, _ = make()
    started(sv)
    sv.ready(0)
    sv.exited(100, 0)
    assert sv.state is State.BACKOFF


def test_agent_stop_forwards_sigterm_then_kills_the_tree_after_the_grace() -> None:
    sv, clock = make(termination_drain=5, stop_timeout=10)
    started(sv)
    sv.ready(0)
    actions = sv.terminate()
    assert actions[0] == Notify("STOPPING=1")
    assert Signal(100, signal.SIGTERM) in actions
    assert sv.state is State.STOPPING
    clock.advance(14.9)
    assert sv.tick() == []
    clock.advance(0.1)
    assert sv.tick() == [KillTree(100)]
    sv.exited(100, KILLED)
    assert (sv.state, sv.exit_status) == (State.STOPPED, ExitStatus.FAILURE)  # it had to be killed


def test_a_sigkill_istio_vm_sent_is_not_blamed_on_the_oom_killer(caplog: pytest.LogCaptureFixture) -> None:
    sv, clock = make(termination_drain=1, stop_timeout=1)
    started(sv)
    sv.ready(0)
    sv.terminate()
    clock.advance(2)
    assert sv.tick() == [KillTree(100)]
    with caplog.at_level(logging.INFO):
        sv.exited(100, KILLED)
    assert "Epoch 0 exited: killed by SIGKILL (sent by istio-vm)" in caplog.text
    assert "out of memory" not in caplog.text


def test_clean_agent_stop_exits_0_and_kills_leftovers() -> None:
    sv, _ = make()
    started(sv)
    sv.terminate()
    actions = sv.exited(100, 0)
    assert actions[0] == KillTree(100)  # an Envoy pilot-agent left behind
    assert (sv.state, sv.exit_status) == (State.STOPPED, 0)


def test_envoy_drain_waits_for_zero_connections_then_sigterm() -> None:
    sv, clock = make(hot_restart=True, termination_drain=5, poll_interval=0.25)
    started(sv)
    sv.ready(0)
    actions = sv.terminate()
    assert [a for a in actions if not isinstance(a, Notify)] == [Drain()]
    assert notifications(actions)[0] == "STOPPING=1"
    assert sv.state is State.DRAINING
    assert sv.tick() == [CountConnections()]
    assert sv.connections(3) == []
    clock.advance(0.25)
    assert sv.tick() == [CountConnections()]
    actions = sv.connections(0)
    assert Signal(100, signal.SIGTERM) in actions
    assert sv.state is State.STOPPING
    sv.exited(100, TERMED)
    assert (sv.state, sv.exit_status) == (State.STOPPED, 0)


def test_envoy_drain_deadline_then_second_sigterm_shortens() -> None:
    sv, clock = make(hot_restart=True, termination_drain=5)
    started(sv)
    sv.terminate()
    clock.advance(5)
    assert Signal(100, signal.SIGTERM) in sv.tick()  # drain period over, connections or not
    sv2, _ = make(hot_restart=True, termination_drain=5)
    started(sv2)
    sv2.terminate()
    assert Signal(100, signal.SIGTERM) in sv2.terminate()  # second SIGTERM: no more waiting


def test_hot_restart_hands_over_to_the_next_epoch() -> None:
    sv, _ = make(hot_restart=True)
    started(sv)
    sv.ready(0)
    actions = sv.reload()
    assert actions == [Notify("RELOADING=1"), Spawn(1, 1)]
    sv.spawned(1, 200)
    assert sv.state is State.RELOADING
    assert notifications(sv.ready(1))[0] == "READY=1"
    assert sv.state is State.RUNNING
    sv.exited(100, 0)  # the old epoch leaves on its own
    assert sv.state is State.RUNNING
    assert sv.current is not None
    assert sv.current.number == 1
    assert sv.restarts == 0


def test_failed_hot_restart_keeps_the_old_epoch_serving() -> None:
    sv, _ = make(hot_restart=True)
    started(sv)
    sv.ready(0)
    sv.reload()
    sv.spawned(1, 200)
    actions = sv.exited(200, EXIT_1)
    assert Notify("READY=1") in actions
    assert sv.state is State.RUNNING
    assert sv.current is not None
    assert sv.current.number == 0


def test_after_a_crash_envoy_starts_again_at_restart_epoch_0() -> None:
    sv, clock = make(hot_restart=True, backoff_initial=1)
    started(sv)
    sv.ready(0)
    sv.reload()
    sv.spawned(1, 200)
    sv.ready(1)
    sv.exited(100, 0)
    sv.exited(200, KILLED)
    clock.advance(1)
    assert sv.tick() == [Spawn(2, 0)]  # epoch 2 of ours, a fresh Envoy (no parent to hand over)


def test_reload_ignored_in_agent_mode_and_while_starting() -> None:
    sv, _ = make()
    started(sv)
    sv.ready(0)
    assert sv.reload() == []  # a plain SIGHUP: pilot-agent has no hot restart
    sv2, _ = make(hot_restart=True)
    started(sv2)
    assert sv2.reload("r1") == [ReloadDone("r1", False, "the proxy is starting, not running: try again")]


def test_stop_during_backoff_exits_at_once() -> None:
    sv, _ = make()
    started(sv)
    sv.exited(100, EXIT_1)
    actions = sv.terminate()
    assert actions[0] == Notify("STOPPING=1")
    assert (sv.state, sv.exit_status) == (State.STOPPED, 0)


def test_spawn_failure_counts_as_an_exit() -> None:
    sv, _ = make()
    sv.start()
    sv.spawn_failed(0, "/usr/local/bin/pilot-agent: No such file or directory")
    assert sv.state is State.BACKOFF


def test_status_texts() -> None:
    sv, _ = make(backoff_initial=1)
    started(sv, pid=1234)
    assert sv.status_text() == "epoch 0 starting, pid 1234, 0 restarts"
    sv.exited(1234, EXIT_1)
    assert sv.status_text() == "waiting to start epoch 1, 1 restart"


def test_orphans_reaped_as_subreaper_are_ignored() -> None:
    sv, _ = make()
    started(sv)
    assert sv.exited(999, 0) == []
    assert sv.state is State.STARTING


def test_no_third_epoch_while_the_previous_one_hands_over() -> None:
    sv, _ = make(hot_restart=True)
    started(sv)
    sv.ready(0)
    sv.reload()
    sv.spawned(1, 200)
    sv.ready(1)
    # epoch 0 still drains: a third Envoy would cut its connections
    assert sv.reload() == [ReloadDone(None, False, "the previous epoch is still handing over "
                                                   "(ENVOY_PARENT_SHUTDOWN_TIME_S): try again")]
    sv.exited(100, 0)
    assert sv.reload()[1] == Spawn(2, 2)


def test_transitions_are_logged_once_with_fields_an_operator_can_select_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="istio_vm")
    sv, clock = make(backoff_initial=1)
    started(sv)
    sv.exited(100, EXIT_1)
    clock.advance(1)
    sv.tick()
    states = [(r.ISTIO_PREVIOUS_STATE, r.ISTIO_STATE) for r in caplog.records  # type: ignore[attr-defined]
              if getattr(r, "ISTIO_EVENT", None) == "state"]
    assert states == [("new", "starting"), ("starting", "backoff"), ("backoff", "starting")]
    exits = [r for r in caplog.records if getattr(r, "ISTIO_EVENT", None) == "exit"]
    assert [(r.getMessage(), r.ISTIO_EPOCH, r.ISTIO_CHILD_PID) for r in exits] == [  # type: ignore[attr-defined]
        ("Epoch 0 exited: exited with status 1", 0, 100)]


def test_a_transition_outside_the_table_is_refused() -> None:
    sv, _ = make()
    with pytest.raises(AssertionError, match="new -> running"):
        sv._enter(State.RUNNING)
    assert ALLOWED[State.STOPPED] == frozenset()


def drive(sv: Supervisor, actions: list[Action], rng: random.Random, pids: Iterator[int]) -> None:
    """Carry out actions as the loop would: spawns succeed or fail, probes and polls get an answer."""
    for action in actions:
        if isinstance(action, Spawn):
            follow = (sv.spawn_failed(action.epoch, "boom") if rng.random() < 0.1
                      else sv.spawned(action.epoch, next(pids)))
        elif isinstance(action, ProbeReady):
            follow = sv.ready(action.epoch) if rng.random() < 0.5 else []
        elif isinstance(action, CountConnections):
            follow = sv.connections(rng.choice([None, 0, 3]))
        else:
            follow = []
        drive(sv, follow, rng, pids)


@pytest.mark.parametrize("seed", range(300))
def test_random_event_sequences_take_only_allowed_transitions(seed: int) -> None:
    rng = random.Random(seed)
    sv, clock = make(hot_restart=rng.random() < 0.5, backoff_initial=0.5, max_restarts=4, restart_window=20)
    pids = itertools.count(100)
    drive(sv, sv.start(), rng, pids)
    for _ in range(80):
        if sv.state is State.STOPPED:
            break
        event = rng.choice(["tick", "tick", "exit", "ready", "terminate", "reload", "reopen"])
        if event == "tick":
            clock.advance(rng.choice([0.1, 0.5, 2.0, 15.0]))
            actions = sv.tick()
        elif event == "exit" and sv.epochs:
            actions = sv.exited(rng.choice(sorted(sv.epochs)), rng.choice([0, EXIT_1, KILLED, TERMED]))
        elif event == "ready" and sv.current is not None:
            actions = sv.ready(sv.current.number)
        elif event == "terminate":
            actions = sv.terminate()
        elif event == "reload":
            actions = sv.reload()
        else:
            actions = sv.reopen_logs()
        drive(sv, actions, rng, pids)  # an AssertionError here is a transition outside ALLOWED
        assert (sv.exit_status is not None) is (sv.state is State.STOPPED)
        assert all(epoch.pid == pid for pid, epoch in sv.epochs.items())


# ---- reload with new settings (istio-vm reload) ----------------------------------------------------------------


def test_agent_reload_with_a_change_stops_the_agent_then_starts_the_next_epoch_and_reports_the_gap() -> None:
    sv, clock = make(termination_drain=5.0, stop_timeout=10.0)
    started(sv)
    sv.ready(0)
    actions = sv.reload("r1", changed=True)
    assert actions == [Notify("RELOADING=1"), Signal(100, signal.SIGTERM)]
    assert sv.state is State.RELOADING
    clock.advance(0.5)
    actions = sv.exited(100, 0)
    assert actions == [KillTree(100), Spawn(1, 0)]  # at once: no backoff, not counted as a restart
    sv.spawned(1, 200)
    clock.advance(0.25)
    actions = sv.ready(1)
    assert actions[0] == ReloadDone("r1", True, "epoch 1 ready (pid 200); pilot-agent was down for 0.25s")
    assert "READY=1" in notifications(actions)
    assert (sv.state, sv.restarts) == (State.RUNNING, 0)


def test_agent_reload_without_a_change_touches_nothing_and_a_stuck_agent_is_killed_at_the_deadline() -> None:
    sv, clock = make(termination_drain=5.0, stop_timeout=10.0)
    started(sv)
    sv.ready(0)
    assert sv.reload("r1", changed=False) == [
        ReloadDone("r1", True, "pilot-agent's arguments and environment are unchanged: not restarted")]
    assert sv.state is State.RUNNING
    sv.reload("r2", changed=True)
    clock.advance(15.0)
    assert KillTree(100) in sv.tick()
    assert sv.exited(100, KILLED)[1] == Spawn(1, 0)


def test_reload_whose_new_epoch_fails_reports_it_and_the_old_settings_take_over() -> None:
    sv, _ = make(hot_restart=True)
    started(sv)
    sv.ready(0)
    sv.reload("r1")
    sv.spawned(1, 200)
    actions = sv.exited(200, EXIT_1)
    [done] = [a for a in actions if isinstance(a, ReloadDone)]
    assert done == ReloadDone("r1", False, "epoch 1 failed (exited with status 1); epoch 0 keeps serving with the "
                                           "previous settings")
    assert sv.state is State.RUNNING
    agent, _ = make()
    started(agent)
    agent.ready(0)
    agent.reload("r2", changed=True)
    agent.exited(100, 0)
    agent.spawned(1, 300)
    [failed] = [a for a in agent.exited(300, EXIT_1) if isinstance(a, ReloadDone)]
    assert (failed.request, failed.ok) == ("r2", False)
    assert agent.state is State.BACKOFF


def test_reload_during_backoff_applies_at_the_next_start_and_a_stop_fails_a_pending_reload() -> None:
    sv, _ = make()
    started(sv)
    sv.exited(100, EXIT_1)
    [done] = sv.reload("r1", changed=True)
    assert done == ReloadDone("r1", True, "the proxy is waiting to restart: epoch 1 will start with the new settings")
    sv2, _ = make(hot_restart=True)
    started(sv2)
    sv2.ready(0)
    sv2.reload("r2")
    assert sv2.terminate()[0] == ReloadDone("r2", False, "stop requested")
