"""Root never uses what another user can change: the run dir and its files, the lock's pid, the
proxy's log files and binaries in TPROXY mode, verify's child (root; another user = istio-proxy)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm.errors import ExitStatus, LockedError, UntrustedPathError
from istio_vm.iptables import apply, capture_state, state
from istio_vm.iptables.parts import Part
from istio_vm.service import start
from istio_vm.service.proxy_output import ProxyOutput
from testbed.netns import Netns
from testbed.service import ISTIO_VM, REFERENCE_CLUSTER_ENV, ensure_user, service
from tests.fakes import FakeRunner

pytestmark = pytest.mark.root


@pytest.fixture
def other() -> int:
    """The uid of a user who is not root."""
    return ensure_user("istio-proxy").pw_uid


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp (pytest's own tmp dirs are fine too, but 0700)."""
    path = Path(tempfile.mkdtemp(prefix="istio-vm-trust-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def secret(root_dir: Path) -> Path:
    path = root_dir / "secret"
    path.write_text("root only\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("how", ["owned by another user", "writable by others", "parent owned by another user"])
def test_root_refuses_a_run_dir_another_user_could_write_and_runs_nothing(root_dir: Path, other: int,
                                                                         how: str) -> None:
    run_dir = root_dir / "parent" / "run"
    run_dir.mkdir(parents=True)
    (root_dir / "parent").chmod(0o755)
    if how == "owned by another user":
        os.chown(run_dir, other, -1)
    elif how == "writable by others":
        run_dir.chmod(0o777)
    else:
        os.chown(root_dir / "parent", other, -1)
    fake = FakeRunner()
    with pytest.raises(UntrustedPathError, match="ISTIO_VM_RUN_DIR") as caught:
        apply.clean_host(run_dir=str(run_dir), runner=fake)
    assert caught.value.status == 78
    assert fake.calls == []  # not even a save: nothing of the host is read or changed
    with pytest.raises(UntrustedPathError):
        start.running_pid(str(run_dir))


def test_a_state_file_root_did_not_write_is_not_replayed(root_dir: Path, other: int,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The state file lists `ip` commands clean runs as root: one another user wrote (or a link to
    one) is ignored with a warning."""
    forged = state.RunState("nft", (("ip", "rule", "add", "lookup", "main"),))
    path = root_dir / state.STATE_FILE
    path.write_text(forged.to_json())
    os.chown(path, other, -1)
    assert state.read(str(root_dir)) == state.RunState()
    assert "owned by uid" in caplog.text
    path.unlink()
    elsewhere = root_dir / "elsewhere.json"
    elsewhere.write_text(forged.to_json())
    path.symlink_to(elsewhere)
    assert state.read(str(root_dir)) == state.RunState()
    assert "symbolic link" in caplog.text
    path.unlink()
    path.write_text(forged.to_json())
    assert state.read(str(root_dir)) == forged  # root's own file in root's dir: believed


def test_the_state_file_is_written_through_an_unpredictable_exclusive_temporary(root_dir: Path) -> None:
    """The old temporary name was STATE.tmp.PID: a link planted there made root overwrite its target."""
    target = secret(root_dir)
    for pid in (os.getpid(), os.getpid() + 1):
        (root_dir / f"{state.STATE_FILE}.tmp.{pid}").symlink_to(target)
    recorded = state.RunState("nft", (("ip", "-6", "addr", "add", "::6/128", "dev", "lo"),))
    state.write(str(root_dir), recorded)
    assert target.read_text() == "root only\n"
    assert state.read(str(root_dir)) == recorded
    assert oct((root_dir / state.STATE_FILE).stat().st_mode & 0o777) == "0o644"
    assert not [p for p in os.listdir(root_dir) if p.startswith(f".{state.STATE_FILE}")]  # no temporary left


def test_the_capture_file_follows_no_link_another_user_planted(root_dir: Path, other: int,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """capture.json (what the fail-open policies' service says is on, for verify): the old temporary name
    was capture.json.tmp.PID, written with open() as root; now neither it nor a link at capture.json
    itself is followed, and only root's own regular file is believed."""
    target = secret(root_dir)
    path = root_dir / capture_state.CAPTURE_FILE
    for pid in (os.getpid(), os.getpid() + 1):
        planted = root_dir / f"{capture_state.CAPTURE_FILE}.tmp.{pid}"
        planted.symlink_to(target)
        os.lchown(planted, other, other)
    path.symlink_to(target)
    os.lchown(path, other, other)
    assert capture_state.read_expected(str(root_dir)) is None  # a link: not followed, not believed
    assert "symbolic link" in caplog.text
    capture_state.write_expected(str(root_dir), "fail-open", frozenset({Part.INBOUND}))
    assert target.read_text() == "root only\n"  # neither link was written through
    assert not path.is_symlink()
    assert (path.stat().st_uid, oct(path.stat().st_mode & 0o777)) == (0, "0o644")
    assert capture_state.read_expected(str(root_dir)) == ("fail-open", frozenset({Part.INBOUND}))
    assert not [p for p in os.listdir(root_dir) if p.startswith(f".{capture_state.CAPTURE_FILE}")]
    os.chown(path, other, -1)  # another user's file at the path (a directory it could once write)
    assert capture_state.read_expected(str(root_dir)) is None
    assert "owned by uid" in caplog.text


@contextlib.contextmanager
def _holder(lock: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding an exclusive flock on `lock` (as `istio-vm start` does), for the block."""
    code = ("import fcntl, os, sys, signal; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); signal.pause()")
    with subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "locked\n"
            yield proc
        finally:
            proc.kill()


def test_reload_signals_only_the_process_that_holds_the_lock(root_dir: Path) -> None:
    lock = root_dir / start.RUN_LOCK
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{bystander.pid}\n")  # a stale or forged pid
        assert start.running_pid(str(root_dir)) is None  # nobody holds the lock: nothing to signal
        with _holder(lock) as holder:
            with pytest.raises(LockedError, match=f"names pid {bystander.pid}, but the lock is held by {holder.pid}"):
                start.running_pid(str(root_dir))
            lock.write_text(f"{holder.pid}\n")
            assert start.running_pid(str(root_dir)) == holder.pid
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_flock_holders_reads_proc_locks(root_dir: Path) -> None:
    lock = root_dir / "x.lock"
    lock.write_text("")
    fd = os.open(lock, os.O_RDWR)
    try:
        assert start.flock_holders(os.fstat(fd)) == set()
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert start.flock_holders(os.fstat(fd)) == {os.getpid()}
    finally:
        os.close(fd)


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo", "other user's"])
def test_root_never_appends_to_what_is_planted_in_the_log_dir(root_dir: Path, other: int, plant: str) -> None:
    """TPROXY: the supervisor stays root, and ISTIO_LOG_DIR may be istio-proxy's."""
    log_dir = root_dir / "log"
    log_dir.mkdir()
    os.chown(log_dir, other, -1)
    target = secret(root_dir)
    planted = log_dir / "istio.log"
    if plant == "symlink":
        planted.symlink_to(target)
    elif plant == "hardlink":
        os.link(target, planted)
    elif plant == "fifo":
        os.mkfifo(planted)
    else:
        planted.write_text("")
        os.chown(planted, ensure_user("nobody").pw_uid, -1)  # neither root nor the directory's owner
    with pytest.raises(OSError if plant == "fifo" else UntrustedPathError):  # a FIFO: ENXIO, never a hang
        ProxyOutput("files", name="envoy", log_dir=str(log_dir))
    assert target.read_text() == "root only\n"


def test_log_files_of_root_or_the_dirs_owner_are_appended_and_a_bad_reopen_keeps_the_old(
        root_dir: Path, other: int, caplog: pytest.LogCaptureFixture) -> None:
    log_dir = root_dir / "log"
    log_dir.mkdir()
    os.chown(log_dir, other, -1)
    (log_dir / "istio.log").write_text("before\n")
    os.chown(log_dir / "istio.log", other, -1)
    output = ProxyOutput("files", name="envoy", log_dir=str(log_dir))
    try:
        output.line(0, 1, "stdout", "one")
        target = secret(root_dir)
        (log_dir / "istio.log").rename(log_dir / "istio.log.1")
        (log_dir / "istio.log").symlink_to(target)  # planted between two SIGUSR1s
        output.reopen()
        assert "Cannot reopen" in caplog.text
        output.line(0, 1, "stdout", "two")
    finally:
        output.close()
    assert (log_dir / "istio.log.1").read_text() == "before\none\ntwo\n"
    assert target.read_text() == "root only\n"


def test_a_proxy_that_would_run_as_root_must_be_a_binary_only_root_can_change(other: int) -> None:
    """TPROXY (EXEC_USER=root): a pilot-agent istio-proxy can write is refused, exit 78, nothing started."""
    with service({"EXEC_USER": "root", "ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY"}) as svc:
        bin_dir = Path(svc.env["ISTIO_BIN_BASE"])
        os.chown(bin_dir, other, -1)
        svc.start()
        status, _, err = svc.wait_exit()
        assert status == 78, err
        assert f"ISTIO_BIN_BASE/pilot-agent (the proxy runs as root)={bin_dir}/pilot-agent" in err
        assert f"{bin_dir} is owned by uid {other}" in err
        assert svc.records("start") == []
        os.chown(bin_dir, 0, -1)
        (bin_dir / "pilot-agent").chmod(0o777)
        svc.start()
        status, _, err = svc.wait_exit()
        assert status == 78, err
        assert "pilot-agent is writable by others" in err


def test_verify_never_imports_an_istio_vm_planted_in_the_working_directory() -> None:
    """`cd /tmp/x && istio-vm iptables verify` as root: its scratch child once ran /tmp/x/istio_vm."""
    planted = Path(tempfile.mkdtemp(prefix="istio-vm-planted-", dir="/tmp"))
    marker = planted / "ran-as-root"
    try:
        package = planted / "istio_vm"
        (package / "iptables").mkdir(parents=True)
        payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
        for module in ("__init__.py", "iptables/__init__.py", "iptables/canonical_netns.py", "__main__.py"):
            (package / module).write_text(payload)
        env_file = planted / "cluster.env"
        shutil.copy(REFERENCE_CLUSTER_ENV, env_file)
        with Netns.temporary("trust") as ns:
            done = subprocess.run(
                ["ip", "netns", "exec", ns.name, str(ISTIO_VM), "--sidecar-env", str(planted / "none.env"),
                 "--cluster-env", str(env_file), "iptables", "verify"],
                cwd=planted, capture_output=True, text=True, timeout=60, check=False,
                env={"PATH": os.environ["PATH"], "ISTIO_VM_RUN_DIR": str(planted / "run")})
        assert done.returncode == 1, done.stderr  # drift: nothing installed in the new namespace
        assert "drifted" in done.stderr
        assert not marker.exists()
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_reload_cli_refuses_a_forged_pid(root_dir: Path) -> None:
    """End to end: `istio-vm reload` with a lock naming a bystander held by another process."""
    run_dir = root_dir / "run"
    run_dir.mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / start.RUN_LOCK).write_text(f"{bystander.pid}\n")
        with _holder(run_dir / start.RUN_LOCK):
            done = subprocess.run([str(ISTIO_VM), "--sidecar-env", "/nonexistent", "--cluster-env", "/nonexistent",
                                   "reload"], capture_output=True, text=True, timeout=30, check=False,
                                  env={"PATH": os.environ["PATH"], "ISTIO_VM_RUN_DIR": str(run_dir)})
        assert done.returncode == ExitStatus.LOCKED, done.stderr
        assert "not signalling" in done.stderr
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()
