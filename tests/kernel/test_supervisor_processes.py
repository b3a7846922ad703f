"""The supervisor's processes for real: kill_tree against a tree that keeps forking, the proxy dying
with a SIGKILLed istio-vm (PR_SET_PDEATHSIG), and the next start killing what was left (root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from istio_vm.errors import ExitStatus
from testbed.service import Service, ensure_user, service
from testbed.wait import process_gone, wait_for

pytestmark = pytest.mark.root

# Runs in its own interpreter (the subreaper flag would outlive the test in pytest's process): an
# epoch whose children each setsid (leaving the group killpg reaches) and fork again a little later,
# so processes are born while kill_tree lists the tree; then it prints how many are left alive.
KILL_TREE = r"""
import json, os, sys, time
import psutil
from istio_vm.service.processes import RealProcessOps, become_subreaper
FORKER = '''
import os, random, time
for n in range(150):
    if os.fork() == 0:
        os.setsid()
        time.sleep(random.random() * 0.05)
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
        os._exit(0)
    time.sleep(0.001)
time.sleep(60)
'''
become_subreaper()
ops = RealProcessOps()
child = ops.spawn([sys.executable, "-c", FORKER], {"PATH": "/usr/bin:/bin"})
deadline = time.monotonic() + 20
while len(psutil.Process().children(recursive=True)) < 100 and time.monotonic() < deadline:
    time.sleep(0.01)
ops.kill_tree(child.pid, keep=())
alive = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
ops.reap()
print(json.dumps(alive))
"""


def test_kill_tree_leaves_nothing_even_when_the_tree_forks_while_it_is_killed() -> None:
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", KILL_TREE], capture_output=True, text=True, timeout=60,
                              check=True)
        assert json.loads(done.stdout) == [], done.stderr


@pytest.fixture
def svc() -> Iterator[Service]:
    ensure_user("istio-proxy")
    with service({"ISTIO_VM_BACKOFF_INITIAL": "0.3s", "TERMINATION_DRAIN_DURATION": "1s",
                  "ISTIO_VM_STOP_TIMEOUT": "2s"}) as s:
        yield s


def test_kill_9_of_istio_vm_takes_the_proxy_and_the_next_start_kills_the_rest(svc: Service) -> None:
    svc.write_env("")
    svc.start("run")
    svc.wait_notification("READY=1")
    agent = int(svc.records("start")[0]["pid"])
    grandchild = svc.records("envoy")[0]["envoy_pid"]  # the double does not give it a parent-death signal
    os.kill(svc.daemon_pid(), signal.SIGKILL)
    assert svc.proc is not None
    svc.proc.wait(timeout=10)
    assert svc.proc.stdout is not None
    svc.proc.stdout.close()
    wait_for(lambda: process_gone(agent), what="pilot-agent to die with istio-vm (PR_SET_PDEATHSIG)")
    assert not process_gone(grandchild)  # orphaned to init, still running
    svc.notify.messages.clear()
    svc.start("run")
    svc.wait_notification("READY=1")
    wait_for(lambda: process_gone(grandchild), what="the leftover to be killed by the next start")
    svc.signal(signal.SIGTERM)
    status, _, err = svc.wait_exit()
    assert status == 0, err
    assert f"(pid {grandchild}, process group {agent}): left running by a previous istio-vm that was killed" in err
    assert svc.processes() == []


def test_a_failed_exec_is_reported_and_counted_as_an_exit(svc: Service) -> None:
    svc.write_env("ISTIO_VM_MAX_RESTARTS=1\nISTIO_VM_BACKOFF_INITIAL=0.1s\n")
    os.unlink(f"{svc.env['ISTIO_BIN_BASE']}/pilot-agent")
    svc.start("run")
    status, _, err = svc.wait_exit()
    assert status == ExitStatus.CRASH_LOOP, err
    assert "could not start: " in err
    assert "No such file or directory" in err
    assert [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.name() == "pilot-agent"] == []
