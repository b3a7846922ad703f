"""Changing a running VM in a real systemd: reload (re-read, validate, apply or change nothing), the start
limits an operator meets while troubleshooting, and the shipped logrotate snippet. See docs/operations.md.

Each test boots its own Debian 12 container with istio-vm installed by `packaging/install` (conftest.py).
"""

from __future__ import annotations

import pytest

from testbed.wait import wait_for
from tests.system.container_vm import UNIT, Vm, agent_mode, start, why_no_container

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.root,
    pytest.mark.skipif(bool(why_no_container()), reason=why_no_container() or "-"),
]
LOG_DIR = "/var/log/istio"


def test_ten_operator_restarts_in_a_row_work_the_eleventh_is_refused_and_reset_failed_lifts_it(vm: Vm) -> None:
    agent_mode(vm)
    start(vm)
    for _ in range(9):  # with the first start: 10 starts within StartLimitIntervalSec=120
        vm.c.systemctl("restart", UNIT, timeout=60)
        assert vm.show("ActiveState")["ActiveState"] == "active"
    refused = vm.c.systemctl("restart", UNIT, check=False, timeout=60)
    assert refused.returncode != 0
    assert vm.show("ActiveState", "Result") == {"ActiveState": "failed", "Result": "start-limit-hit"}
    vm.c.systemctl("reset-failed", UNIT)  # as docs/operations.md says: startable again at once
    vm.c.systemctl("start", UNIT, timeout=60)
    assert vm.show("ActiveState")["ActiveState"] == "active"


def test_logrotate_snippet_rotates_and_signals_istio_vm_alone_which_reopens_the_files(vm: Vm) -> None:
    agent_mode(vm, ISTIO_LOG_TARGET="files")
    vm.c.systemctl("start", UNIT, timeout=120)  # returns at READY=1 (no ISTIO_EVENT fields: istio-vm logs to stderr)
    daemon = vm.show("MainPID")["MainPID"]
    log = vm.c.path(f"{LOG_DIR}/istio.log")
    wait_for(lambda: log.exists() and "pilot-agent double starting" in log.read_text(), 30, "istio.log written")
    [started] = vm.records("start")
    vm.c.run(["logrotate", "--force", "/etc/logrotate.d/istio-sidecar"])
    rotated = vm.c.path(f"{LOG_DIR}/istio.log.1")
    assert "pilot-agent double starting" in rotated.read_text()
    # With ISTIO_LOG_TARGET=files istio-vm's own lines go to stderr (the journal, through systemd), prefixed.
    vm.wait(lambda e: e.get("SYSLOG_IDENTIFIER") == "istio-vm"
            and e["MESSAGE"] == "istio-vm: Received SIGUSR1: reopening log files")
    # The proxy got no SIGUSR1 (pilot-agent would die of it): --kill-whom=main reached istio-vm alone.
    assert [r for r in vm.records("signal")] == []
    assert vm.show("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": daemon}
    # What the proxy writes now goes to the new istio.log, not to the rotated file.
    vm.c.run(["kill", "-HUP", str(started["pid"])])  # the double prints "received SIGHUP"
    wait_for(lambda: log.exists() and "received SIGHUP" in log.read_text(), 30, "a line in the new istio.log")
    assert "received SIGHUP" not in rotated.read_text()
    assert [r["signal"] for r in vm.records("signal")] == ["SIGHUP"]
