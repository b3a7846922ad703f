"""The systemd-nspawn harness: a booted Debian 12 container, a Type=notify unit, the journal, private
iptables, and teardown that leaves nothing behind (also when the test fails or its process is killed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed import systemd_container as sc
from testbed.wait import wait_for


def _why_no_container() -> str:
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if not shutil.which(tool)]
    return f"missing {', '.join(missing)} (scripts/setup installs them)" if missing else ""


needs_container = pytest.mark.skipif(bool(_why_no_container()), reason=_why_no_container() or "-")

NOTIFY_SCRIPT = r'''
import os, signal, socket, sys

def notify(message):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)

print("notify-test: waiting for go", flush=True)
notify("STATUS=waiting for go")
with open(sys.argv[1]) as fifo:  # blocks until the test opens the FIFO for writing
    word = fifo.read().strip()
print(f"<4>notify-test: got {word!r}", flush=True)
notify(f"READY=1\nSTATUS=serving after {word}")
print("notify-test: ready", flush=True)
signal.pause()
'''

NOTIFY_UNIT = """\
[Unit]
Description=istio-vm harness Type=notify test

[Service]
Type=notify
ExecStart=/usr/bin/python3 /usr/local/lib/notify-test.py /var/lib/notify-test/go
SyslogIdentifier=notify-test
TimeoutStartSec=60
"""


@pytest.fixture(scope="module")
def rootfs() -> Path:
    return sc.ensure_rootfs()


def host_firewall() -> dict[str, str]:
    """The host's rule sets, without iptables-save's time-stamped comments."""
    dumps = {}
    for tool in ("iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        if shutil.which(tool):
            out = subprocess.run([tool], capture_output=True, text=True, check=True).stdout
            dumps[tool] = "\n".join(line for line in out.splitlines() if not line.startswith("#"))
    if shutil.which("nft"):
        dumps["nft"] = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return dumps


def show(container: sc.Container, unit: str, *properties: str) -> dict[str, str]:
    args = [f"--property={p}" for p in properties]
    out = container.systemctl("show", *args, unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def open_for_writing(fifo: Path, timeout: float) -> int:
    """Open ``fifo`` for writing, which blocks until its reader opened it; give up after ``timeout``."""
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)), daemon=True)
    opener.start()
    opener.join(timeout)
    if not opened:
        unblock = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # be the reader, so the thread can end
        opener.join()
        os.close(opened[0])
        os.close(unblock)
        raise AssertionError(f"nobody opened {fifo} for reading within {timeout}s")
    return opened[0]


def assert_nothing_left(container: sc.Container) -> None:
    assert container.processes() == [], "processes of the container survived"
    assert not container.run_dir.exists(), "the throwaway copy was not removed"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(container.run_dir) not in mounts, "a mount of the container survived"
    for cgroup in container.cgroups:
        assert not cgroup.exists(), f"cgroup {cgroup} survived"
    assert not Path("/run/systemd/nspawn/propagate", container.machine).exists()
    assert not container.pid_namespace.holds(container.leader_pid)


@pytest.mark.systemd
@needs_container
def test_container_runs_notify_unit_with_journal_and_private_iptables(rootfs: Path) -> None:
    firewall_before = host_firewall()
    with sc.booted_container(rootfs, name="istio-vm-test") as container:
        assert container.systemctl("is-system-running", check=False).stdout.strip() in {"running", "degraded"}
        assert container.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
        assert container.run(["hostname"]).stdout.strip() == "istio-vm-test"
        assert container.run(["cat"], input="to stdin\n").stdout == "to stdin\n"  # input reaches the command
        assert container.run(["cat", "/etc/debian_version"]).stdout.startswith("12.")
        assert container.path("/etc/os-release").read_text() == container.run(["cat", "/etc/os-release"]).stdout
        with pytest.raises(ValueError, match="own mount"):
            container.path("/run/systemd/notify")  # /run is the container's tmpfs, not on the overlay
        assert container.live_path("/run/systemd/notify").is_socket()

        # A Type=notify unit: `systemctl start` returns only once the service sent READY=1.
        container.path("/usr/local/lib/notify-test.py").write_text(NOTIFY_SCRIPT)
        container.path("/etc/systemd/system/notify-test.service").write_text(NOTIFY_UNIT)
        container.path("/var/lib/notify-test").mkdir()
        os.mkfifo(container.path("/var/lib/notify-test/go"))
        container.systemctl("daemon-reload")
        with container.popen(
            ["systemctl", "start", "notify-test.service"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as start:
            try:
                writer = open_for_writing(container.path("/var/lib/notify-test/go"), timeout=60)
                # The service runs but has not sent READY=1: the start job is still waiting.
                assert start.poll() is None
                state = show(container, "notify-test.service", "ActiveState", "SubState", "StatusText")
                assert state == {"ActiveState": "activating", "SubState": "start", "StatusText": "waiting for go"}
                os.write(writer, b"go\n")
                os.close(writer)
                output, _ = start.communicate(timeout=60)
            finally:
                if start.poll() is None:
                    start.kill()
        assert start.returncode == 0, output
        state = show(container, "notify-test.service", "ActiveState", "SubState", "StatusText", "Type")
        assert state == {
            "ActiveState": "active", "SubState": "running", "StatusText": "serving after go", "Type": "notify"
        }  # fmt: skip

        # The unit's output reached the journal, with its fields.
        unit = ("--unit", "notify-test.service")
        ready = container.wait_for_journal(lambda e: e.get("MESSAGE") == "notify-test: ready", *unit)
        assert ready["_SYSTEMD_UNIT"] == "notify-test.service"
        assert ready["SYSLOG_IDENTIFIER"] == "notify-test"
        assert ready["_TRANSPORT"] == "stdout"
        assert ready["PRIORITY"] == "6"
        assert ready["_HOSTNAME"] == "istio-vm-test"
        got = container.wait_for_journal(lambda e: e.get("MESSAGE") == "notify-test: got 'go'", *unit)
        assert got["PRIORITY"] == "4"  # the <4> prefix became the priority
        started = container.wait_for_journal(lambda e: e.get("JOB_TYPE") == "start" and "JOB_RESULT" in e, *unit)
        assert started["JOB_RESULT"] == "done"
        assert started["_PID"] == "1"
        entries = container.journal(*unit)
        assert any(e.get("MESSAGE") == "notify-test: waiting for go" for e in entries)
        assert "notify-test: ready" in container.journalctl(*unit, "--output=cat").stdout

        container.systemctl("stop", "notify-test.service")
        assert container.systemctl("is-active", "notify-test.service", check=False).stdout.strip() == "inactive"

        # iptables inside work on the container's own network namespace, never on the host's.
        assert container.run(["ip", "-o", "link", "show"]).stdout.count("\n") == 1  # lo only
        container.run(["iptables", "-w", "-N", "ISTIO_VM_HARNESS"])
        container.run(["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80",
                       "-j", "REDIRECT", "--to-ports", "15001"])  # fmt: skip
        inside = container.run(["iptables-save"]).stdout
        assert ":ISTIO_VM_HARNESS - [0:0]" in inside
        assert "-A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 15001" in inside
        container.run(["ip6tables-save"])
        assert host_firewall() == firewall_before
    assert_nothing_left(container)
    assert host_firewall() == firewall_before


@pytest.mark.systemd
@needs_container
def test_teardown_when_the_body_raises(rootfs: Path) -> None:
    booted: list[sc.Container] = []

    def failing_test_body() -> None:
        with sc.booted_container(rootfs) as container:
            booted.append(container)
            container.run(["systemd-run", "--unit=background", "sleep", "infinity"])
            container.run(["sh", "-c", "sleep infinity </dev/null >/dev/null 2>&1 &"])  # outside any unit
            with pytest.raises(subprocess.TimeoutExpired):
                container.run(["sleep", "60"], timeout=0.5)
            # The timed-out command was killed and reaped (not left a zombie of the host's PID 1).
            assert "Z" not in container.run(["ps", "-e", "-o", "stat="]).stdout
            assert len(container.processes()) >= 6
            raise RuntimeError("test body failed")

    with pytest.raises(RuntimeError, match="test body failed"):
        failing_test_body()
    assert_nothing_left(booted[0])


KILLED_OWNER = """
import json, sys
from testbed import systemd_container as sc
with sc.booted_container(sc.ensure_rootfs(), name="killed-owner") as container:
    print(json.dumps({"leader": container.leader_pid, "run_dir": str(container.run_dir)}), flush=True)
    sys.stdin.read()  # until the test kills us
