"""Misspelt setting names: a warning with file:line and the setting meant, none for real 1.9 cluster.env files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_vm import cli
from istio_vm.config.spelling import KNOWN, misspellings, suggestion
from tests.helpers import DATA

NEAR_MISSES = [
    ("ISTIO_INBOUND_PORT", "ISTIO_INBOUND_PORTS"),  # the issue's: no inbound capture, silently
    ("istio_inbound_ports", "ISTIO_INBOUND_PORTS"),  # wrong case
    ("Istio_Custom_Ip_Tables", "ISTIO_CUSTOM_IP_TABLES"),
    ("ISTIO_SERVICE_CIRD", "ISTIO_SERVICE_CIDR"),  # two letters swapped
    ("ENVOY_PROT", "ENVOY_PORT"),
    ("ISTIO_LOCAL_EXCLUDE_PORT", "ISTIO_LOCAL_EXCLUDE_PORTS"),
    ("ISTIO_SERVICE_EXCLUDE_CIDRS", "ISTIO_SERVICE_EXCLUDE_CIDR"),
    ("ISTIO_OUTBOUND_PORT", "ISTIO_OUTBOUND_PORTS"),
    ("ISTIO_INBOUND_INTERCEPTION_MOD", "ISTIO_INBOUND_INTERCEPTION_MODE"),
    ("ISTIO_VM_MAX_RESTART", "ISTIO_VM_MAX_RESTARTS"),
    ("ISTIO_LOG_TARGTE", "ISTIO_LOG_TARGET"),
    ("TERMINATION_DRAIN_DURATON", "TERMINATION_DRAIN_DURATION"),
    ("ISTIO_META_DNS_CAPTUER", "ISTIO_META_DNS_CAPTURE"),  # in pilot-agent's family, but one swap from ours
    ("EXEC_USR", "EXEC_USER"),
    ("ISTIO_AGENT_FLAG", "ISTIO_AGENT_FLAGS"),
    ("ISTIO_INBOUND_EXCLUDE_PORTS", "ISTIO_LOCAL_EXCLUDE_PORTS"),  # the name 1.9's own sidecar.env comment used
]


@pytest.mark.parametrize(("name", "meant"), NEAR_MISSES, ids=[n for n, _ in NEAR_MISSES])
def test_near_miss_is_named_with_the_setting_meant(name: str, meant: str) -> None:
    assert meant in KNOWN
    assert suggestion(name) == meant
    [warning] = misspellings({name: "/etc/c.env:7"})
    assert warning == (f"/etc/c.env:7: {name} is not a setting of istio-vm (it is only passed on to pilot-agent): "
                       f"did you mean {meant}?")


@pytest.mark.parametrize("name", ["ISTIO_META_CLUSTER_ID", "ISTIO_META_NETWORK", "ISTIO_METAJSON_LABELS",
                                  "PILOT_CERT_PROVIDER", "SERVICE_ACCOUNT", "DOUBLE_RECORD", "ISTIO_SVC_IP",
                                  "TERMINATION_DRAIN_DURATION_SECONDS", "ISTIO_META_PORT", "XDS_ROOT_CA"])
def test_settings_and_pilot_agent_variables_and_far_names_pass(name: str) -> None:
    assert suggestion(name) is None


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ISTIO", "ENVOY", "PROXY", "EXEC", "TERMINATION")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PROXY_UID", "997")
    monkeypatch.setenv("EXEC_USER", "root")


@pytest.mark.parametrize("cluster_env", [DATA / "reference-vm" / "cluster.env",
                                         DATA / "istioctl-1.9-labels" / "cluster.env"], ids=["reference-vm", "labels"])
def test_no_warning_for_real_istioctl_cluster_env(cluster_env: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    status = cli.main(["--sidecar-env", "/nonexistent", "--cluster-env", str(cluster_env), "config", "--check",
                       "--resolv-conf", str(DATA / "reference-vm" / "resolv.conf")])
    out, err = capsys.readouterr()
    assert (status, out) == (0, "")
    assert "did you mean" not in err


def test_check_warns_with_file_and_line_and_still_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    cluster = tmp_path / "cluster.env"
    cluster.write_text("ISTIO_SERVICE=x\nISTIO_INBOUND_PORT=8080\n")
    cluster.chmod(0o644)
    status = cli.main(["--sidecar-env", "/nonexistent", "--cluster-env", str(cluster), "config", "--check"])
    out, err = capsys.readouterr()
    assert (status, out) == (0, "")
    assert (f"istio-vm: warning: {cluster}:2: ISTIO_INBOUND_PORT is not a setting of istio-vm (it is only passed "
            "on to pilot-agent): did you mean ISTIO_INBOUND_PORTS?") in err.splitlines()


def test_check_is_quiet_on_success_and_78_with_one_line_per_problem(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    cluster = tmp_path / "cluster.env"
    cluster.write_text("ISTIO_SERVICE=x\n")
    cluster.chmod(0o644)
    argv = ["--sidecar-env", "/nonexistent", "--cluster-env", str(cluster), "config", "--check"]
    assert cli.main(argv) == 0
    assert capsys.readouterr() == ("", "")
    cluster.write_text("ENVOY_PORT=15001x\nISTIO_INBOUND_PORTS=80,eighty\n")
    assert cli.main(argv) == 78
    out, err = capsys.readouterr()
    assert out == ""
    first, second = err.splitlines()
    assert first.startswith(f"istio-vm: config error: {cluster}:1: ENVOY_PORT='15001x': not a port")
    assert second.startswith(f"istio-vm: config error: {cluster}:2: ISTIO_INBOUND_PORTS='80,eighty': ")
