"""istio-vm's Debian package in a real systemd: Debian 12 and Debian 13 containers (testbed/systemd_container.py)
with the package's dependencies from Debian in their roots, --private-network, no PyPI.

Per suite, one booted container goes through a VM's life: `apt install ./istio-vm_OLD.deb`, configure, start
(the pilot-agent double), `apt install ./istio-vm_NEW.deb` (the version bumped in a copy of the tree),
`apt remove`, `apt purge`, comparing file lists, users and `iptables-save` before and after each step.
A second container is made to look like a VM set up by Istio 1.9's guide and migrates. See docs/packaging.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from testbed import systemd_container as sc
from testbed.wait import wait_for
from tests.helpers import DATA, EXAMPLES
from tests.system.container_vm import (
    CLUSTER_ENV,
    ENVOY_DIR,
    RECORD,
    SUPPORT,
    UNIT,
    Vm,
    agent_mode,
    assert_rules_are_the_plan,
    install_double,
    start,
    why_no_container,
)
from tests.system.package_vm import (
    BIN,
    apt,
    build_deb,
    current_version,
    files,
    install,
    journal_lines,
    unit_state,
)

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.root,
    pytest.mark.skipif(bool(why_no_container()), reason=why_no_container() or "-"),
]

SIDECAR_ENV = ENVOY_DIR / "sidecar.env"
DOCS = ("operations.md", "systemd.md", "configuration.md")
PYTHON = "/usr/bin/python3"  # Debian's: the double runs with it (no venv on a packaged VM)
LEGACY_UID = 1234  # istio-proxy as 1.9's postinst made it (adduser --system): not what sysusers would pick
DRAIN = 2.0  # the double's drain on SIGTERM (pilot-agent 1.9's default terminationDrainDuration: 5 s)


@pytest.fixture(scope="module")
def debs() -> tuple[Path, Path]:
    """This tree's package, and the same with the version bumped: the upgrade."""
    version = current_version()
    return build_deb(), build_deb(f"{version}+1")


@pytest.fixture(params=sc.SUITES)
def packaged_vm(request: pytest.FixtureRequest) -> Iterator[Vm]:
    rootfs = sc.ensure_rootfs(suite=request.param, extra_packages=sc.DEB_DEPENDENCIES)
    with sc.booted_container(rootfs, name=f"pkg-{request.param}") as container:
        yield Vm(container, istio_vm_path=BIN)


def sha256(vm: Vm, path: PurePosixPath) -> str:
    return hashlib.sha256(vm.c.path(path).read_bytes()).hexdigest()


def env_files(vm: Vm) -> dict[str, tuple[str, int, int, int]]:
    """The operator's env files: content hash, owner, group and mode."""
    found = {}
    for path in (SIDECAR_ENV, CLUSTER_ENV):
        st = os.lstat(vm.c.path(path))
        found[str(path)] = (sha256(vm, path), st.st_uid, st.st_gid, st.st_mode)
    return found


def starts(vm: Vm) -> list[str]:
    """istio-vm's "istio-vm VERSION starting" lines in the unit's journal, in order."""
    return [e["MESSAGE"] for e in journal_lines(vm, "--unit", UNIT) if re.match(r"istio-vm \S+ starting", e["MESSAGE"])]


def no_duplicate_rules(vm: Vm) -> None:
    for family, dump in vm.rules().items():
        rules = [line for line in dump.splitlines() if line.startswith("-A ")]
        assert len(rules) == len(set(rules)), f"{family}: a rule twice:\n{dump}"


def test_lintian_has_no_error_and_docs_explain_each_warning(debs: tuple[Path, Path]) -> None:
    report = (debs[0].parent / "lintian.txt").read_text()
    tags = re.findall(r"^([EW]): istio-vm: (\S+)", report, re.MULTILINE)
    assert [tag for level, tag in tags if level == "E"] == [], report
    explained = (sc.PROJECT_DIR / "docs" / "packaging.md").read_text()
    assert [tag for level, tag in tags if level == "W" and f"`{tag}`" not in explained] == [], report


