"""Changing a running VM in a real systemd: reload (re-read, validate, apply or change nothing), the start
limits an operator meets while troubleshooting, and the shipped logrotate snippet. See docs/operations.md.

Each test boots its own Debian 12 container with istio-vm installed by `packaging/install` (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from testbed import systemd_container as sc
from testbed.wait import wait_for
from tests.system.container_vm import (
    CLIENT_IP,
    CLIENT_NS,
    CLUSTER_ENV,
    SUPPORT,
    UNIT,
    VM_IP,
    Vm,
    agent_mode,
    assert_rules_are_the_plan,
    client_network,
    envoy_mode,
    needs_envoy,
    start,
    why_no_container,
)

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


def edit(vm: Vm, *lines: str) -> int:
    """Append lines to cluster.env, as an operator editing it (later lines win, as in bash); the first's line number."""
    text = vm.c.path(CLUSTER_ENV).read_text()
    vm.write(CLUSTER_ENV, text + "".join(f"{line}\n" for line in lines))
    return text.count("\n") + 1


def reload_entries(vm: Vm, since: str) -> list[str]:
    """The messages of the ExecReload process (`istio-vm reload`, as root) after the journal cursor `since`."""
    return [e["MESSAGE"] for e in vm.c.journal("--unit", UNIT, f"--after-cursor={since}")
            if e.get("SYSLOG_IDENTIFIER") == "istio-vm" and e.get("_UID") == "0"]


def reload_said(vm: Vm, since: str, text: str) -> str:
    """The first message of `istio-vm reload` after `since` that starts with `text` (the journal may lag)."""
    def said() -> str:
        return next((m for m in reload_entries(vm, since) if m.startswith(text)), "")
    return wait_for(said, 30, f"the reload saying {text!r}")


def cursor(vm: Vm) -> str:
    return str(vm.journal()[-1]["__CURSOR"])


# ---- reload in agent mode: a typo changes nothing; no change, no restart; a changed environment restarts -------


def test_agent_mode_reload_typo_changes_nothing_unchanged_keeps_the_agent_and_a_new_environment_restarts_it(
        vm: Vm) -> None:
    agent_mode(vm)
    first = start(vm)
    daemon = vm.show("MainPID")["MainPID"]
    rules = vm.rules()
    original = vm.c.path(CLUSTER_ENV).read_text()

    # A typo: `systemctl reload` fails, the journal has the FILE:LINE line, nothing changed.
    mark = cursor(vm)
    line = edit(vm, "ISTIO_INBOUND_PORTS=8080,eighty")
    failed = vm.c.systemctl("reload", UNIT, check=False, timeout=120)
    assert failed.returncode != 0
    told = wait_for(lambda: [m for m in reload_entries(vm, mark) if "config error" in m], 30, "the reload's error")
    assert told[0].startswith(f"istio-vm: config error: {CLUSTER_ENV}:{line}: ISTIO_INBOUND_PORTS='8080,eighty': ")
    assert vm.show("ActiveState", "SubState", "MainPID") == {"ActiveState": "active", "SubState": "running",
                                                            "MainPID": daemon}
    assert [r["pid"] for r in vm.records("start")] == [first]
    assert vm.rules() == rules
    assert vm.records("signal") == []  # the agent was not even signalled

    # A setting that needs a restart: named, nothing changed.
    vm.write(CLUSTER_ENV, original)
    mark = cursor(vm)
    edit(vm, "ISTIO_VM_PROXY=envoy", "ENVOY_BOOTSTRAP=/var/lib/istio/envoy/none.yaml")
    assert vm.c.systemctl("reload", UNIT, check=False, timeout=120).returncode != 0
    told = wait_for(lambda: [m for m in reload_entries(vm, mark) if "config error" in m], 30, "the reload's error")
    assert any("ISTIO_VM_PROXY='envoy': cannot change while istio-sidecar runs (running: 'agent'): systemctl "
               "restart istio-sidecar" in m for m in told), told
    assert [r["pid"] for r in vm.records("start")] == [first]

    # Fixed and unchanged: the reload succeeds and pilot-agent keeps running.
    vm.write(CLUSTER_ENV, original)
    mark = cursor(vm)
    vm.c.systemctl("reload", UNIT, timeout=120)
    reload_said(vm, mark, "Reloaded: pilot-agent's arguments and environment are unchanged: not restarted")
    assert [r["pid"] for r in vm.records("start")] == [first]
    assert vm.records("signal") == []
    assert_rules_are_the_plan(vm)

    # A new variable for pilot-agent: it is restarted (SIGTERM, drained), the new one has it; the unit stays.
    mark = cursor(vm)
    edit(vm, "DOUBLE_MARK=reloaded")
    vm.c.systemctl("reload", UNIT, timeout=120)
    second = int(vm.event("ready", 1)["ISTIO_CHILD_PID"])
    assert [r["signal"] for r in vm.records("signal")] == ["SIGTERM"]
    assert [r["pid"] for r in vm.records("start")] == [first, second]
    assert vm.records("start")[1]["env"]["DOUBLE_MARK"] == "reloaded"
    reload_said(vm, mark, f"Reloaded: epoch 1 ready (pid {second}); pilot-agent was down for ")
    down = [e for e in vm.journal("ISTIO_EVENT=reload") if "was down for" in e["MESSAGE"]]
    assert len(down) == 1
    assert vm.show("ActiveState", "MainPID", "NRestarts", "StatusText") == {
        "ActiveState": "active", "MainPID": daemon, "NRestarts": "0",
        "StatusText": f"epoch 1 running, pid {second}, 0 restarts"}


