"""ISTIO_VM_CAPTURE's open policies for real (root; own network namespace; the pilot-agent double):
the rules follow the proxy's readiness, the helper keeps root with CAP_NET_ADMIN and CAP_NET_RAW only,
and it is gone within 1 s of a SIGKILL of the supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from testbed.service import REFERENCE_CLUSTER_ENV, Service, ensure_user, service
from testbed.wait import process_gone, wait_for

pytestmark = pytest.mark.root
NET_CAPS = f"{(1 << 12) | (1 << 13):016x}"  # CAP_NET_ADMIN | CAP_NET_RAW


@pytest.fixture
def svc() -> Iterator[Service]:
    ensure_user("istio-proxy")
    with service({"ISTIO_VM_BACKOFF_INITIAL": "0.2s", "TERMINATION_DRAIN_DURATION": "1s",
                  "ISTIO_VM_STOP_TIMEOUT": "2s"}) as s:
        s.env.pop("ISTIO_CUSTOM_IP_TABLES")  # istio-vm installs the reference VM's rules in the namespace
        s.env.pop("PROXY_UID")
        s.env["DOUBLE_READY_FILE"] = str(s.workdir / "ready")
        yield s


def nat(svc: Service) -> str:
    return subprocess.run(["ip", "netns", "exec", svc.netns, "iptables-save", "-t", "nat"], capture_output=True,
                          text=True, check=True).stdout


def parts_on(svc: Service) -> set[str]:
    text = nat(svc)
    on = set()
    if "-A PREROUTING -p tcp -j ISTIO_INBOUND" in text:
        on.add("inbound")
    if "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in text:
        on.add("outbound")
    assert ("outbound" in on) == ("--to-ports 15053" in text) or "15053" not in nat_full_plan(svc)
    return on


def nat_full_plan(svc: Service) -> str:
    return svc.run("iptables", "plan").stdout




def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def helper_of(svc: Service) -> psutil.Process:
    [helper] = [p for p in psutil.Process(svc.daemon_pid()).children() if p.uids().real == 0]
    return helper


def verify(svc: Service) -> int:
    return svc.run("iptables", "verify").returncode


@pytest.mark.parametrize(("policy", "down"), [("outbound-fail-open", {"inbound"}), ("fail-open", set())])
def test_capture_follows_readiness_and_the_helper_has_only_net_caps(svc: Service, policy: str,
                                                                      down: set[str]) -> None:
    svc.write_env(REFERENCE_CLUSTER_ENV.read_text() + f"ISTIO_VM_CAPTURE={policy}\n")
    svc.start()
    # Before ready: the parts that follow the proxy are off; STATUS= says so.
    wait_for(lambda: svc.records("start"), 15, "the proxy")
    wait_for(lambda: parts_on(svc) == down, 10, f"capture {down} before ready")
    assert verify(svc) == 0, svc.log()  # compared with what the service recorded in its run dir
    svc.wait_notification(f"capture: {'inbound only' if down else 'none'}")
    # Ready: everything in, exactly the plan.
    (svc.workdir / "ready").touch()
    svc.wait_notification("READY=1")
    assert parts_on(svc) == {"inbound", "outbound"}
    assert verify(svc) == 0

    # Who runs with what: supervisor and proxy as istio-proxy with no capabilities; the helper root, net caps only.
    proxy = ensure_user("istio-proxy")
    helper = helper_of(svc)
    first = svc.records("start")[-1]["pid"]
    for pid in (svc.daemon_pid(), first):
        s = proc_status(pid)
        assert s["Uid"].split() == [str(proxy.pw_uid)] * 4
        assert (s["CapEff"], s["CapPrm"], s["CapInh"], s["CapAmb"]) == ("0" * 16,) * 4
    s = proc_status(helper.pid)
    assert s["Uid"].split() == ["0"] * 4
    assert (s["CapEff"], s["CapPrm"], s["CapBnd"]) == (NET_CAPS,) * 3
    assert (s["CapInh"], s["CapAmb"], s["NoNewPrivs"]) == ("0" * 16, "0" * 16, "1")

    # Outage: the proxy is SIGKILLed, the next epoch held unready: lifted; then ready again: reinstalled.
    (svc.workdir / "ready").unlink()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: parts_on(svc) == down, 10, "the lift after the proxy's death")
    assert verify(svc) == 0
    wait_for(lambda: len(svc.records("start")) == 2, 10, "the next epoch")
    (svc.workdir / "ready").touch()
    wait_for(lambda: parts_on(svc) == {"inbound", "outbound"}, 10, "the reinstall on ready")
    assert "Capture: all (epoch 1 ready)" in svc.log()

    # SIGKILL of the supervisor: the helper follows within 1 s (PR_SET_PDEATHSIG), no root process of ours left.
    os.kill(svc.daemon_pid(), signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: process_gone(helper.pid), 1.0, "the helper to exit")
    print(f"\nhelper gone {1000 * (time.monotonic() - killed):.0f} ms after SIGKILL of the supervisor")
    assert not [p for p in svc.processes() if p.uids().real == 0]
    assert svc.wait_exit(10)[0] == -signal.SIGKILL
