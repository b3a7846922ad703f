"""`istio-vm iptables install|clean|verify` end to end, as a process in a private network namespace."""

from __future__ import annotations

import ast
import json
import os
import pwd
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.netns import Netns
from tests import netns_iptables
from tests.helpers import DATA

REFERENCE = DATA / "reference-vm"
ISTIO_VM = str(Path(sys.executable).parent / "istio-vm")

pytestmark = pytest.mark.root


class Vm:
    def __init__(self, ns: Netns, workdir: Path) -> None:
        self.ns, self.workdir = ns, workdir
        self.cluster_env = workdir / "cluster.env"  # what --cluster-env names
        self.env = {"PATH": os.environ["PATH"], "PROXY_UID": "997", "ISTIO_VM_RUN_DIR": str(workdir / "run"),
                    "ENVOY_USER": "root", "EXEC_USER": "root"}

    def write(self, text: str) -> None:
        path = self.workdir / "cluster.env"
        path.write_text(text)
        path.chmod(0o644)

    def istio_vm(self, *args: str, check: int | None = 0) -> tuple[int, str, str]:
        import subprocess

        done = subprocess.run(["ip", "netns", "exec", self.ns.name, ISTIO_VM, "--sidecar-env", "/nonexistent",
                               "--cluster-env", str(self.cluster_env), *args],
                              env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check is not None:
            assert done.returncode == check, done.stderr
        return done.returncode, done.stdout, done.stderr

    def save(self) -> dict[str, str]:
        return netns_iptables.state(self.ns, "nft")


@pytest.fixture
def vm() -> Iterator[Vm]:
    with Netns.temporary("cli") as ns, tempfile.TemporaryDirectory(prefix="istio-vm-cli-") as workdir:
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        ns.ip("addr", "add", "10.98.0.2/24", "dev", "eth0")
        yield Vm(ns, Path(workdir))


def reference_env() -> str:
    return (REFERENCE / "cluster.env").read_text()


def test_install_verify_drift_clean(vm: Vm) -> None:
    vm.write(reference_env())
    before = vm.save()
    _, _, err = vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"))
    assert "PROXY_UID=997" in err  # 1.9's Variables: dump, logged
    assert "Wrote IPv4 input to iptables-restore" in err
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in err
    _, out, _ = vm.istio_vm("iptables", "verify", "--resolv-conf", str(REFERENCE / "resolv.conf"))
    assert out == ""
    vm.ns.run("iptables", "-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "8080",
              "-j", "ISTIO_IN_REDIRECT")
    _status, out, err = vm.istio_vm("iptables", "verify", "--resolv-conf", str(REFERENCE / "resolv.conf"), check=1)
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT" in out
    assert "drifted" in err
    vm.istio_vm("iptables", "clean")
    assert vm.save() == before


def test_install_and_clean_load_no_temporary_file_module_nor_socket(vm: Vm) -> None:
    # tempfile (with shutil, bz2, lzma, random) and socket cost ~5 ms of each command: the state file's
    # temporary is trust.create_temporary's, the interfaces' addresses are printed by libc's inet_ntop.
    # (verify's scratch namespace reads its rules from a tempfile.TemporaryDirectory.)
    vm.write(reference_env())
    files = ["--sidecar-env", "/nonexistent", "--cluster-env", str(vm.cluster_env)]
    resolv = ["--resolv-conf", str(REFERENCE / "resolv.conf")]
    for command, unused in ((["install", *resolv], {"tempfile", "shutil", "random", "socket"}),
                            (["verify", *resolv], {"socket"}), (["clean"], {"tempfile", "shutil", "random", "socket"})):
        probe = (f"import sys; from istio_vm.cli import main; status = main({[*files, 'iptables', *command]!r}); "
                 "print(sorted(sys.modules)); sys.exit(status)")
        done = subprocess.run([*vm.ns.exec_prefix(), sys.executable, "-c", probe], env=vm.env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        modules = set(ast.literal_eval(done.stdout.splitlines()[-1]))
        # The reference cluster.env's ISTIO_SVC_IP is derived from the interfaces (clean reads no config).
        assert ("ctypes" in modules) == (command[0] != "clean")
        assert not modules & unused, command


def test_clean_works_with_a_broken_env_file_and_is_idempotent(vm: Vm) -> None:
    vm.write(reference_env())
    before = vm.save()
    vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"))
    vm.write(reference_env() + "ENVOY_PORT=not-a-port\nISTIO_SERVICE=$(reboot)\nISTIO_IPTABLES_BACKEND=nftables\n")
    _, _, err = vm.istio_vm("iptables", "clean")
    assert "ignored for clean: " in err
    assert "ISTIO_IPTABLES_BACKEND='nftables'" in err
    assert "command substitution $(...) is never executed" in err
    assert vm.save() == before
    vm.istio_vm("iptables", "clean")  # nothing left: still succeeds
    assert vm.save() == before


@pytest.mark.parametrize("how", ["directory of another user", "directory others may write", "parent of another user",
                                 "link into a directory of another user", "sticky directory (accepted)"])
def test_an_env_file_in_a_directory_another_user_could_change_is_refused_and_nothing_changes(vm: Vm,
                                                                                             how: str) -> None:
    """Root checked the env file itself, not its directory: another user who may write the directory can swap
    in a file of their choice (e.g. a link to a root-owned file, which passes the file's own checks)."""
    vm.write(reference_env())
    vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"))
    installed = vm.save()
    other = pwd.getpwnam("istio-proxy").pw_uid
    parent = vm.workdir / "etc-istio"
    config = parent / "config"
    config.mkdir(parents=True)
    parent.chmod(0o755)
    config.chmod(0o755)
    env = config / "cluster.env"
    env.write_text(reference_env() + "ISTIO_INBOUND_PORTS='8080,9999'\n")  # rules of its own
    env.chmod(0o644)
    vm.cluster_env = env
    untrusted = config
    if how in ("directory of another user", "link into a directory of another user"):
        os.chown(config, other, other)
    elif how == "directory others may write":
        config.chmod(0o777)
    elif how == "parent of another user":
        os.chown(parent, other, other)
        untrusted = parent
    else:
        config.chmod(0o1777)  # as /tmp: nobody else may rename or delete root's file there
    if how.startswith("link"):
        vm.cluster_env = vm.workdir / "cluster.env"
        vm.cluster_env.unlink()
        vm.cluster_env.symlink_to(env)  # the link is in root's directory; its target is not
    if how.startswith("sticky"):
        vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"))
        assert vm.save() != installed  # the file's rules went in
        return
    _, _, err = vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"), check=78)
    reason = "writable by others" if how == "directory others may write" else f"owned by uid {other}"
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"istio-vm: config error: {vm.cluster_env}: {untrusted} is {reason}: another user could put a "
                      "file of their choice here, and it configures a root process; make every directory on its way "
                      "root's, not writable by group or others"]
    assert vm.save() == installed  # untouched


def test_bad_value_never_reaches_iptables(vm: Vm) -> None:
    vm.write(reference_env())
    vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"))
    installed = vm.save()
    vm.write(reference_env() + "ISTIO_INBOUND_INTERCEPTION_MODE=TPROXI\n")
    _, _, err = vm.istio_vm("iptables", "install", check=78)
    assert "ISTIO_INBOUND_INTERCEPTION_MODE='TPROXI': must be REDIRECT or TPROXY" in err
    assert vm.save() == installed  # untouched
    _, _, err = vm.istio_vm("start", "init", check=78)
    assert vm.save() == installed


def test_custom_ip_tables_makes_install_and_clean_no_ops(vm: Vm) -> None:
    vm.write(reference_env() + "ISTIO_CUSTOM_IP_TABLES=true\n")
    before = vm.save()
    _, _, err = vm.istio_vm("iptables", "install")
    assert "ISTIO_CUSTOM_IP_TABLES=true: iptables are left alone" in err
    assert vm.save() == before
    _, _, err = vm.istio_vm("iptables", "clean")
    assert "ISTIO_CUSTOM_IP_TABLES=true: iptables are left alone" in err


def test_dry_run_changes_nothing(vm: Vm) -> None:
    vm.write(reference_env() + "DRY_RUN=true\n")
    before = vm.save()
    _, _, err = vm.istio_vm("iptables", "install", "--resolv-conf", str(REFERENCE / "resolv.conf"))
    assert "dry run: nothing changed" in err
    assert "Would write IPv4 input" in err
    assert vm.save() == before


def test_istio_start_init_with_1_9_flags(vm: Vm) -> None:
    vm.write("")
    vm.istio_vm("start", "-p", "15001", "-z", "15006", "-u", "997", "-m", "REDIRECT", "-i", "*", "-b", "*",
                "-d", "15090,15021")
    save = vm.ns.run("iptables-save").stdout
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in save
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN" in save
    assert "-A ISTIO_OUTPUT -m owner --uid-owner 997 -j RETURN" in save
    vm.istio_vm("start", "clean")
    assert "ISTIO" not in vm.ns.run("iptables-save").stdout


def test_verify_reads_both_backends_and_install_repairs_while_ours_stay_atomic(vm: Vm) -> None:
    """1.9's rules left in legacy while ours are in nft: double capture. verify says so (exit 1), install repairs."""
    resolv = ("--resolv-conf", str(REFERENCE / "resolv.conf"))
    vm.write(reference_env() + "ISTIO_IPTABLES_BACKEND=nft\n")
    vm.istio_vm("iptables", "install", *resolv)
    netns_iptables.restore(vm.ns, "legacy", 4, (REFERENCE / "expected-v4.restore").read_text())  # 1.9's
    status, out, err = vm.istio_vm("iptables", "verify", *resolv, check=1)
    assert status == 1
    assert "+++ IPv4 Istio rules in the legacy backend, which istio-vm does not use (nft is): they capture " \
           "traffic too" in out
    assert "+-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in out
    legacy_lines = sum(1 for line in out.splitlines() if line.startswith("+") and not line.startswith("+++"))
    assert f"0 planned lines missing, 0 unexpected, {legacy_lines} Istio lines in the legacy backend" in err
    _, as_json, _ = vm.istio_vm("iptables", "verify", "--json", *resolv, check=1)
    report = json.loads(as_json)
    assert report["counts"] == {"missing": 0, "unexpected": 0, "other_backend": legacy_lines}
    assert report["other_backend"]["backend"] == "legacy"
    # The repair: install (atomic for ours), which removes the Istio rules from the other backend too.
    _, _, err = vm.istio_vm("iptables", "install", *resolv)
    assert "Removing the Istio rules found in the legacy backend (IPv4): nft is in use" in err
    vm.istio_vm("iptables", "verify", *resolv)
    assert "ISTIO" not in netns_iptables.save(vm.ns, "legacy", 4)
