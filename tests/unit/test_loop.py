"""The supervise loop with fakes of its seams, in simulated time: output relay, reading before reaping,
the signal mapping, readiness, drain, the watchdog and spawn failures (no root, no processes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from istio_vm.errors import ExitStatus
from istio_vm.iptables.parts import Part
from istio_vm.service.loop import MAX_LINE
from istio_vm.service.machine import Policy
from istio_vm.service.reload import Request
from tests.sim import AGENT, ENVOY, EXIT_0, EXIT_1, TERMED, FakeChild, Sim


def exit_on_sigterm(sim: Sim, status: int = EXIT_0) -> None:
    """Children behave as pilot-agent and Envoy do: SIGTERM makes them exit."""
    def react(child: FakeChild, signum: int) -> None:
        if signum == signal.SIGTERM:
            sim.exit(child.pid, status)

    sim.on_signal = react


def test_partial_lines_are_joined_across_reads_and_the_rest_is_relayed_at_eof() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.at(0.1, lambda: sim.write(1000, b"hel"))
    sim.at(0.2, lambda: sim.write(1000, b"lo\nwor"))
    sim.at(0.3, lambda: sim.write(1000, b"[warning] disk\n", "stderr"))
    sim.at(0.4, lambda: sim.write(1000, b"ld"))  # no newline: relayed when the pipe closes
    sim.signal_at(1.0, signal.SIGTERM)
    assert sim.run() == ExitStatus.OK
    assert sim.lines() == ["hello", "[warning] disk", "world"]
    fields = [e.fields for e in sim.events if e.kind == "line"]
    assert [(f["ISTIO_STREAM"], f["ISTIO_EPOCH"], f["ISTIO_CHILD_PID"]) for f in fields] == [
        ("stdout", "0", "1000"), ("stderr", "0", "1000"), ("stdout", "0", "1000")]
    assert (fields[1]["PRIORITY"], fields[1]["SYSLOG_IDENTIFIER"]) == ("4", "pilot-agent")


def test_a_line_longer_than_64_kib_is_relayed_in_bounded_pieces() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    chunk = b"x" * 40000  # under the pipe's 64 KiB: the writer never blocks the single-threaded test
    for n in range(5):
        sim.at(0.1 * (n + 1), lambda: sim.write(1000, chunk))
    sim.at(0.6, lambda: sim.write(1000, b"\nnext\n"))
    sim.signal_at(1.0, signal.SIGTERM)
    sim.run()
    *pieces, last = sim.lines()
    assert last == "next"
    assert "".join(pieces) == "x" * 200000
    assert all(MAX_LINE <= len(piece) < 2 * MAX_LINE for piece in pieces[:-1])  # never buffered without bound
    assert len(pieces) > 1


def test_last_words_are_relayed_before_the_exit_is_handled() -> None:
    sim = Sim(AGENT, policy=Policy(max_restarts=0))
    def last_words_then_exit() -> None:
        sim.write(1000, b"panic: out of cheese\n")
        sim.exit(1000, EXIT_1)

    sim.at(0.1, last_words_then_exit)
    assert sim.run() == ExitStatus.CRASH_LOOP
    order = [(e.kind, e.text) for e in sim.events]
    assert order.index(("line", "panic: out of cheese")) < order.index(("log", "Epoch 0 exited: exited with status 1"))


def test_output_that_races_the_final_reap_is_flushed_and_every_pipe_closed() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.on_signal = lambda child, signum: sim.exit(child.pid, EXIT_0, racing=b"drained\nbye")
    sim.signal_at(1.0, signal.SIGTERM)
    assert sim.run() == ExitStatus.OK
    assert sim.lines()[-2:] == ["drained", "bye"]
    for fd in sim.children[1000].readers:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)  # closed by the loop


def test_sigterm_in_agent_mode_is_forwarded_and_a_clean_exit_is_status_0() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.signal_at(2.0, signal.SIGTERM)
    assert sim.run() == 0
    assert sim.children[1000].signals == [signal.SIGTERM]
    assert sim.notifications[0] == "STATUS=epoch 0 starting, pid 1000, 0 restarts"
    assert {"READY=1", "STOPPING=1"} <= set(sim.notifications)
    assert sim.drains == 0  # pilot-agent drains Envoy itself


def test_sighup_hot_restarts_envoy_and_probes_the_new_epoch() -> None:
    sim = Sim(ENVOY)
    exit_on_sigterm(sim, TERMED)
    sim.signal_at(1.0, signal.SIGHUP)
    sim.at(2.0, lambda: sim.exit(1000, EXIT_0))  # the parent leaves after the hand-over
    sim.signal_at(3.0, signal.SIGTERM)
    assert sim.run() == 0
    first, second = sim.children.values()
    assert first.argv == ("/usr/local/bin/envoy", "-c", "/etc/envoy.yaml", "--restart-epoch", "0", "--base-id", "0")
    assert second.argv[3:5] == ("--restart-epoch", "1")
    assert second.env == {"A": "1"}
    assert sim.removed == ["/dev/shm/envoy_shared_memory_0"]  # before epoch 0 only, never under a live parent
    assert 1 in sim.ready_calls  # epoch 1 is ready only when the admin port is epoch 1's
    assert sim.notifications.count("READY=1") == 2
    assert "RELOADING=1" in sim.notifications
    assert sim.drains == 1  # one admin port: one drain, however many epochs


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_pilot_agent_has_no_hot_restart_and_gets_neither_sighup_nor_sigusr1(signum: int) -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.signal_at(1.0, signum)
    sim.signal_at(2.0, signal.SIGTERM)
    sim.run()
    assert list(sim.children) == [1000]
    assert sim.children[1000].signals == [signal.SIGTERM]


def test_sigusr1_reopens_the_log_files_and_reaches_every_envoy(tmp_path: Path) -> None:
    sim = Sim(ENVOY, output_target="files", log_dir=str(tmp_path))
    exit_on_sigterm(sim, TERMED)
    sim.at(0.1, lambda: sim.write(1000, b"before\n"))
    sim.at(0.2, lambda: os.rename(tmp_path / "istio.log", tmp_path / "istio.log.1"))  # logrotate
    sim.signal_at(0.3, signal.SIGUSR1)
    sim.at(0.4, lambda: sim.write(1000, b"after\n"))
    sim.signal_at(1.0, signal.SIGTERM)
    sim.run()
    assert (tmp_path / "istio.log.1").read_text() == "before\n"
    assert (tmp_path / "istio.log").read_text() == "after\n"
    assert sim.children[1000].signals[0] == signal.SIGUSR1


def test_envoy_drain_polls_connections_until_none_then_stops() -> None:
    sim = Sim(ENVOY)
    exit_on_sigterm(sim, TERMED)
    sim.connections = [5, 2, 0]
    sim.signal_at(1.0, signal.SIGTERM)
    assert sim.run() == 0
    assert sim.drains == 1
    assert sim.clock.elapsed == pytest.approx(1.5)  # three polls, 0.25 s apart: no waiting for the full drain
    assert sim.children[1000].signals == [signal.SIGTERM]


def test_readiness_is_probed_until_the_proxy_answers() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.ready_after = 2.0
    sim.signal_at(5.0, signal.SIGTERM)
    sim.run()
    ready_at = sim.notifications.index("READY=1")
    assert sim.notifications[ready_at + 1] == "STATUS=epoch 0 running, pid 1000, 0 restarts"
    assert 2.0 <= sim.notified_at[ready_at] <= 2.0 + Policy().probe_max  # READY=1 soon after it is ready
    assert sim.ready_calls_at[:3] == pytest.approx([0.01, 0.02, 0.03])  # every 10 ms at first
    assert sim.ready_calls_at[-1] - sim.ready_calls_at[-2] == pytest.approx(Policy().probe_max)  # backing off
    assert sim.ready_calls_at[-1] == sim.notified_at[ready_at]  # and not once ready


def test_a_hot_restart_and_a_restart_after_a_crash_are_ready_soon_after_the_proxy() -> None:
    sim = Sim(ENVOY, policy=Policy(hot_restart=True, backoff_initial=1.0))
    exit_on_sigterm(sim, TERMED)
    sim.ready_after = 0.1
    sim.signal_at(1.0, signal.SIGHUP)  # epoch 1 answers at once: ready at its first probe
    sim.at(2.0, lambda: sim.exit(1000, EXIT_0))
    sim.at(3.0, lambda: sim.exit(1001, EXIT_1))  # a crash: epoch 2 after the 1 s backoff
    sim.signal_at(5.0, signal.SIGTERM)
    assert sim.run() == 0
    ready = [t for t, m in zip(sim.notified_at, sim.notifications, strict=True) if m == "READY=1"]
    assert ready == pytest.approx([0.11, 1.01, 4.01])


def test_the_watchdog_is_fed_on_time_in_simulated_hours() -> None:
    sim = Sim(AGENT, watchdog_interval=15.0)
    exit_on_sigterm(sim)
    sim.signal_at(3600.0, signal.SIGTERM)
    sim.run(timeout=4000)
    assert sim.notifications.count("WATCHDOG=1") == 3600 // 15 + 1  # at 0, 15, ..., 3600 s


def test_a_missing_binary_backs_off_then_gives_up_with_the_crash_loop_status() -> None:
    sim = Sim(AGENT, policy=Policy(backoff_initial=1, backoff_max=4, max_restarts=3))
    sim.spawn_error = FileNotFoundError(2, "No such file or directory")
    assert sim.run() == ExitStatus.CRASH_LOOP
    messages = sim.logged()
    assert messages.count("Epoch 0 could not start: /usr/local/bin/pilot-agent: No such file or directory") == 1
    assert "Restarting in 4.0s (restart 3)" in messages
    assert sim.clock.elapsed == pytest.approx(1 + 2 + 4)


def test_a_crash_restarts_with_a_fresh_epoch_and_kills_what_it_left() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.at(1.0, lambda: sim.exit(1000, signal.SIGKILL))
    sim.signal_at(10.0, signal.SIGTERM)
    assert sim.run() == 0
    assert list(sim.children) == [1000, 1001]
    assert (1000, ()) in sim.killed  # whatever the dead epoch left behind (no other epoch to spare)
    assert "Epoch 0 exited: killed by SIGKILL (perhaps out of memory?)" in sim.logged()


def test_every_transition_is_logged_once_with_old_and_new_state() -> None:
    sim = Sim(AGENT)
    exit_on_sigterm(sim)
    sim.signal_at(2.0, signal.SIGTERM)
    sim.run()
    changes = [(e.fields["ISTIO_PREVIOUS_STATE"], e.fields["ISTIO_STATE"]) for e in sim.events
               if e.fields.get("ISTIO_EVENT") == "state"]
    assert changes == [("new", "starting"), ("starting", "running"), ("running", "stopping"), ("stopping", "stopped")]


class _OneRequest:
    """The reload channel with one `istio-vm reload` request waiting; the answers it was given."""

    def __init__(self, request: Request) -> None:
        self.request: Request | None = request
        self.reports: list[tuple[str, bool, str]] = []

    def take(self) -> Request | None:
        request, self.request = self.request, None
        return request

    def report(self, request: str, ok: bool, message: str) -> None:
        self.reports.append((request, ok, message))


class _Helper:
    pid = 4242
    on = frozenset({Part.INBOUND})  # what start installed under outbound-fail-open: no epoch ready yet

    def __init__(self) -> None:
        self.switched: list[tuple[frozenset[Part], bool]] = []

    def switch(self, parts: frozenset[Part], on: bool) -> None:
        self.switched.append((parts, on))


def test_a_reload_takes_the_new_drain_times_and_keeps_the_parts_that_follow_the_proxy() -> None:
    follows = frozenset({Part.OUTBOUND})
    sim = Sim(ENVOY, policy=Policy(hot_restart=True, backoff_initial=1.0, capture_follows=follows))
    helper, channel = _Helper(), _OneRequest(Request("r1", ENVOY, Policy(hot_restart=True, termination_drain=3.0)))
    sim.loop.capture, sim.loop.reloads = helper, channel  # type: ignore[assignment]
    exit_on_sigterm(sim, TERMED)
    sim.signal_at(1.0, signal.SIGHUP)
    sim.at(2.0, lambda: sim.exit(1000, EXIT_0))  # epoch 0 leaves after the hand-over
    sim.at(3.0, lambda: sim.exit(1001, EXIT_1))  # epoch 1 crashes: the outbound part is lifted again
    sim.signal_at(4.5, signal.SIGTERM)
    sim.run()
    assert channel.reports == [("r1", True, "epoch 1 ready (pid 1001)")]
    assert sim.supervisor.policy.termination_drain == 3.0
    assert sim.supervisor.policy.capture_follows == follows
    assert (follows, False) in helper.switched[-2:]


def test_an_epoch_0_spawned_before_the_loop_is_adopted_not_spawned_again() -> None:
    """start.py spawns epoch 0 before installing the rules; the loop's first Spawn takes it over."""
    sim = Sim(ENVOY, policy=Policy(hot_restart=True, backoff_initial=1.0))
    exit_on_sigterm(sim, TERMED)
    sim.loop.first = sim.loop.ops.spawn(ENVOY.argv(0), ENVOY.environment)
    sim.ready_after = 0.05
    sim.signal_at(1.0, signal.SIGHUP)
    sim.signal_at(2.0, signal.SIGTERM)
    sim.run()
    assert sorted(sim.children) == [1000, 1001]  # epoch 0 (adopted) and the hot restart's epoch 1
    assert sim.removed == []  # start.py removed a foreign shm before it spawned the adopted epoch
    assert "Epoch 0 starting, pid 1000" in sim.logged()
    assert sim.notified_at[sim.notifications.index("READY=1")] == pytest.approx(0.05, abs=0.011)


def test_a_failed_spawn_before_the_loop_is_the_first_epoch_s_spawn_failure() -> None:
    sim = Sim(AGENT, policy=Policy(backoff_initial=1, backoff_max=1))
    exit_on_sigterm(sim)
    sim.loop.first = FileNotFoundError(2, "No such file or directory")
    sim.signal_at(2.0, signal.SIGTERM)
    assert sim.run() == ExitStatus.OK
    messages = sim.logged()
    assert "Epoch 0 could not start: /usr/local/bin/pilot-agent: No such file or directory" in messages
    assert "Epoch 1 starting, pid 1000" in messages  # after the backoff, spawned by the loop itself