def test_the_package_has_the_version_debian_dependencies_only_and_the_user_before_its_directories(
        debs: tuple[Path, Path]) -> None:
    old, new = debs

    def field(deb: Path, name: str) -> str:
        return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert (field(old, "Version"), field(new, "Version")) == (current_version(), f"{current_version()}+1")
    assert subprocess.run(["dpkg", "--compare-versions", field(new, "Version"), "gt", field(old, "Version")],
                          check=False).returncode == 0
    depends = {alternative.split()[0] for alternative in re.split(r"[,|]", field(old, "Depends"))}
    assert depends == {"python3", "python3:any", "python3-psutil", "python3-dotenv", "python3-systemd", "iptables",
                       "iproute2", "systemd", "systemd-standalone-sysusers", "systemd-sysusers"}
    changelog = subprocess.run(f"dpkg-deb --fsys-tarfile {old} | tar -xOf - ./usr/share/doc/istio-vm/changelog.gz"
                               " | gzip -dc", shell=True, capture_output=True, text=True, check=True).stdout
    assert changelog.startswith(f"istio-vm ({current_version()}) ")
    postinst = subprocess.run(["dpkg-deb", "--info", str(old), "postinst"], capture_output=True, text=True,
                              check=True).stdout
    assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles") < postinst.index("copy_example ")


def test_install_start_upgrade_remove_purge(packaged_vm: Vm, debs: tuple[Path, Path]) -> None:
    vm, (old, new) = packaged_vm, debs
    old_version, new_version = current_version(), f"{current_version()}+1"
    pristine_files, pristine_rules = files(vm.c), vm.rules()
    pristine_passwd = vm.c.path("/etc/passwd").read_text()

    # ---- install: no venv, no pip; the user, its directories, the units enabled, the examples; not started
    # while cluster.env is missing.
    output = install(vm, old)
    assert f"configure {CLUSTER_ENV}" in output
    assert vm.c.run([BIN, "--version"]).stdout.strip() == f"istio-vm {old_version}"
    assert unit_state(vm, UNIT)["UnitFileState"] == "enabled"
    assert unit_state(vm, UNIT)["ActiveState"] == "inactive"
    assert vm.c.path(f"/lib/systemd/system/{UNIT}").is_file() or vm.c.path(f"/usr/lib/systemd/system/{UNIT}").is_file()
    assert vm.c.path(SIDECAR_ENV).read_text() == vm.c.path("/usr/share/istio-vm/sidecar.env").read_text()
    for doc in DOCS:  # where Documentation= points, uncompressed
        assert f"file:///usr/share/doc/istio-vm/{doc}" in vm.show("Documentation")["Documentation"]
        assert vm.c.path(f"/usr/share/doc/istio-vm/{doc}").read_text().startswith("#")
    uid, gid = vm.proxy_user()
    owners = vm.c.run(["stat", "-c", "%U:%G %a", "/var/lib/istio/proxy", "/var/lib/istio/envoy"]).stdout
    assert owners.splitlines() == ["istio-proxy:istio-proxy 755", "root:root 755"]
    assert not vm.c.path("/opt/istio-vm").exists()
    assert "pip" not in vm.c.run(["dpkg", "-l"]).stdout.split()

    # ---- configure, start: active after READY, the rules are the plan, the proxy runs as istio-proxy
    agent_mode(vm, python=PYTHON, DOUBLE_DRAIN=str(DRAIN))
    vm.write(SIDECAR_ENV, vm.c.path(SIDECAR_ENV).read_text() + "# the operator's edit\n")
    child = start(vm)
    assert vm.uid_of(child) == uid
    assert_rules_are_the_plan(vm)
    assert starts(vm) == [f"istio-vm {old_version} starting (mode default)"]
    operator_files = env_files(vm)
    before_upgrade = unit_state(vm, UNIT)

    # ---- upgrade: restarted once (drain, then start), the env files untouched, no rule twice
    output = install(vm, new)
    assert f"Unpacking istio-vm ({new_version}) over ({old_version})" in output
    assert vm.c.run([BIN, "--version"]).stdout.strip() == f"istio-vm {new_version}"
    after_upgrade = unit_state(vm, UNIT)
    assert after_upgrade["ActiveState"] == "active"
    assert after_upgrade["InvocationID"] != before_upgrade["InvocationID"]
    assert starts(vm) == [f"istio-vm {old_version} starting (mode default)",
                          f"istio-vm {new_version} starting (mode default)"]
    assert env_files(vm) == operator_files
    assert_rules_are_the_plan(vm)
    no_duplicate_rules(vm)
    new_child = _last_ready_pid(vm)
    assert new_child != child
    assert vm.uid_of(new_child) == uid
    _report_upgrade_window(vm)

    # ---- remove: stopped, the capture removed, the env files kept
    apt(vm, "remove", "istio-vm")
    assert unit_state(vm, UNIT)["ActiveState"] == "inactive"
    assert vm.proxy_processes() == []
    assert vm.rules() == pristine_rules
    assert env_files(vm) == operator_files
    assert not vm.c.path(BIN).exists()

    # ---- purge: our files gone, the istio-proxy user kept
    apt(vm, "purge", "istio-vm")
    left = files(vm.c)
    test_made = {str(p).lstrip("/") for p in (CLUSTER_ENV, SIDECAR_ENV, RECORD, "/usr/local/bin/pilot-agent",
                                               SUPPORT, SUPPORT / "pilot_agent.py")}
    test_made |= {"var/lib/istio", "var/lib/istio/envoy", "var/log/istio", "usr/local/lib",
                  f"var/tmp/{old.name}", f"var/tmp/{new.name}"}
    added = set(left) - set(pristine_files)
    assert added - test_made == set(), "left behind by the package"
    assert set(pristine_files) - set(left) == set(), "removed by the package"
    changed = {p for p in set(left) & set(pristine_files) if left[p] != pristine_files[p]} - test_made
    assert changed == set(), "changed by the package"
    assert vm.proxy_user() == (uid, gid)
    passwd = vm.c.path("/etc/passwd").read_text().splitlines()
    assert [line for line in passwd if line not in pristine_passwd.splitlines()] == [
        line for line in passwd if line.startswith("istio-proxy:")]
    assert vm.c.run(["test", "!", "-e", "/run/istio-vm"], check=False).returncode == 0
    assert vm.rules() == pristine_rules
    assert vm.c.run(["dpkg-query", "-W", "istio-vm"], check=False).returncode != 0


