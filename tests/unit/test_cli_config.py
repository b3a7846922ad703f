"""`istio-vm config` end to end: the reference dump, JSON, and bad input (exit 78, one line each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from istio_vm import cli
from istio_vm.errors import ExitStatus
from tests.helpers import DATA

REFERENCE = DATA / "reference-vm"


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean process environment with the users the config needs."""
    for name in list(os.environ):
        if name.startswith(("ISTIO", "ENVOY", "PROXY", "INBOUND", "REDIRECT", "ENABLE", "EXEC", "POD_",
                            "PILOT", "CA_ADDR", "PROV_", "OUTPUT_", "KUBE", "DRY_RUN", "TERMINATION")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PROXY_UID", "997")
    monkeypatch.setenv("EXEC_USER", "root")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.usefixtures("environ")
def test_reference_vm_config_prints_istio_dumps_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--sidecar-env", "/nonexistent", "--cluster-env", str(REFERENCE / "cluster.env"),
                          "config", "--resolv-conf", str(REFERENCE / "resolv.conf")], capsys)
    assert status == ExitStatus.OK
    expected = (REFERENCE / "expected-dump.txt").read_text()
    assert out.startswith(expected + "\nSupervisor:\n")


@pytest.mark.usefixtures("environ")
def test_config_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--sidecar-env", "/nonexistent", "--cluster-env", str(REFERENCE / "cluster.env"),
                          "config", "--json", "--resolv-conf", str(REFERENCE / "resolv.conf")], capsys)
    assert status == ExitStatus.OK
    data = json.loads(out)
    assert data["ISTIO_INBOUND_PORTS"] == {"value": "8080", "source": f"{REFERENCE}/cluster.env:2"}
    assert data["DNS_SERVERS"] == {"value": "[10.10.10.6],[]", "source": f"{REFERENCE}/resolv.conf:1"}
    assert data["PROXY_UID"] == {"value": "997", "source": "environment"}


# (file content, variable, value) -> each must give exit 78 and one line naming file:line, variable, value
BAD = [
    ("ENVOY_PORT=0", "ENVOY_PORT", "0"),
    ("ENVOY_PORT=http", "ENVOY_PORT", "http"),
    ("INBOUND_CAPTURE_PORT=70000", "INBOUND_CAPTURE_PORT", "70000"),
    ("INBOUND_TUNNEL_PORT=-1", "INBOUND_TUNNEL_PORT", "-1"),
    ("ISTIO_INBOUND_PORTS=80,http", "ISTIO_INBOUND_PORTS", "80,http"),
    ("ISTIO_INBOUND_PORTS='80, 90'", "ISTIO_INBOUND_PORTS", "80, 90"),
    ("ISTIO_INBOUND_PORTS=8080,*", "ISTIO_INBOUND_PORTS", "8080,*"),
    ("ISTIO_LOCAL_EXCLUDE_PORTS=*", "ISTIO_LOCAL_EXCLUDE_PORTS", "*"),
    ("ISTIO_OUTBOUND_PORTS=0", "ISTIO_OUTBOUND_PORTS", "0"),
    ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE=22:25", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "22:25"),
    ("ISTIO_SERVICE_CIDR=10.0.0.1", "ISTIO_SERVICE_CIDR", "10.0.0.1"),
    ("ISTIO_SERVICE_CIDR=10.0.0.0/33", "ISTIO_SERVICE_CIDR", "10.0.0.0/33"),
    ("ISTIO_SERVICE_CIDR=10.0.0.0/8,*", "ISTIO_SERVICE_CIDR", "10.0.0.0/8,*"),
    ("ISTIO_SERVICE_EXCLUDE_CIDR=*", "ISTIO_SERVICE_EXCLUDE_CIDR", "*"),
    ("ISTIO_SERVICE_EXCLUDE_CIDR=fd00::/129", "ISTIO_SERVICE_EXCLUDE_CIDR", "fd00::/129"),
    ("ISTIO_SERVICE_CIDR=10.0.0.0/255.0.0.0", "ISTIO_SERVICE_CIDR", "10.0.0.0/255.0.0.0"),
    ("ISTIO_SERVICE_CIDR=::ffff:10.0.0.0/104", "ISTIO_SERVICE_CIDR", "::ffff:10.0.0.0/104"),
    ("ISTIO_SERVICE_EXCLUDE_CIDR=fe80::1%eth0/64", "ISTIO_SERVICE_EXCLUDE_CIDR", "fe80::1%eth0/64"),
    ("ISTIO_INBOUND_INTERCEPTION_MODE=TPROXI", "ISTIO_INBOUND_INTERCEPTION_MODE", "TPROXI"),
    ("ISTIO_INBOUND_INTERCEPTION_MODE=tproxy", "ISTIO_INBOUND_INTERCEPTION_MODE", "tproxy"),
    ("ISTIO_INBOUND_TPROXY_MARK=0x1G", "ISTIO_INBOUND_TPROXY_MARK", "0x1G"),
    ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE=254", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "254"),
    ("ISTIO_META_DNS_CAPTURE=yes", "ISTIO_META_DNS_CAPTURE", "yes"),
    ("REDIRECT_DNS=enabled", "REDIRECT_DNS", "enabled"),
    ("ENABLE_INBOUND_IPV6=maybe", "ENABLE_INBOUND_IPV6", "maybe"),
    ("ISTIO_CUSTOM_IP_TABLES=True", "ISTIO_CUSTOM_IP_TABLES", "True"),
    ("PROXY_UID=istio-proxy", "PROXY_UID", "istio-proxy"),
    ("PROXY_GID=1,x", "PROXY_GID", "1,x"),
    ("EXEC_USER=no-such-user", "EXEC_USER", "no-such-user"),
    ("KUBE_VIRT_INTERFACES='eth0 eth1'", "KUBE_VIRT_INTERFACES", "eth0 eth1"),
    ("ISTIO_SVC_IP=10.0.0.300", "ISTIO_SVC_IP", "10.0.0.300"),
    ("ISTIO_PILOT_PORT=99999", "ISTIO_PILOT_PORT", "99999"),
    ("ISTIO_CP_AUTH=TLS", "ISTIO_CP_AUTH", "TLS"),
    ("ISTIO_VM_PROXY=docker", "ISTIO_VM_PROXY", "docker"),
    ("ISTIO_VM_CAPTURE=fail-safe", "ISTIO_VM_CAPTURE", "fail-safe"),
    ("ISTIO_VM_CAPTURE=FAIL-OPEN", "ISTIO_VM_CAPTURE", "FAIL-OPEN"),
    ("TERMINATION_DRAIN_DURATION='5 minutes'", "TERMINATION_DRAIN_DURATION", "5 minutes"),
    ("ISTIO_IPTABLES_BACKEND=nftables", "ISTIO_IPTABLES_BACKEND", "nftables"),
    ("ISTIO_BIN_BASE=usr/local/bin", "ISTIO_BIN_BASE", "usr/local/bin"),
    ("ISTIO_VM_PROXY=envoy", "ISTIO_VM_PROXY", "envoy"),  # without ENVOY_BOOTSTRAP
    ("ISTIO_SERVICE=$(hostname)", "ISTIO_SERVICE", "$(hostname)"),  # never executed
]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


