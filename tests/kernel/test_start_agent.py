"""`istio-vm start` for real, in agent mode, with the pilot-agent double (root; own network namespace)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from istio_vm.errors import ExitStatus
from testbed.service import ISTIO_VM, Service, ensure_user, extra_group, service, traversable_by_others
from testbed.wait import wait_for
from tests.helpers import DATA

ISTIO_START_19 = DATA / "istio-1.9" / "istio-start.sh"

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", autouse=True)
def _proxy_user() -> None:
    ensure_user("istio-proxy")
    assert traversable_by_others(ISTIO_VM), (
        f"{ISTIO_VM} must be reachable by istio-proxy: clone the project where other users can read it")


@pytest.fixture
def svc() -> Iterator[Service]:
    with service({"ISTIO_VM_BACKOFF_INITIAL": "0.3s", "TERMINATION_DRAIN_DURATION": "1s",
                  "ISTIO_VM_STOP_TIMEOUT": "2s"}) as s:
        yield s


def started(svc: Service, *args: str) -> dict[str, Any]:
    svc.start(*args)
    svc.wait_notification("READY=1")
    return svc.records("start")[-1]


def test_env_argv_and_identity_are_those_istio_start_sh_gives(svc: Service) -> None:
    """Run the 1.9 script (real bash, real su) and istio-vm on the same files; pilot-agent sees the same."""
    cluster = svc.write_env(
        "ISTIO_NAMESPACE=shop\nISTIO_SERVICE=cart\nISTIO_PILOT_PORT=15010\nISTIO_META_DNS_CAPTURE='true'\n"
        "ISTIO_AGENT_FLAGS='--proxyLogLevel debug  --concurrency 2'\nPROV_CERT=\nSERVICE_ACCOUNT=sa1\n"
        "ISTIO_INBOUND_PORTS='8080'\n")
    files = {"ISTIO_SIDECAR_CONFIG": str(svc.workdir / "none.env"), "ISTIO_CLUSTER_CONFIG": str(cluster)}
    with extra_group("istio-proxy") as gid:
        script = subprocess.Popen(["ip", "netns", "exec", svc.netns, str(ISTIO_START_19), "run"],
                                  env={**svc.env, **files}, start_new_session=True)
        try:
            theirs = wait_for(lambda: svc.records("start"), what="istio-start.sh's pilot-agent")[0]
        finally:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
            for process in svc.processes():
                process.kill()
        svc.record_path.write_text("")
        env = {**svc.env, **files}
        svc.proc = subprocess.Popen(["ip", "netns", "exec", svc.netns, str(ISTIO_VM), "start", "run"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        svc.wait_notification("READY=1")
        ours = svc.records("start")[0]
        proxy = ensure_user("istio-proxy")
        expected_groups = sorted(os.getgrouplist("istio-proxy", proxy.pw_gid))
    assert ours["argv"] == theirs["argv"] == [
        f"{svc.workdir}/bin/pilot-agent", "proxy", "--proxyLogLevel", "debug", "--concurrency", "2"]
    # bash and su add these; NOTIFY_SOCKET is the supervisor's alone (the double must not notify systemd)
    artefacts = {"PWD", "SHLVL", "_", "MAIL", "OLDPWD", "NOTIFY_SOCKET"}
    their_env = {k: v for k, v in theirs["env"].items() if k not in artefacts}
    our_env = {k: v for k, v in ours["env"].items() if k not in artefacts}
    assert our_env == their_env
    assert ours["env"]["POD_NAMESPACE"] == "shop"
    assert ours["env"]["PROV_CERT"] == ""
    assert "NOTIFY_SOCKET" not in ours["env"]
    assert (ours["uid"], ours["euid"], ours["gid"], ours["egid"]) == (proxy.pw_uid,) * 2 + (proxy.pw_gid,) * 2
    assert gid in ours["groups"]
    assert ours["groups"] == theirs["groups"] == expected_groups
    assert ours["nofile"] == __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[1]


def test_notifications_in_order_and_sigterm_leaves_nothing(svc: Service) -> None:
    svc.write_env("")
    started(svc, "run")
    envoy_pid = svc.records("envoy")[0]["envoy_pid"]
    assert psutil.pid_exists(envoy_pid)
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert [r["signal"] for r in svc.records("signal")] == ["SIGTERM"]
    assert svc.processes() == []
    messages = svc.read_notifications()
    kinds = [m.split("=", 1)[0] if not m.startswith("STATUS=") else m for m in messages]
    assert kinds[0].startswith("STATUS=epoch 0 starting, pid ")
    assert kinds.index("READY") < kinds.index("STOPPING")
    assert "STATUS=epoch 0 running" in " ".join(kinds)
    assert "Received SIGTERM" in err
    assert "Epoch 0 exited: exited with status 0" in err


def test_crash_restarts_a_new_epoch_after_backoff_and_kills_the_orphan(svc: Service) -> None:
    svc.write_env("")
    first = started(svc, "run")
    orphan = svc.records("envoy")[0]["envoy_pid"]
    os.kill(int(first["pid"]), signal.SIGUSR2)  # the double crashes, leaving its envoy behind
    wait_for(lambda: len(svc.records("start")) == 2, what="the second epoch")
    crashed = svc.records("exit")[0]
    second = svc.records("start")[1]
    assert float(second["time"]) - float(crashed["time"]) >= 0.3  # ISTIO_VM_BACKOFF_INITIAL
    wait_for(lambda: not psutil.pid_exists(orphan), what="the orphaned envoy to be killed")
    svc.wait_notification("STATUS=epoch 1 running, pid")
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0
    assert "Epoch 0 exited: exited with status 1" in err
    assert "Restarting in 0.3s (restart 1)" in err


def test_sigkill_of_the_proxy_is_explained_and_restarted(svc: Service) -> None:
    svc.write_env("")
    first = started(svc, "run")
    os.kill(int(first["pid"]), signal.SIGKILL)
    wait_for(lambda: len(svc.records("start")) == 2, what="the second epoch")
    svc.signal(signal.SIGTERM)
    _, _, err = svc.wait_exit()
    assert "Epoch 0 exited: killed by SIGKILL (perhaps out of memory?)" in err


def test_crash_loop_ends_with_status_3(svc: Service) -> None:
    svc.write_env("ISTIO_VM_MAX_RESTARTS=2\nISTIO_VM_BACKOFF_INITIAL=0.1s\n")
    svc.env["DOUBLE_CRASH_AT_START"] = "1"
    svc.start("run")
    status, _, err = svc.wait_exit()
    assert status == ExitStatus.CRASH_LOOP == 69, err
    assert len(svc.records("start")) == 3
    assert "Giving up: 3 exits within 300s (ISTIO_VM_MAX_RESTARTS=2)" in err
    assert svc.processes() == []


def test_proxy_ignoring_sigterm_is_killed_with_its_tree(svc: Service) -> None:
    svc.write_env("")
    svc.env["DOUBLE_IGNORE_TERM"] = "1"
    started(svc, "run")
    began = time.monotonic()
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 1
    assert time.monotonic() - began >= 3  # TERMINATION_DRAIN_DURATION + ISTIO_VM_STOP_TIMEOUT
    assert "did not exit within 2.0s: killing its process tree" in err
    assert svc.processes() == []


def test_the_proxy_spawned_before_the_loop_gets_the_caught_signals_at_their_default(svc: Service) -> None:
    """start.py ignores SIGHUP and SIGUSR2 until the loop's handlers exist, and epoch 0 is spawned before
    them: it must not inherit the ignoring (an ignored signal stays ignored across exec)."""
    svc.env.pop("ISTIO_CUSTOM_IP_TABLES")  # the default mode, where epoch 0 boots during the install
    svc.write_env("")
    pid = started(svc)["pid"]
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    ignored = int(status["SigIgn"], 16)
    for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR1):
        assert not ignored & (1 << (signum - 1)), signal.Signals(signum).name


def test_a_failed_install_stops_the_proxy_spawned_before_it(svc: Service) -> None:
    """Epoch 0 boots while the rules are installed (service/start.py); when the install fails the start
    ends as before it did: the error, status 1, no READY=1, and nothing of the proxy left running."""
    failing = svc.workdir / "failing-bin"
    failing.mkdir()
    for name in ("iptables-nft-restore", "iptables-restore"):
        (failing / name).write_text("#!/bin/sh\necho 'iptables-restore: line 2 failed' >&2\nexit 1\n")
        (failing / name).chmod(0o755)
    svc.env.pop("ISTIO_CUSTOM_IP_TABLES")
    svc.env["PATH"] = f"{failing}:{svc.env['PATH']}"
    svc.write_env("")
    svc.start()
    status, _, err = svc.wait_exit()
    assert status == 1, err
    assert "line 2 failed" in err
    assert "READY=1" not in svc.read_notifications()
    assert svc.processes() == []  # the double and its Envoy stand-in were killed with their group


def test_second_start_is_refused_while_one_runs(svc: Service) -> None:
    svc.write_env("")
    started(svc, "run")
    second = svc.run("start", "run")
    assert second.returncode == ExitStatus.LOCKED == 75
    assert f"another istio-vm start is running (pid {svc.daemon_pid()}" in second.stderr
    svc.signal(signal.SIGTERM)
    assert svc.wait_exit()[0] == 0


def test_child_output_is_relayed_with_epoch_and_pid(svc: Service) -> None:
    svc.write_env("")
    first = started(svc, "run")
    svc.signal(signal.SIGTERM)
    _, _, err = svc.wait_exit()
    assert f"pilot-agent[epoch 0, pid {first['pid']}]: info\tpilot-agent double starting" in err
    assert f"pilot-agent[epoch 0, pid {first['pid']}]: warn\tthis is a test double, not Istio" in err


def test_files_log_target_appends_and_reopens_on_sigusr1(svc: Service) -> None:
    svc.write_env("ISTIO_LOG_TARGET=files\n")
    log = svc.workdir / "log" / "istio.log"
    log.write_text("from before\n")
    os.chmod(log, 0o666)
    first = started(svc, "run")
    wait_for(lambda: "pilot-agent double starting" in log.read_text(), what="istio.log")
    assert log.read_text().startswith("from before\n")  # appended, never truncated (1.9 truncated)
    assert "this is a test double" in (svc.workdir / "log" / "istio.err.log").read_text()
    log.rename(log.with_suffix(".log.1"))
    svc.signal(signal.SIGUSR1)
    wait_for(lambda: log.exists(), what="istio.log to be reopened")
    os.kill(int(first["pid"]), signal.SIGHUP)  # the double logs that it got it
    wait_for(lambda: "received SIGHUP" in log.read_text(), what="a line in the new istio.log")
    svc.signal(signal.SIGTERM)
    assert svc.wait_exit()[0] == 0


def test_hup_in_agent_mode_is_logged_and_ignored(svc: Service) -> None:
    svc.write_env("")
    started(svc, "run")
    svc.signal(signal.SIGHUP)
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0
    assert "SIGHUP without new settings ignored: pilot-agent has no hot restart" in err
    assert len(svc.records("start")) == 1
