"""A subset of the config fuzzer through the real CLI, in a private network namespace: a mutated config
never changes iptables when refused (exit 78), and `clean` removes the capture whatever the env files
became (the unit's ExecStopPost). The in-process tier (tests/unit/test_fuzz_config.py) runs thousands."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm.config.sources import read_shell
from istio_vm.iptables.commands import CleanSettings
from testbed.fuzz_config import Case, Mutator, clear, describe
from testbed.netns import Netns
from tests import netns_iptables
from tests.helpers import DATA

REFERENCE = DATA / "reference-vm"
ISTIO_VM = str(Path(sys.executable).parent / "istio-vm")
SEED = 1014
CASES = 40

pytestmark = pytest.mark.root


@pytest.fixture
def ns() -> Iterator[Netns]:
    with Netns.temporary("fuzz") as ns:
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        ns.ip("addr", "add", "10.98.0.2/24", "dev", "eth0")
        yield ns


def istio_vm(ns: Netns, env: dict[str, str], sidecar: str, cluster: str, resolv: str | None,
             *args: str) -> tuple[int, str, float]:
    argv = [ISTIO_VM, "--sidecar-env", sidecar, "--cluster-env", cluster, "iptables", *args]
    if resolv is not None:
        argv += ["--resolv-conf", resolv]
    started = time.monotonic()
    done = subprocess.run(["ip", "netns", "exec", ns.name, *argv], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    return done.returncode, done.stderr, time.monotonic() - started


def test_mutated_configs_through_the_cli_never_touch_iptables_when_refused(ns: Netns) -> None:
    with tempfile.TemporaryDirectory(prefix="istio-vm-fuzz-cli-") as tmp:
        work = Path(tmp)
        (work / "run").mkdir()
        (work / "case").mkdir()
        env = {"PATH": os.environ["PATH"], "PROXY_UID": "997", "ISTIO_VM_RUN_DIR": str(work / "run"),
               "ENVOY_USER": "root", "EXEC_USER": "root"}
        good = work / "cluster.env"
        good.write_text((REFERENCE / "cluster.env").read_text())
        good.chmod(0o644)
        resolv = str(REFERENCE / "resolv.conf")
        empty = netns_iptables.state(ns, "nft")
        mutator = Mutator(SEED)
        seen: dict[int, int] = {}
        ran = 0
        while ran < CASES:
            case = mutator.case(work / "case")
            settings = _clean_settings(case, env)
            if settings is None:  # the case moves the run directory or picks a backend: outside this test
                clear(work / "case")
                continue
            ran += 1
            status, err, _ = istio_vm(ns, env, "/nonexistent", str(good), resolv, "install")
            assert status == 0, err
            installed = netns_iptables.state(ns, "nft")
            status, err, seconds = istio_vm(ns, env, *_paths(case), "install")
            seen[status] = seen.get(status, 0) + 1
            assert status in (0, 78), f"{describe(case)}: exit {status}: {err[-2000:]}"
            assert "Traceback" not in err, describe(case)
            assert seconds < 30, describe(case)  # a hang (the in-process tier holds the 2 s per case)
            if status == 78:
                assert netns_iptables.state(ns, "nft") == installed, describe(case)
                assert all(line.startswith("istio-vm: ") for line in err.splitlines()), (describe(case), err)
            status, err, _ = istio_vm(ns, env, *_paths(case)[:2], None, "clean")
            assert status == 0, f"{describe(case)}: clean exit {status}: {err[-2000:]}"
            after = netns_iptables.state(ns, "nft")
            if settings.custom or settings.dry_run:  # valid settings that say: leave the rules alone
                status, err, _ = istio_vm(ns, env, "/nonexistent", str(good), None, "clean")
                after = netns_iptables.state(ns, "nft")
            assert after == empty, describe(case)
            clear(work / "case")
        assert seen.get(78, 0) > 0


def _paths(case: Case) -> tuple[str, str, str]:
    s = case.sources
    assert s.sidecar_env is not None
    assert s.cluster_env is not None
    return s.sidecar_env, s.cluster_env, s.resolv_conf


def _clean_settings(case: Case, env: dict[str, str]) -> CleanSettings | None:
    """What clean will read from this case (None: it would use another run directory or backend)."""
    settings = CleanSettings.from_shell(read_shell(case.sources, env, os.geteuid()))
    if settings.run_dir != env["ISTIO_VM_RUN_DIR"] or settings.backend not in (None, "nft"):
        return None
    return settings


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "bomb", "dangling"])
def test_clean_removes_capture_whatever_the_env_file_became(ns: Netns, kind: str) -> None:
    """The unit's ExecStopPost after someone broke cluster.env: clean neither hangs nor keeps the rules."""
    with tempfile.TemporaryDirectory(prefix="istio-vm-clean-") as tmp:
        work = Path(tmp)
        env = {"PATH": os.environ["PATH"], "PROXY_UID": "997", "ISTIO_VM_RUN_DIR": str(work / "run"),
               "ENVOY_USER": "root", "EXEC_USER": "root"}
        cluster = work / "cluster.env"
        cluster.write_text((REFERENCE / "cluster.env").read_text())
        cluster.chmod(0o644)
        empty = netns_iptables.state(ns, "nft")
        assert istio_vm(ns, env, "/nonexistent", str(cluster), str(REFERENCE / "resolv.conf"), "install")[0] == 0
        assert netns_iptables.state(ns, "nft") != empty
        cluster.unlink()
        if kind == "fifo":
            os.mkfifo(cluster)
        elif kind == "dev-zero":
            cluster.symlink_to("/dev/zero")
        elif kind == "dangling":
            cluster.symlink_to(work / "gone.env")
        else:
            cluster.write_text("A=xxxxxxxxxxxxxxxx\n" + "A=${A}${A}${A}${A}\n" * 40)
            cluster.chmod(0o644)
        status, err, seconds = istio_vm(ns, env, "/nonexistent", str(cluster), None, "clean")
        assert status == 0, err
        assert seconds < 30
        assert f"ignored for clean: {cluster}" in err
        assert netns_iptables.state(ns, "nft") == empty
        status, err, _ = istio_vm(ns, env, "/nonexistent", str(cluster), str(REFERENCE / "resolv.conf"), "install")
        assert status == 78, err
        assert netns_iptables.state(ns, "nft") == empty


