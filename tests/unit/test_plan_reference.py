"""`istio-vm iptables plan` end to end (in-process): the reference VM byte for byte, and golden cases.

The golden files under tests/golden/plan/ were derived by hand from Istio 1.9.4's run()
(tools/istio-iptables/pkg/cmd/run.go) before the code was checked against them; `pytest --update-golden`
rewrites them (review the diff).
Every case runs on a fake host whose istio-proxy user has UID 997, as on the reference VM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from istio_vm import cli
from istio_vm.config import load
from istio_vm.config.host import Host, User
from tests.helpers import DATA, GOLDEN, check_golden, fake_host, iptables_args

REFERENCE = DATA / "reference-vm"
CASES = GOLDEN / "plan"
FORMATS = {  # case -> the output formats kept as golden files
    "istioctl-default": ("restore",),
    "tproxy": ("restore", "commands"),
    "tproxy-all": ("restore",),
    "ipv6": ("restore", "commands"),
    "kubevirt-ipv6": ("restore", "commands"),
    "kubevirt-cidr": ("restore",),
    "loopback-cidr": ("restore",),
    "empty": ("restore",),
}


@pytest.fixture
def vm(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake VM: the user lookup and addresses of the reference VM; env files go in the returned dir."""
    clean_env.setattr(load, "read_host", fake_host)
    shutil.copy(REFERENCE / "resolv.conf", tmp_path / "resolv.conf")
    return tmp_path


def test_reference_vm_restore_is_byte_for_byte(vm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(iptables_args(vm, REFERENCE / "cluster.env", "plan")) == 0
    expected = ("# iptables-restore (IPv4)\n" + (REFERENCE / "expected-v4.restore").read_text()
                + "# ip6tables-restore (IPv6)\n" + (REFERENCE / "expected-v6.restore").read_text())
    assert capsys.readouterr().out == expected


def test_reference_vm_with_proxy_uid_and_no_istio_proxy_user(
        vm: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setattr(load, "read_host", lambda users: Host(addresses=fake_host().addresses, euid=os.geteuid(),
                                                            users={"root": User("root", 0, 0, "/root")}))
    clean_env.setenv("PROXY_UID", "997")
    clean_env.setenv("EXEC_USER", "root")
    assert cli.main(iptables_args(vm, REFERENCE / "cluster.env", "plan", "--format", "restore")) == 0
    out = capsys.readouterr().out
    assert out == ("# iptables-restore (IPv4)\n" + (REFERENCE / "expected-v4.restore").read_text()
                   + "# ip6tables-restore (IPv6)\n")


@pytest.mark.parametrize(("case", "fmt"), [(case, fmt) for case, fmts in FORMATS.items() for fmt in fmts])
def test_golden_case(case: str, fmt: str, vm: Path, update_golden: bool,
                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(iptables_args(vm, CASES / f"{case}.env", "plan", "--format", fmt)) == 0
    check_golden(CASES / f"{case}.{fmt}", capsys.readouterr().out, update_golden)


def test_every_golden_file_belongs_to_a_case() -> None:
    files = {path.name for path in CASES.iterdir()}
    expected = {f"{case}.env" for case in FORMATS} | {f"{case}.{fmt}" for case, fmts in FORMATS.items()
                                                       for fmt in fmts}
    assert files == expected


def test_config_error_exits_78_and_prints_nothing(vm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = vm / "bad.env"
    bad.write_text("ISTIO_SERVICE_EXCLUDE_CIDR='*'\nENABLE_INBOUND_IPV6=false\n")
    assert cli.main(iptables_args(vm, bad, "plan")) == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "ISTIO_SERVICE_EXCLUDE_CIDR='*'" in captured.err


def test_plan_reads_the_nameservers_of_resolv_conf(vm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (vm / "resolv.conf").write_text("nameserver 10.0.0.2\nnameserver fd00::53\nnameserver 10.0.0.3\n")
    assert cli.main(iptables_args(vm, REFERENCE / "cluster.env", "plan", "--format", "commands")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "15053" in line] == [
        "iptables -t nat -A ISTIO_OUTPUT -p tcp --dport 53 -d 10.0.0.2/32 -j REDIRECT --to-ports 15053",
        "iptables -t nat -A ISTIO_OUTPUT -p tcp --dport 53 -d 10.0.0.3/32 -j REDIRECT --to-ports 15053",
        "iptables -t nat -A OUTPUT -p udp --dport 53 -d 10.0.0.2/32 -j REDIRECT --to-port 15053",
        "iptables -t nat -A OUTPUT -p udp --dport 53 -d 10.0.0.3/32 -j REDIRECT --to-port 15053",
    ]
