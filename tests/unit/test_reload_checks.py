"""istio_vm.service.reload's refusals: what a reload cannot change is named (exit 78) before anything changes."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm.config.model import Config
from istio_vm.errors import ConfigError
from istio_vm.service import reload
from istio_vm.service.start import run_lock
from tests.unit.test_config import load_files


@contextlib.contextmanager
def _no_signal_to_self() -> Iterator[None]:
    """reload's SIGHUP goes to the run lock's holder, this test process: ignored here."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


class Installed(Exception):
    """install_iptables was reached: every check had passed."""


def install(config: Config) -> object:
    raise Installed


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    return run


def started(tmp_path: Path, run: Path, cluster: str) -> Config:
    """The config of a start that is "running": this process holds the run lock and wrote running.json."""
    config = load_files(tmp_path, cluster=cluster, environ={"ISTIO_VM_RUN_DIR": str(run), "EXEC_USER": "root"})
    reload.prepare(config, iptables=True)
    return config


def changed(tmp_path: Path, run: Path, cluster: str) -> Config:
    return load_files(tmp_path, cluster=cluster, environ={"ISTIO_VM_RUN_DIR": str(run), "EXEC_USER": "root"})


@pytest.mark.skipif(os.geteuid() != 0, reason="the run lock's directory must be root's")
def test_a_new_inbound_port_under_fail_closed_reaches_the_install(tmp_path: Path, run_dir: Path) -> None:
    with run_lock(str(run_dir)):
        started(tmp_path, run_dir, "ISTIO_INBOUND_PORTS=8080\n")
        with pytest.raises(Installed):
            reload.reload(changed(tmp_path, run_dir, "ISTIO_INBOUND_PORTS=8080,8081\n"), install_iptables=install)


@pytest.mark.skipif(os.geteuid() != 0, reason="the run lock's directory must be root's")
def test_a_rule_change_under_an_open_policy_needs_a_restart(tmp_path: Path, run_dir: Path) -> None:
    policy = "ISTIO_VM_CAPTURE=outbound-fail-open\n"
    with run_lock(str(run_dir)):
        started(tmp_path, run_dir, policy + "ISTIO_INBOUND_PORTS=8080\n")
        with pytest.raises(ConfigError) as refused:
            reload.reload(changed(tmp_path, run_dir, policy + "ISTIO_INBOUND_PORTS=8080,8081\n"),
                          install_iptables=install)
        assert str(refused.value) == (
            f"{tmp_path}/cluster.env:1: ISTIO_VM_CAPTURE='outbound-fail-open': the capture rules cannot change "
            "while istio-sidecar runs under this policy (its helper switches the rules it started with): "
            "systemctl restart istio-sidecar")
        # The same rules (another setting changed): the helper's plan still holds, and the rules are not
        # installed again (which parts are on follows the proxy); the request goes to the supervisor.
        with pytest.raises(reload.ReloadError, match=r"^no answer from istio-vm start within 0\.1s \(see journalctl"), \
                _no_signal_to_self():
            reload.reload(changed(tmp_path, run_dir, policy + "ISTIO_INBOUND_PORTS=8080\nENVOY_DRAIN_TIME_S=3\n"),
                          install_iptables=install, timeout=0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="the run lock's directory must be root's")
def test_the_policy_itself_needs_a_restart(tmp_path: Path, run_dir: Path) -> None:
    with run_lock(str(run_dir)):
        started(tmp_path, run_dir, "")
        with pytest.raises(ConfigError, match="ISTIO_VM_CAPTURE='fail-open': cannot change while istio-sidecar"):
            reload.reload(changed(tmp_path, run_dir, "ISTIO_VM_CAPTURE=fail-open\n"), install_iptables=install)
