"""ISTIO_VM_CAPTURE=fail-closed (the default) in a real systemd: no window where traffic bypasses the proxy.

An ordinary user (nobody) in the container connects to a destination outside (testbed/app.py in a client
network namespace) in a loop, while istio-vm is SIGKILLed and restarted by systemd, and across
`systemctl restart`: every connection is captured (refused: nothing listens on 15001 in agent mode), none
reaches the destination directly. A crash loop that exhausts the restarts, a stop while systemd waits to
restart, and `systemctl stop` leave no rule. See docs/systemd.md.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any

import pytest

from testbed import systemd_container as sc
from testbed.wait import wait_for
from tests.system.container_vm import (
    CLIENT_IP,
    CLIENT_NS,
    READY_GATE,
    SUPPORT,
    SYSTEMD_TIER,
    UNIT,
    VM_IP,
    Vm,
    agent_mode,
    assert_rules_are_the_plan,
    client_network,
    envoy_mode,
    needs_envoy,
    start,
)

pytestmark = SYSTEMD_TIER
CLEANUP = "istio-sidecar-cleanup.service"
CUT = "error: [Errno 104] Connection reset by peer"  # accepted by Envoy in its last milliseconds
DRAIN = 2.0  # envoy_mode's TERMINATION_DRAIN_DURATION
# CAP_DAC_OVERRIDE, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_ADMIN, NET_RAW: the unit's bounding set
UNIT_BOUNDING_SET = f"{sum(1 << cap for cap in (1, 6, 7, 8, 10, 12, 13)):016x}"
PROBES = PurePosixPath("/var/tmp/probes.jsonl")
PROBE_STOP = PurePosixPath("/var/tmp/probes.stop")


def destination(vm: Vm) -> None:
    """The app on CLIENT_IP:8080 in the client namespace: "outside" for the VM, reached by its routes."""
    serve_app(vm, "destination", ["ip", "netns", "exec", CLIENT_NS], CLIENT_IP)


def serve_app(vm: Vm, unit: str, prefix: list[str], host: str) -> None:
    """The client network, testbed/app.py on host:8080 as a transient unit (run by `prefix`), the probe script."""
    client_network(vm)
    vm.write(SUPPORT / "app.py", (sc.PROJECT_DIR / "testbed/app.py").read_text())
    vm.write(SUPPORT / "probe.py", (sc.PROJECT_DIR / "testbed/probe.py").read_text())
    vm.c.run(["systemd-run", f"--unit={unit}", *prefix, "python3", f"{SUPPORT}/app.py", "--host", host,
              "--port", "8080", "--quiet"])
    vm.c.wait_for_journal(lambda e: e.get("MESSAGE", "").startswith("app: listening"), "--unit", f"{unit}.service")


def probes(vm: Vm) -> list[dict[str, Any]]:
    path = vm.c.path(PROBES)
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines[:-1]]  # the last line may be half-written


@contextmanager
def probing(vm: Vm, prefix: tuple[str, ...] = ("--uid=nobody",), host: str = CLIENT_IP, timeout: float = 1.0,
            ) -> Iterator[list[dict[str, Any]]]:
    """New connections to host:8080 in a loop (a transient unit; by default nobody's to the destination)
    for the duration; the outcomes."""
    for p in (PROBES, PROBE_STOP):
        vm.c.path(p).unlink(missing_ok=True)
    vm.c.run(["systemd-run", "--unit=probe", *prefix, "python3", f"{SUPPORT}/probe.py", host, "8080",
              str(PROBES), str(PROBE_STOP), str(timeout)])
    outcomes: list[dict[str, Any]] = []
    try:
        wait_for(lambda: len(probes(vm)) > 20, 30, "the first probes")
        yield outcomes
    finally:
        vm.write(PROBE_STOP, "")
        wait_for(lambda: vm.c.systemctl("is-active", "probe.service", check=False).stdout.strip() != "active",
                 30, "the probe to stop")
        outcomes += probes(vm)


def wait_for_probes_after(vm: Vm, t: float, count: int = 20) -> None:
    wait_for(lambda: len([p for p in probes(vm) if p["t0"] > t]) > count, 30, f"{count} probes after {t}")


def proc_status(vm: Vm, pid: int) -> dict[str, str]:
    """/proc/PID/status inside the container, as fields."""
    text = vm.c.run(["cat", f"/proc/{pid}/status"]).stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def journal_time(entry: dict[str, Any]) -> float:
    return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6


def test_fail_closed_keeps_capture_across_sigkill_of_istio_vm_and_systemctl_restart(vm: Vm) -> None:
    agent_mode(vm)
    destination(vm)
    before = vm.rules()
    with probing(vm) as direct_before:
        pass
    assert {p["outcome"] for p in direct_before} == {"direct"}  # without istio-vm the probe reaches it

    start(vm)
    with probing(vm) as outcomes:
        # 1. SIGKILL of istio-vm itself: systemd restarts it after RestartSec (5 s); the rules stay.
        daemon = vm.show("MainPID")["MainPID"]
        killed = time.clock_gettime(time.CLOCK_MONOTONIC)
        vm.c.run(["kill", "-KILL", daemon])
        kept = vm.wait(lambda e: e.get("ISTIO_CAPTURE") == "kept")
        assert "Restart=on-failure restarts after signal (killed KILL)" in kept["MESSAGE"]
        assert kept["_UID"] == "0"
        wait_for(lambda: vm.show("NRestarts", "ActiveState") == {"NRestarts": "1", "ActiveState": "active"},
                 60, "systemd's restart of istio-vm")
        assert vm.show("MainPID")["MainPID"] != daemon
        back = time.clock_gettime(time.CLOCK_MONOTONIC)
        assert_rules_are_the_plan(vm)

        # 2. systemctl restart: stop (drain), then start; the rules stay in between.
        vm.c.systemctl("restart", UNIT, timeout=120)
        restarted = time.clock_gettime(time.CLOCK_MONOTONIC)
        kept_entries = [e for e in vm.journal() if e.get("ISTIO_CAPTURE") == "kept"]
        assert len(kept_entries) == 2
        assert kept_entries[1]["MESSAGE"].endswith("a restart job is queued")
        wait_for(lambda: len(probes(vm)) > len([p for p in probes(vm) if p["t"] < restarted]) + 20, 30,
                 "probes after the restart")
    assert_rules_are_the_plan(vm)
    assert not [e for e in vm.journal() if e["MESSAGE"].startswith("iptables clean: ")]

    seen = {p["outcome"] for p in outcomes}
    assert "direct" not in seen, [p for p in outcomes if p["outcome"] == "direct"][:5]
    assert seen == {"refused"}
    # The loop ran through both windows, densely.
    assert outcomes[0]["t"] < killed
    assert outcomes[-1]["t"] > restarted
    window = [p for p in outcomes if killed <= p["t"] <= back]
    assert len(window) > 100
    print(f"\n{len(outcomes)} connections by nobody, SIGKILL window {back - killed:.1f}s ({len(window)}), "
          "none reached the destination directly")

    # 3. stop: ExecStopPost cleans; the probe reaches the destination directly again.
    vm.c.systemctl("stop", UNIT, timeout=60)
    assert vm.rules() == before
    [clean] = [e for e in vm.journal() if e["MESSAGE"].startswith("iptables clean: ")]
    assert clean["_UID"] == "0"
    with probing(vm) as after:
        pass
    assert {p["outcome"] for p in after} == {"direct"}


def test_crash_loop_that_exhausts_the_restarts_and_stop_during_auto_restart_leave_no_rule(vm: Vm) -> None:
    # Every start of the proxy crashes: istio-vm gives up (exit 69) and systemd restarts it until the
    # start limit (10 in 2 min). RestartSec is shortened by a drop-in only to keep the test short.
    agent_mode(vm, DOUBLE_CRASH_AT_START="1", ISTIO_VM_MAX_RESTARTS="1")
    vm.write(PurePosixPath(f"/etc/systemd/system/{UNIT}.d/test.conf"), "[Service]\nRestartSec=0.3s\n")
    vm.c.systemctl("daemon-reload")
    before = vm.rules()
    vm.c.systemctl("start", UNIT, check=False, timeout=120)
    wait_for(lambda: vm.show("ActiveState")["ActiveState"] == "failed", 120, "the unit to fail for good")
    # systemd 252 refuses the 11th start (StartLimitBurst=10): failed with the last run's result.
    assert vm.show("Result", "NRestarts", "ExecMainStatus") == {
        "Result": "exit-code", "NRestarts": "10", "ExecMainStatus": "69"}
    kept = [e["MESSAGE"] for e in vm.journal() if e.get("ISTIO_CAPTURE") == "kept"]
    # Ten starts (StartLimitBurst), each exit 69 kept the rules for the next, the last one too; then
    # "Start request repeated too quickly", failed, OnFailure= cleaned.
    assert len(kept) == 10, kept
    wait_for(lambda: vm.c.systemctl("show", "--property=ActiveState", "--value", CLEANUP).stdout.strip()
             == "inactive" and vm.c.journal("--unit", CLEANUP), 30, "the cleanup unit")
    [clean] = [e for e in vm.c.journal("--unit", CLEANUP) if e["MESSAGE"].startswith("iptables clean: ")]
    assert clean["_UID"] == "0"
    assert vm.rules() == before

    # Stopped while systemd waits to restart it (SIGKILL, then stop within RestartSec): no rule either.
    vm.c.systemctl("reset-failed", UNIT)
    vm.write(PurePosixPath(f"/etc/systemd/system/{UNIT}.d/test.conf"), "[Service]\nRestartSec=30s\n")
    vm.c.systemctl("daemon-reload")
    agent_mode(vm)
    start(vm)
    vm.c.run(["kill", "-KILL", vm.show("MainPID")["MainPID"]])
    wait_for(lambda: vm.show("SubState")["SubState"] == "auto-restart", 30, "auto-restart")
    assert vm.rules() != before
    vm.c.systemctl("stop", UNIT)
    wait_for(lambda: vm.rules() == before, 30, "the cleanup after a stop during auto-restart")
    assert vm.show("ActiveState")["ActiveState"] in ("failed", "inactive")


def test_outbound_fail_open_follows_the_proxy_under_systemd_with_a_net_caps_only_helper(vm: Vm) -> None:
    agent_mode(vm, ready_gate=True, ISTIO_VM_CAPTURE="outbound-fail-open")
    vm.write(READY_GATE, "")
    first = start(vm)
    daemon = int(vm.show("MainPID")["MainPID"])
    assert vm.show("StatusText")["StatusText"] == f"epoch 0 running, pid {first}, 0 restarts, capture: all"
    events = [(e["MESSAGE"], e["ISTIO_CAPTURE"]) for e in vm.journal("ISTIO_EVENT=capture") if "ISTIO_CAPTURE" in e]
    assert [m.split(",")[0] for m, _ in events] == ["Capture: inbound only (no epoch ready yet)",
                                                   "Capture: all (epoch 0 ready)"]
    # The helper: root with CAP_NET_ADMIN and CAP_NET_RAW only, in the unit, a child of istio-vm.
    [helper] = [int(p) for p in vm.c.run(["ps", "-o", "pid=", "--ppid", str(daemon)]).stdout.split()
                if vm.uid_of(p) == 0]
    status = proc_status(vm, helper)
    assert status["Uid"].split() == ["0"] * 4
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == ("0000000000003000",) * 3
    assert (status["CapInh"], status["CapAmb"], status["NoNewPrivs"]) == ("0" * 16, "0" * 16, "1")
    # The supervisor and the proxy: istio-proxy with no capability at all, and no way back (no_new_privs);
    # their bounding set is the unit's CapabilityBoundingSet=, unused.
    for pid in (daemon, first):
        status = proc_status(vm, pid)
        assert status["Uid"].split() == [str(vm.proxy_user()[0])] * 4
        assert (status["CapEff"], status["CapPrm"], status["CapInh"], status["CapAmb"]) == ("0" * 16,) * 4
        assert (status["CapBnd"], status["NoNewPrivs"]) == (UNIT_BOUNDING_SET, "1")
    assert vm.istio_vm("iptables", "verify", check=False).returncode == 0

    # The proxy dies, the next epoch is held unready: outbound lifted, the unit stays active and says so.
    vm.c.path(READY_GATE).unlink()
    vm.c.run(["kill", "-KILL", str(first)])
    lifted = vm.wait(lambda e: e.get("ISTIO_CAPTURE") == "inbound only" and "epoch 0 exited" in e["MESSAGE"])
    assert float(lifted["ISTIO_CAPTURE_MS"]) < 500
    assert vm.istio_vm("iptables", "verify", check=False).returncode == 0  # against the recorded state
    assert "-j ISTIO_REDIRECT" not in vm.c.run(["iptables-save", "-t", "nat"]).stdout.split("ISTIO_OUTPUT -d 127")[1]
    wait_for(lambda: "capture: inbound only" in vm.show("StatusText")["StatusText"], 10, "STATUS=")
    assert "capture: inbound only" in vm.c.systemctl("status", UNIT, check=False).stdout
    assert vm.show("ActiveState")["ActiveState"] == "active"
    vm.write(READY_GATE, "")
    vm.wait(lambda e: e.get("ISTIO_CAPTURE") == "all" and "epoch 1 ready" in e["MESSAGE"])
    assert vm.istio_vm("iptables", "verify", check=False).returncode == 0
    vm.c.systemctl("stop", UNIT, timeout=60)
    stopping = [e["MESSAGE"] for e in vm.journal("ISTIO_EVENT=capture") if "(stopping)" in e["MESSAGE"]]
    assert len(stopping) == 1


@pytest.mark.envoy
@needs_envoy
def test_stop_under_a_stream_of_new_inbound_connections_keeps_each_policys_promise(vm: Vm) -> None:
    """A client outside connects to VM_IP:8080 again and again (new connections, one at a time) while
    `systemctl stop` runs, with each policy in turn (one container: each stop leaves the rules as before).
    What each promises at stop (docs/systemd.md, "Stopping under load"):
    - fail-closed and outbound-fail-open keep inbound capture until Envoy has exited: every connection is
      served through Envoy, then refused for the fraction of a second until ExecStopPost= cleans, then
      reaches the app directly; none reaches the app without Envoy while Envoy runs;
    - fail-open lifts inbound capture before Envoy is told to drain: served through Envoy, then directly,
      none refused;
    for all: none hangs or fails otherwise, and no rule is left after the stop."""
    serve_app(vm, "app", [], "0.0.0.0")
    before = vm.rules()
    for policy in ("fail-closed", "outbound-fail-open", "fail-open"):
        envoy_mode(vm, ISTIO_VM_CAPTURE=policy)
        since = time.clock_gettime(time.CLOCK_MONOTONIC)  # this policy's journal entries only
        start(vm)
        with probing(vm, ("ip", "netns", "exec", CLIENT_NS), VM_IP, timeout=5) as outcomes:
            vm.c.systemctl("stop", UNIT, timeout=60)
            stopped = time.clock_gettime(time.CLOCK_MONOTONIC)
            wait_for_probes_after(vm, stopped)
        assert vm.rules() == before, policy
        entries = [e for e in vm.journal() if journal_time(e) > since]
        [sigterm] = [journal_time(e) for e in entries if e["MESSAGE"] == "Received SIGTERM"]
        [exited] = [journal_time(e) for e in entries if e.get("ISTIO_EVENT") == "exit"]
        lifts = [e["MESSAGE"].split(",")[0] for e in entries if "(stopping)" in e["MESSAGE"]]
        [cleaned] = [journal_time(e) for e in entries if e["MESSAGE"].startswith("iptables clean: ")]

        kinds = "".join({"proxied": "p", "refused": "r", "direct": "d", CUT: "x"}.get(p["outcome"], "?")
                        for p in outcomes)
        assert "?" not in kinds, (policy, {p["outcome"] for p in outcomes})  # none hung (5 s) or failed otherwise
        assert max(p["t"] - p["t0"] for p in outcomes) < DRAIN + 1.5  # one begun as the drain began waits it out
        assert all(abs(p["t"] - exited) < 0.1 for p in outcomes if p["outcome"] == CUT)  # only at Envoy's exit
        refused = [p for p in outcomes if p["outcome"] == "refused"]
        direct = [p for p in outcomes if p["outcome"] == "direct"]
        if policy == "fail-open":
            assert re.fullmatch("p+d+", kinds), (policy, kinds)
            assert lifts == ["Capture: none (stopping)"]
            assert direct[0]["t"] < exited  # lifted before Envoy stopped: the app took them while Envoy drained
        else:
            assert re.fullmatch("p+x?r+d+", kinds), (policy, kinds)
            assert lifts == ([] if policy == "fail-closed" else ["Capture: inbound only (stopping)"])
            assert direct[0]["t0"] > exited  # never the app without Envoy while Envoy runs
            assert refused[0]["t0"] > sigterm
            assert refused[-1]["t0"] < cleaned  # refused until ExecStopPost= has cleaned, not after
            window = refused[-1]["t"] - refused[0]["t0"]
            assert window < 2.0, (policy, window)  # Envoy's exit to the clean: 0.15-0.45 s measured
        print(f"\n{policy}: {len(outcomes)} new connections during the stop: {kinds.count('p')} through Envoy, "
              f"{len(refused)} refused ({refused[-1]['t'] - refused[0]['t0'] if refused else 0:.2f} s), "
              f"{kinds.count('x')} cut at Envoy's exit, then {len(direct)} direct")