@pytest.mark.parametrize("line", ["ENVOY_PORT='015001'", "ISTIO_INBOUND_PORTS='010'", "PROXY_UID='01747'",
                                  "ISTIO_INBOUND_TPROXY_ROUTE_TABLE='0376'\nISTIO_INBOUND_INTERCEPTION_MODE=TPROXY",
                                  "ISTIO_INBOUND_PORTS=080", "KUBE_VIRT_INTERFACES='+'", "ENVOY_PORT=" + "1" * 5000])
def test_values_that_would_mean_something_else_never_reach_iptables(ns: Netns, line: str) -> None:
    with tempfile.TemporaryDirectory(prefix="istio-vm-values-") as tmp:
        work = Path(tmp)
        env = {"PATH": os.environ["PATH"], "ISTIO_VM_RUN_DIR": str(work / "run"), "ENVOY_USER": "root",
               "EXEC_USER": "root", "PROXY_UID": "997"}
        cluster = work / "cluster.env"
        cluster.write_text((REFERENCE / "cluster.env").read_text() + line + "\n")
        cluster.chmod(0o644)
        empty = netns_iptables.state(ns, "nft")
        for command in ("install", "verify"):
            status, err, _ = istio_vm(ns, env, "/nonexistent", str(cluster), str(REFERENCE / "resolv.conf"), command)
            assert status == 78, err
            assert "Traceback" not in err
            assert f"{cluster}:" in err
        assert netns_iptables.state(ns, "nft") == empty