@pytest.mark.usefixtures("environ")
@pytest.mark.parametrize(("line", "variable", "value"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_exits_78_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          line: str, variable: str, value: str) -> None:
    cluster = _write(tmp_path / "cluster.env", f"# a comment\n{line}\n")
    status, out, err = run(["--sidecar-env", "/nonexistent", "--cluster-env", cluster, "config"], capsys)
    assert status == 78
    assert int(ExitStatus.CONFIG) == 78
    assert out == ""
    [message] = [m for m in err.splitlines() if "config error" in m]
    assert message.startswith(f"istio-vm: config error: {cluster}:2: {variable}={value!r}: ")


@pytest.mark.usefixtures("environ")
def test_bad_value_in_environment(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVOY_PORT", "abc")
    status, _, err = run(["--sidecar-env", "/nonexistent", "--cluster-env", "/nonexistent", "config"], capsys)
    assert status == 78
    assert "istio-vm: config error: environment: ENVOY_PORT='abc': not a port (1-65535)" in err.splitlines()


@pytest.mark.usefixtures("environ")
def test_unknown_envoy_user_without_proxy_uid(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXY_UID")
    cluster = _write(tmp_path / "cluster.env", "ENVOY_USER=nobody-here\n")
    status, _, err = run(["--sidecar-env", "/nonexistent", "--cluster-env", cluster, "config"], capsys)
    assert status == 78
    assert f"{cluster}:1: ENVOY_USER='nobody-here': unknown user" in err


@pytest.mark.usefixtures("environ")
def test_all_errors_of_both_files_at_once_in_file_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sidecar = _write(tmp_path / "sidecar.env", "ENVOY_PORT=x\nA=`id`\n")
    cluster = _write(tmp_path / "cluster.env", "REDIRECT_DNS=maybe\nISTIO_INBOUND_PORTS=1,2,three\nif true\n")
    status, _, err = run(["--sidecar-env", sidecar, "--cluster-env", cluster, "config"], capsys)
    assert status == 78
    lines = [m for m in err.splitlines() if "config error" in m]
    assert [line.split(": ")[2] for line in lines] == [f"{sidecar}:1", f"{sidecar}:2", f"{cluster}:1",
                                                        f"{cluster}:2", f"{cluster}:3"]


@pytest.mark.usefixtures("environ")
def test_unreadable_env_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cluster.env").mkdir()  # exists, but cannot be read as a file (even by root)
    status, _, err = run(["--sidecar-env", "/nonexistent", "--cluster-env", str(tmp_path / "cluster.env"),
                          "config"], capsys)
    assert status == 78
    assert f"istio-vm: config error: {tmp_path}/cluster.env: not a regular file (a directory): not read" in err


@pytest.mark.usefixtures("environ")
@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check applies to root only")
def test_root_refuses_env_files_others_can_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writable = _write(tmp_path / "cluster.env", "ISTIO_SERVICE=x\n")
    os.chmod(writable, 0o664)
    foreign = _write(tmp_path / "sidecar.env", "ISTIO_SERVICE=y\n")
    os.chown(foreign, 65534, 65534)
    status, _, err = run(["--sidecar-env", foreign, "--cluster-env", writable, "config"], capsys)
    assert status == 78
    assert f"{foreign}: owned by uid 65534, not root" in err
    assert f"{writable}: mode -rw-rw-r-- lets others write it" in err


def test_help_of_every_command_and_python_m() -> None:
    for argv in (["--help"], ["config", "--help"]):
        result = subprocess.run([sys.executable, "-m", "istio_vm", *argv], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, result.stderr
        assert "usage: istio-vm" in result.stdout


def test_bad_command_line_exits_64_ex_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["config", "--no-such-flag"])
    assert caught.value.code == ExitStatus.USAGE == 64
    assert "unrecognized arguments" in capsys.readouterr().err