"""


@pytest.mark.systemd
@needs_container
def test_a_killed_test_process_leaves_nothing_behind(rootfs: Path) -> None:
    """SIGKILL gives no chance to clean up: nspawn's parent-death signal powers the container off, and
    the next booted_container() (here: sweep_stale_runs) removes the overlay, cgroups and files."""
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER],
        cwd=sc.PROJECT_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        assert owner.stdout is not None
        booted = json.loads(owner.stdout.readline())
        owner.kill()
        owner.wait(timeout=30)
    leader, run_dir = booted["leader"], Path(booted["run_dir"])
    nspawn = int((run_dir / "nspawn").read_text().split()[0])
    leader_pid, leader_start = (run_dir / "leader").read_text().split()
    assert int(leader_pid) == leader
    namespace = sc.PidNamespace(leader, leader_start)
    # nspawn got SIGTERM (PR_SET_PDEATHSIG) when its parent died, powered the container off and exited.
    assert sc._wait_gone({leader, nspawn}, timeout=30) == set()
    assert "Halting system." in (run_dir / "console.log").read_text()
    assert run_dir.exists()
    # This sweep removes it, unless another test run's booted_container() (e.g. another checkout's suite) swept first.
    assert run_dir in sc.sweep_stale_runs() or not run_dir.exists()
    assert not run_dir.exists()
    assert str(run_dir) not in Path("/proc/self/mountinfo").read_text()
    assert namespace.pids() == []


@pytest.mark.systemd
@needs_container
def test_install_project_as_host_built_wheels(rootfs: Path) -> None:
    with sc.booted_container(rootfs) as container:
        venv = sc.install_project(container)
        assert container.run([f"{venv}/bin/istio-vm", "--version"]).stdout.startswith("istio-vm ")
        # systemd-python, compiled on the host, works against the container's libsystemd and journald.
        code = "from systemd import daemon, journal; assert daemon.booted(); journal.send('wheel', ISTIO_VM_TEST='1')"
        container.run(["systemd-run", "--wait", "--quiet", "--unit=wheel-test", f"{venv}/bin/python", "-c", code])
        entry = container.wait_for_journal(lambda e: e.get("ISTIO_VM_TEST") == "1", "--unit", "wheel-test.service")
        assert entry["MESSAGE"] == "wheel"
        assert entry["_SYSTEMD_UNIT"] == "wheel-test.service"
        assert entry["CODE_FILE"] == "<string>"


@contextmanager
def in_new_pid_namespace() -> Iterator[int]:
    """A `sleep` as PID 1 of a new PID namespace, for the block: its host PID; killed and reaped after."""
    own = sc._pidns_of(os.getpid())
    with subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "infinity"],
                          stderr=subprocess.DEVNULL) as unshare:  # fmt: skip
        try:
            child = wait_for(lambda: next((c for c in sc._children(unshare.pid) if sc._pidns_of(c) != own), 0),
                             timeout=10, what="unshare's child in its new PID namespace")  # fmt: skip
        except BaseException:
            unshare.kill()  # --kill-child: its child gets SIGKILL too
            raise
        try:
            yield child
        finally:
            os.kill(child, signal.SIGKILL)  # the namespace's init: the namespace ends with it
            unshare.wait(timeout=10)  # unshare --fork reaps its child, then exits


@pytest.mark.root
def test_a_held_pid_namespace_never_names_a_later_one() -> None:
    """Teardown once matched a container's processes by a remembered PID-namespace inode. The kernel gives a
    freed namespace's inode to a later namespace (e.g. another suite's container): teardown then saw that
    stranger's processes ("processes of the container survived") and killed them. PidNamespace holds the
    namespace open, so its inode cannot be given away.

    Side by side for a while: a namespace only remembered (the old way), whose inode a later namespace
    takes within moments on an idle machine, and one held, whose inode none may take. The while ends once
    the remembered inode was taken (or after 10 s: on a busy machine other namespaces may win the number).
    """
    with in_new_pid_namespace() as first:
        held = sc.PidNamespace(first, sc._pid_start_time(first))
        assert held.pids() == [first]
    try:
        with in_new_pid_namespace() as other:
            remembered = sc._pidns_of(other)
        assert remembered is not None
        taken = False
        deadline = time.monotonic() + 10.0
        while not taken and time.monotonic() < deadline:
            with in_new_pid_namespace() as later:
                assert sc._pidns_of(later) != held.inode
                assert not held.holds(later)
                assert held.pids() == []
                taken = sc._pidns_of(later) == remembered and sc._pids_in_pidns(remembered) == [later]
    finally:
        held.close()
    with pytest.raises(RuntimeError, match="no longer held"):
        held.pids()
    with pytest.raises(ProcessLookupError):
        sc.PidNamespace(first, sc._pid_start_time(os.getpid()))  # gone: its PID names nobody, or another


class _Interrupted(Exception):
    pass


def _fake_builder(calls: list[Path], fail: bool = False):
    def build(root: Path, debs: Path, **_recipe: object) -> None:
        calls.append(root)
        (root / "etc").mkdir(parents=True)
        (root / "etc/os-release").write_text("ID=debian\n")
        if fail:
            raise _Interrupted

    return build


def test_rootfs_build_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(sc, "_build_rootfs", _fake_builder(calls, fail=True))
    with pytest.raises(_Interrupted):
        sc.ensure_rootfs(tmp_path)
    assert not (tmp_path / sc.cache_key()).exists()
    assert list(tmp_path.glob(".build-*")) == []
    # A build killed outright leaves its directory: the next build removes it.
    half = tmp_path / f".build-{sc.cache_key()}-killed" / "root"
    half.mkdir(parents=True)
    monkeypatch.setattr(sc, "_build_rootfs", _fake_builder(calls))
    root = sc.ensure_rootfs(tmp_path)
    assert root == tmp_path / sc.cache_key()
    assert (root / "etc/os-release").read_text() == "ID=debian\n"
    assert (root / sc.COMPLETE_MARKER).is_file()
    assert not half.parent.exists()
    assert sc.ensure_rootfs(tmp_path) == root
    assert len(calls) == 2  # the cached root is reused
    # A root without its marker (say, copied by hand) is not trusted: rebuilt.
    (root / sc.COMPLETE_MARKER).unlink()
    assert sc.ensure_rootfs(tmp_path) == root
    assert len(calls) == 3


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(sc, "_build_rootfs", _fake_builder(calls))
    start = threading.Barrier(4)
    results: list[Path] = []

    def call() -> None:
        start.wait()
        results.append(sc.ensure_rootfs(tmp_path))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / sc.cache_key()] * 4


def test_cache_key_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    key = sc.cache_key()
    assert key.startswith("bookworm-")
    monkeypatch.setattr(sc, "PACKAGES", (*sc.PACKAGES, "nftables"))
    assert sc.cache_key() != key
    assert sc.cache_key("trixie").startswith("trixie-")
    assert sc.cache_key(extra_packages=sc.DEB_DEPENDENCIES) != sc.cache_key()