def _last_ready_pid(vm: Vm) -> int:
    ready = [e for e in vm.journal() if e.get("ISTIO_EVENT") == "ready"]
    return int(ready[-1]["ISTIO_CHILD_PID"])


def _report_upgrade_window(vm: Vm) -> None:
    """How long the upgrade affects traffic: from the old proxy's drain to the new proxy's READY."""
    entries = vm.journal()
    drain = next(e for e in entries if e.get("ISTIO_EVENT") == "drain")
    ready = [e for e in entries if e.get("ISTIO_EVENT") == "ready"][-1]
    window = (int(ready["__REALTIME_TIMESTAMP"]) - int(drain["__REALTIME_TIMESTAMP"])) / 1e6
    print(f"\nupgrade: traffic affected {window:.2f}s (drain {DRAIN:.1f}s + {window - DRAIN:.2f}s stop and start)")
    assert DRAIN <= window < DRAIN + 20


# ---- migration from Istio 1.9's istio-sidecar package --------------------------------------------------------

ISTIO_1_9 = DATA / "istio-1.9"
DNS_LINES = [line for line in (DATA / "reference-vm" / "expected-v4.restore").read_text().splitlines()
             if line.startswith("-A OUTPUT -p udp --dport 53")]  # what 1.9's clean never removed: piled up


def make_istio_1_9_vm(vm: Vm) -> None:
    """A VM as Istio 1.9's package and guide left it: istio-proxy (uid LEGACY_UID) made by adduser, istio.service
    enabled and running istio-start.sh with pilot-agent (the double), every file under /var/lib/istio chowned to
    istio-proxy, and 1.9's rules piled up by its restarts, in the nft and the legacy backend."""
    c = vm.c
    c.run(["groupadd", "--system", "--gid", str(LEGACY_UID), "istio-proxy"])
    c.run(["useradd", "--system", "--uid", str(LEGACY_UID), "--gid", str(LEGACY_UID), "--home-dir", "/var/lib/istio",
           "--no-create-home", "--shell", "/usr/sbin/nologin", "istio-proxy"])
    for directory in ("/var/lib/istio/envoy", "/var/lib/istio/proxy", "/var/lib/istio/config", "/var/log/istio",
                      "/etc/certs"):
        c.run(["install", "-d", "-o", "istio-proxy", "-g", "istio-proxy", directory])
    c.run(["ln", "-s", "/var/lib/istio", "/etc/istio"])
    vm.write(PurePosixPath("/usr/local/bin/istio-start.sh"), (ISTIO_1_9 / "istio-start.sh").read_text(), mode=0o755)
    vm.write(PurePosixPath("/usr/lib/systemd/system/istio.service"), (ISTIO_1_9 / "istio.service").read_text())
    c.run(["ln", "-s", "/lib/systemd/system/istio.service",
           "/etc/systemd/system/multi-user.target.wants/istio.service"])
    vm.write(SIDECAR_ENV, (EXAMPLES / "sidecar.env").read_text())
    double = f"DOUBLE_RECORD={RECORD}\nISTIO_VM_BACKOFF_INITIAL=0.2s\n"
    vm.write(CLUSTER_ENV, (EXAMPLES / "cluster.env").read_text() + double)
    install_double(vm, PYTHON)
    c.run(["chown", "-R", "istio-proxy:istio-proxy", "/var/lib/istio"])  # the 1.9 guide's step
    restore = (DATA / "reference-vm" / "expected-v4.restore").read_text().replace("997", str(LEGACY_UID))
    piled = restore.replace("COMMIT", "\n".join(DNS_LINES * 2).replace("997", str(LEGACY_UID)) + "\nCOMMIT")
    for backend in ("nft", "legacy"):
        c.run([f"iptables-{backend}-restore"], input=piled)
    c.systemctl("daemon-reload")
    c.systemctl("start", "istio.service")
    vm.c.wait_for_journal(lambda e: e.get("MESSAGE", "").startswith("Started istio.service"), timeout=30)