# ---- reload in envoy mode under load: a new inbound port and new drain times, no failed request ---------------

LOOP = """
import collections, json, os, sys, urllib.request
url, stop = sys.argv[1], sys.argv[2]
ok, failed = 0, collections.Counter()
while not os.path.exists(stop):
    try:
        urllib.request.urlopen(url, timeout=10).read()  # a new connection every time
        ok += 1
    except Exception as e:
        failed[f"{type(e).__name__}: {e}"] += 1
print(json.dumps({"ok": ok, "failed": failed}))
"""


def request(vm: Vm, port: int) -> dict[str, Any]:
    code = f"import urllib.request; print(urllib.request.urlopen('http://{VM_IP}:{port}/', timeout=10).read().decode())"
    reply: dict[str, Any] = json.loads(vm.c.run(["ip", "netns", "exec", CLIENT_NS, "python3", "-c", code]).stdout)
    return reply


@pytest.mark.envoy
@needs_envoy
def test_envoy_mode_reload_under_load_captures_the_new_port_atomically_with_the_new_flags_and_no_failure(
        vm: Vm) -> None:
    envoy_mode(vm)
    client_network(vm)
    try:
        vm.write(SUPPORT / "app.py", (sc.PROJECT_DIR / "testbed/app.py").read_text())
        vm.write(SUPPORT / "loop.py", LOOP)
        for port in (8080, 8081):
            vm.c.run(["systemd-run", f"--unit=app{port}", "python3", f"{SUPPORT}/app.py", "--host", "0.0.0.0",
                      "--port", str(port)])
            listening = f"app: listening on 0.0.0.0:{port}"

            def up(e: dict[str, Any], m: str = listening) -> bool:
                return bool(e.get("MESSAGE") == m)
            vm.c.wait_for_journal(up,
                                  "--unit", f"app{port}.service")
        first = start(vm)
        daemon = vm.show("MainPID")["MainPID"]
        assert request(vm, 8080)["peer"].startswith("127.0.0.6:")  # captured: through Envoy's inbound cluster
        assert request(vm, 8081)["peer"].startswith(f"{CLIENT_IP}:")  # not captured (ISTIO_INBOUND_PORTS='8080')

        stop = "/var/tmp/stop-loop"
        with vm.c.popen(["ip", "netns", "exec", CLIENT_NS, "python3", f"{SUPPORT}/loop.py",
                         f"http://{VM_IP}:8080/", stop], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as loop:
            try:
                vm.wait(lambda e: e.get("SYSLOG_IDENTIFIER") == "envoy" and "[inbound]" in e["MESSAGE"]
                        and "src=" in e["MESSAGE"] and e.get("ISTIO_EPOCH") == "0")
                edit(vm, "ISTIO_INBOUND_PORTS='8080,8081'", "ENVOY_DRAIN_TIME_S=3", "ENVOY_PARENT_SHUTDOWN_TIME_S=4")
                mark = cursor(vm)
                vm.c.systemctl("reload", UNIT, timeout=120)  # returns once epoch 1 is ready
                second = int(vm.event("ready", 1)["ISTIO_CHILD_PID"])
                assert vm.event("exit", 0, timeout=30)["MESSAGE"] == "Epoch 0 (previous) exited: exited with status 0"
                # Requests keep flowing through epoch 1 after the handover.
                vm.wait(lambda e: e.get("SYSLOG_IDENTIFIER") == "envoy" and "[inbound]" in e["MESSAGE"]
                        and e.get("ISTIO_CHILD_PID") == str(second))
            finally:
                vm.c.run(["touch", stop])
                out, _err = loop.communicate(timeout=60)
        counts = json.loads(out)
        assert counts["failed"] == {}, counts
        assert counts["ok"] > 20, counts
        assert reload_said(vm, mark, "Reloaded: ") == f"Reloaded: epoch 1 ready (pid {second})"
        [command] = [e["MESSAGE"] for e in vm.journal("ISTIO_EPOCH=1") if e["MESSAGE"].startswith("Epoch 1 command: ")]
        assert "--restart-epoch 1" in command
        assert "--drain-time-s 3" in command
        assert "--parent-shutdown-time-s 4" in command
        # The new port is captured now; the old one still is; the rules are exactly the new plan.
        assert request(vm, 8081)["peer"].startswith("127.0.0.6:")
        assert request(vm, 8080)["peer"].startswith("127.0.0.6:")
        assert_rules_are_the_plan(vm)
        assert vm.show("ActiveState", "MainPID", "NRestarts") == {"ActiveState": "active", "MainPID": daemon,
                                                                 "NRestarts": "0"}
        assert first != second
    finally:
        vm.c.run(["ip", "netns", "delete", CLIENT_NS], check=False)
