"""ISTIO_VM_CAPTURE's open policies for real (root; own network namespace; the pilot-agent double):
the rules follow the proxy's readiness, the helper keeps root with CAP_NET_ADMIN and CAP_NET_RAW only,
and it is gone within 1 s of a SIGKILL of the supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from testbed.netns import CLIENT_V4, VM_V4, Pair, pair, resolv_conf
from testbed.service import REFERENCE_CLUSTER_ENV, Service, ensure_user, service
from testbed.wait import process_gone, wait_for
from tests.helpers import DNS_QUERY, landed

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
    # Before ready: the parts that follow the proxy are off; STATUS= says so. (The proxy starts while the
    # rules are installed: the notification, sent after the lift, is the moment to look.)
    wait_for(lambda: svc.records("start"), 15, "the proxy")
    svc.wait_notification(f"capture: {'inbound only' if down else 'none'}")
    wait_for(lambda: parts_on(svc) == down, 10, f"capture {down} before ready")
    assert verify(svc) == 0, svc.log()  # compared with what the service recorded in its run dir
    # Never more than that before ready: install itself wrote the proxy-down state (one restore), and the
    # helper had nothing to switch; 1.9's whole plan first and a lift once supervising would capture the
    # VM's connections to a proxy not yet listening for as long as that lift takes (about 30 ms).
    log = svc.log()
    written = log.split("Wrote IPv4 input to iptables-restore:\n", 1)[1].split("istio-vm: ", 1)[0]
    assert ("-A PREROUTING -p tcp -j ISTIO_INBOUND" in written) == bool(down), written
    assert "-j ISTIO_REDIRECT" not in written, written
    assert "15053" not in written, written
    assert f"Capture: {'inbound only' if down else 'none'} (no epoch ready yet), as installed" in log
    assert "Capture: all" not in log
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
        assert s["NoNewPrivs"] == "1"  # the bounding set (the caller's; the unit's under systemd) stays unused
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
    wait_for(lambda: "Capture: all (epoch 1 ready)" in svc.log(), 5, "the capture entry")  # logged once done

    # SIGKILL of the supervisor: the helper follows within 1 s (PR_SET_PDEATHSIG), no root process of ours left.
    os.kill(svc.daemon_pid(), signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: process_gone(helper.pid), 1.0, "the helper to exit")
    print(f"\nhelper gone {1000 * (time.monotonic() - killed):.0f} ms after SIGKILL of the supervisor")
    assert not [p for p in svc.processes() if p.uids().real == 0]
    assert svc.wait_exit(10)[0] == -signal.SIGKILL


# ---- traffic: where an ordinary user's connections and lookups, and inbound connections, land -------------

APP_UID = 12345
PHASES = ("before ready", "after ready", "outage", "after recovery")


def observe(p: Pair) -> dict[str, str]:
    """Outbound TCP and a UDP DNS query by an ordinary user of the VM, and an inbound connection from the client."""
    s = listeners(p)
    result = {}

    def outbound() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((CLIENT_V4, 8000), timeout=3).close()

    def dns() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as q:
            q.sendto(DNS_QUERY, (CLIENT_V4, 53))

    def inbound() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((VM_V4, 8080), timeout=3).close()

    p.vm.call(outbound, uid=APP_UID)
    result["outbound"] = landed(("proxy", s["15001"]), ("destination", s["dest"]))
    p.vm.call(dns, uid=APP_UID)
    result["dns"] = landed(("proxy", s["15053"]), ("destination", s["dns"]))
    p.client.call(inbound)
    result["inbound"] = landed(("proxy", s["15006"]), ("destination", s["app"]))
    return result


_LISTENERS: dict[str, dict[str, socket.socket]] = {}


def listeners(p: Pair) -> dict[str, socket.socket]:
    """The proxy's ports in the VM (what a captured connection reaches), the app, and the outside services."""
    if p.vm.name not in _LISTENERS:
        made = {}
        for name, ns, address, port, kind in (
                ("15001", p.vm, "0.0.0.0", 15001, socket.SOCK_STREAM), ("15006", p.vm, "0.0.0.0", 15006,
                                                                           socket.SOCK_STREAM),
                ("15053", p.vm, "0.0.0.0", 15053, socket.SOCK_DGRAM), ("app", p.vm, VM_V4, 8080, socket.SOCK_STREAM),
                ("dest", p.client, CLIENT_V4, 8000, socket.SOCK_STREAM), ("dns", p.client, CLIENT_V4, 53,
                                                                           socket.SOCK_DGRAM)):
            with ns.entered():
                s = socket.socket(socket.AF_INET, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(16)
            made[name] = s
        _LISTENERS[p.vm.name] = made
    return _LISTENERS[p.vm.name]


@pytest.mark.parametrize("policy", ["fail-closed", "outbound-fail-open", "fail-open"])
def test_traffic_lands_where_the_policy_says_in_every_phase(policy: str) -> None:
    ensure_user("istio-proxy")
    down = {"fail-closed": {"outbound": "proxy", "dns": "proxy", "inbound": "proxy"},
            "outbound-fail-open": {"outbound": "destination", "dns": "destination", "inbound": "proxy"},
            "fail-open": {"outbound": "destination", "dns": "destination", "inbound": "destination"}}[policy]
    up = {"outbound": "proxy", "dns": "proxy", "inbound": "proxy"}
    with pair() as p, resolv_conf(p.vm.name, CLIENT_V4), service(
            {"ISTIO_VM_BACKOFF_INITIAL": "0.2s", "TERMINATION_DRAIN_DURATION": "1s"}, netns=p.vm.name) as svc:
        try:
            svc.env.pop("ISTIO_CUSTOM_IP_TABLES")
            svc.env.pop("PROXY_UID")
            gate = svc.workdir / "ready"
            svc.env["DOUBLE_READY_FILE"] = str(gate)
            svc.write_env(REFERENCE_CLUSTER_ENV.read_text() + f"ISTIO_VM_CAPTURE={policy}\n")
            seen = {}
            svc.start()
            wait_for(lambda: svc.records("start"), 15, "the proxy")
            svc.wait_notification("STATUS=epoch 0 starting")  # the loop's: the rules are in (the proxy boots meanwhile)
            if policy != "fail-closed":
                svc.wait_notification("capture: " + ("inbound only" if policy == "outbound-fail-open" else "none"))
            seen["before ready"] = observe(p)
            gate.touch()
            svc.wait_notification("READY=1")
            seen["after ready"] = observe(p)
            gate.unlink()
            os.kill(svc.records("start")[-1]["pid"], signal.SIGKILL)
            wait_for(lambda: len(svc.records("start")) == 2, 10, "the next epoch (held unready)")
            seen["outage"] = observe(p)
            gate.touch()
            svc.wait_notification("STATUS=epoch 1 running")  # sent after the capture change of its readiness
            seen["after recovery"] = observe(p)
            assert seen == {"before ready": down, "after ready": up, "outage": down, "after recovery": up}, seen
        finally:
            for s in _LISTENERS.pop(p.vm.name, {}).values():
                s.close()