def istio_1_9_rules(dump: str) -> list[str]:
    """The lines of a save dump that Istio 1.9 wrote (its chains, the jumps to them, its DNS rules)."""
    return [line for line in dump.splitlines()
            if "ISTIO_" in line or "15053" in line or re.search(rf"--(uid|gid)-owner {LEGACY_UID}", line)]


def test_migration_from_istio_1_9(packaged_vm: Vm, debs: tuple[Path, Path]) -> None:
    vm, (deb, _) = packaged_vm, debs
    make_istio_1_9_vm(vm)
    assert unit_state(vm, "istio.service")["ActiveState"] == "active"
    assert len(istio_1_9_rules(vm.c.run(["iptables-legacy-save"]).stdout)) > len(DNS_LINES) * 3

    output = install(vm, deb)
    assert "istio.service (Istio 1.9) stopped and masked" in output
    for path in (SIDECAR_ENV, CLUSTER_ENV):  # one line per file, saying why
        assert output.count(f"istio-vm: {path} was istio-proxy:istio-proxy mode 644, now root:root mode 644") == 1
        assert vm.c.run(["stat", "-c", "%U:%G %a", str(path)]).stdout.split() == ["root:root", "644"]
    assert vm.proxy_user() == (LEGACY_UID, LEGACY_UID)
    assert unit_state(vm, "istio.service")["UnitFileState"] == "masked"
    assert unit_state(vm, "istio.service")["ActiveState"] in ("inactive", "failed")
    assert unit_state(vm, UNIT)["ActiveState"] == "active"
    child = _last_ready_pid(vm)
    assert vm.uid_of(child) == LEGACY_UID
    # No 1.9 rule left in either backend: nft holds exactly istio-vm's plan, legacy nothing of Istio.
    assert_rules_are_the_plan(vm)
    no_duplicate_rules(vm)
    assert istio_1_9_rules(vm.c.run(["iptables-legacy-save"]).stdout) == []
    assert "Conflicts=istio.service" in vm.c.systemctl("cat", UNIT).stdout

    # A reboot brings up istio-sidecar alone.
    vm.c.reboot()
    assert unit_state(vm, UNIT)["ActiveState"] == "active"
    assert unit_state(vm, "istio.service")["ActiveState"] == "inactive"
    assert not any("istio-start.sh" in line for line in vm.c.run(["ps", "-eo", "args="]).stdout.splitlines())
    assert_rules_are_the_plan(vm)

    # Rollback: `apt remove istio-vm` unmasks istio.service, which starts again.
    output = apt(vm, "remove", "istio-vm")
    assert "istio.service (Istio 1.9) unmasked" in output
    assert unit_state(vm, UNIT)["ActiveState"] == "inactive"
    assert unit_state(vm, "istio.service")["UnitFileState"] == "enabled"
    started = len(vm.records("start"))
    vm.c.systemctl("start", "istio.service")
    assert unit_state(vm, "istio.service")["ActiveState"] == "active"
    wait_for(lambda: len(vm.records("start")) > started, timeout=30, what="1.9's pilot-agent (the double) started")
    assert vm.records("start")[-1]["uid"] == LEGACY_UID
