"""Boot a throwaway Debian container under systemd-nspawn, for tests of the systemd integration.

``ensure_rootfs()`` builds (once, cached) a bookworm root with debootstrap (``suite="trixie"`` a Debian 13
one, ``extra_packages`` with more of Debian's packages in it); ``booted_container()``
boots a private overlay of it with ``systemd-nspawn -b --private-network`` and yields a
:class:`Container` whose ``run()``, ``systemctl()`` and ``journalctl()`` execute inside it through
``nsenter``; ``install_project()`` installs istio-vm into it as wheels built on the host.
Needs root, systemd-nspawn, debootstrap and overlayfs. See docs/testing-systemd.md.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

SUITE = "bookworm"  # the default root; ensure_rootfs(suite=...) builds others
SUITES = ("bookworm", "trixie")  # Debian 12 and 13: what the package is tested on
VARIANT = "minbase"
MIRROR = os.environ.get("ISTIO_VM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the service needs at run time (systemd as PID 1, D-Bus for systemctl, iptables and ip for the
# capture rules, python3 with venv for the install, logrotate for the shipped snippet). systemd-python is
# compiled on the host and arrives as a wheel (see install_project): no compiler or -dev package in the root.
PACKAGES: tuple[str, ...] = tuple(
    sorted(
        "systemd systemd-sysv dbus libsystemd0 iptables iproute2 python3 python3-venv procps logrotate".split()
    )
)
# What istio-vm's .deb depends on beyond PACKAGES: installed into the root at build time, because the booted
# container has no network (and the tests use no PyPI): `dpkg -i` / `apt install ./x.deb` then needs nothing more.
DEB_DEPENDENCIES: tuple[str, ...] = ("python3-dotenv", "python3-psutil", "python3-systemd")
# Units that only slow a test container down or wait for hardware it does not have.
MASKED_UNITS: tuple[str, ...] = (
    "console-getty.service",
    "getty@.service",
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)
# Bump when the recipe below changes in a way the package list does not show.
RECIPE_VERSION = 1

CACHE_DIR = Path(os.environ.get("ISTIO_VM_ROOTFS_CACHE", "/var/tmp/istio-vm-rootfs"))
COMPLETE_MARKER = ".istio-vm-rootfs.json"  # written last, before the rename that publishes a root
PROJECT_DIR = Path(__file__).resolve().parent.parent
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PR_SET_PDEATHSIG = 1


def packages_of(extra_packages: Sequence[str] = ()) -> tuple[str, ...]:
    """The packages of a root: PACKAGES and ``extra_packages``, sorted."""
    return tuple(sorted({*PACKAGES, *extra_packages}))


def cache_key(suite: str = SUITE, extra_packages: Sequence[str] = ()) -> str:
    """Key of the cached root: changes with the suite, the package list, the masks or the recipe."""
    recipe = {
        "suite": suite,
        "variant": VARIANT,
        "packages": packages_of(extra_packages),
        "masked": MASKED_UNITS,
        "recipe": RECIPE_VERSION,
        "arch": os.uname().machine,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"{suite}-{digest[:16]}"


def _log(msg: str) -> None:
    print(f"systemd_container: {msg}", file=sys.stderr, flush=True)


def _pdeathsig(sig: int) -> None:
    """In a child before exec: receive ``sig`` when the parent thread dies (e.g. pytest killed -9)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _pid_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat, which with the PID names a process uniquely; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    return start_time is not None and _pid_start_time(pid) == start_time


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace, deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target == prefix or target.startswith(prefix + "/"):
            found.append(target)
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def _unmount_all(path: Path) -> None:
    for target in _mounts_under(path):
        subprocess.run(["umount", "--lazy", target], check=False)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"still mounted below {path}: {left}")


def _remove_tree(path: Path) -> None:
    """Unmount whatever is below ``path``, then delete it without ever crossing into a mount."""
    if not path.exists() and not path.is_symlink():
        return
    _unmount_all(path)
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def _own_cgroups() -> list[Path]:
    """This process's cgroup directories in the hierarchies systemd-nspawn uses (cgroup2, name=systemd)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier_id, controllers, path = line.split(":", 2)
        if hier_id == "0":
            own["cgroup2"] = path
        elif "name=systemd" in controllers.split(","):
            own["name=systemd"] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, super_options = fields[sep + 1], fields[sep + 3].split(",")
        kind = "cgroup2" if fstype == "cgroup2" else "name=systemd" if "name=systemd" in super_options else None
        if kind is None or fstype not in ("cgroup", "cgroup2") or kind not in own:
            continue
        mount_root, mount_point = fields[3], fields[4]
        relative = os.path.relpath(own.pop(kind), mount_root)
        if not relative.startswith(".."):
            found.append(Path(os.path.normpath(Path(mount_point) / relative)))
    return found


def _make_cgroups(name: str) -> list[Path]:
    """A fresh cgroup ``name`` below ours in each hierarchy systemd-nspawn uses; return them."""
    made = []
    for base in _own_cgroups():
        cgroup = base / "istio-vm-test" / name
        for _ in range(10):  # another run's _remove_cgroups may rmdir the shared parent between the two mkdirs
            with contextlib.suppress(FileNotFoundError):
                cgroup.mkdir(parents=True)
                break
        else:
            cgroup.mkdir(parents=True)
        made.append(cgroup)
    return made


def _cgroup_pids(cgroups: Sequence[Path]) -> set[int]:
    pids: set[int] = set()
    for top in cgroups:
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in procs.read_text().split())
    return pids


def _remove_cgroups(cgroups: Sequence[Path]) -> None:
    """Remove the (empty) cgroup trees ``cgroups``, deepest first, then their parent if unused."""
    for top in cgroups:
        if top.is_dir():
            for sub in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
                sub.rmdir()
            top.rmdir()
        with contextlib.suppress(OSError):  # busy while another container runs: fine
            top.parent.rmdir()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:  # never inherited: subprocess closes fds by default
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kill_recorded_group(record: Path) -> None:
    """Kill the process group named in ``record`` ("PGID STARTTIME") if that process still lives."""
    try:
        pgid_text, start = record.read_text().split()
    except (OSError, ValueError):
        return
    if _alive(int(pgid_text), start):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pgid_text), signal.SIGKILL)


def _kill_processes_under(path: Path) -> None:
    """SIGKILL every process whose root or working directory is ``path`` or below it, or whose
    command line names it (a debootstrap orphaned when its caller was killed, a dpkg it chrooted)."""
    prefix = str(path).rstrip("/")
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            places = [os.readlink(f"/proc/{entry}/root"), os.readlink(f"/proc/{entry}/cwd")]
            places += Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if any(p == prefix or p.startswith(prefix + "/") for p in places):
                os.kill(int(entry), signal.SIGKILL)


def ensure_rootfs(cache_dir: Path = CACHE_DIR, *, suite: str = SUITE, extra_packages: Sequence[str] = ()) -> Path:
    """Return the cached Debian root of ``suite`` with PACKAGES and ``extra_packages`` (its
    :func:`cache_key`), building it first when missing.

    The build runs in ``cache_dir/.build-KEY-*`` and is renamed to ``cache_dir/KEY`` only once
    complete, so an interrupted build never looks valid; a lock file serialises concurrent callers,
    and the next caller removes what an interrupted build left (killing its debootstrap if alive).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: one of {', '.join(SUITES)}")
    key = cache_key(suite, extra_packages)
    packages = packages_of(extra_packages)
    final = cache_dir / key
    if (final / COMPLETE_MARKER).is_file():
        return final
    with _locked(cache_dir / f"{key}.lock"):
        if (final / COMPLETE_MARKER).is_file():
            return final
        for stale in cache_dir.glob(f".build-{key}-*"):
            _log(f"removing interrupted build {stale}")
            _kill_recorded_group(stale / ".builder")
            _kill_processes_under(stale)  # e.g. a dpkg chrooted there whose debootstrap was killed
            _remove_tree(stale)
        if final.exists():  # a root without its marker is not ours to trust
            _remove_tree(final)
        build = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
        try:
            _build_rootfs(build / "root", cache_dir / "debs", suite=suite, packages=packages)
            (build / "root" / COMPLETE_MARKER).write_text(
                json.dumps({"key": key, "suite": suite, "packages": packages, "built": time.time()}) + "\n"
            )
            os.rename(build / "root", final)
        finally:
            _remove_tree(build)
        fd = os.open(cache_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final


def _build_rootfs(root: Path, debs: Path, *, suite: str = SUITE, packages: Sequence[str] = PACKAGES) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(packages)}",
        f"--cache-dir={debs}",
        suite,
        str(root),
        MIRROR,
    ]
    _log(f"building {root} (a few minutes): {' '.join(argv)}")
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _pdeathsig(signal.SIGKILL),
        )
        (root.parent / ".builder").write_text(f"{proc.pid} {_pid_start_time(proc.pid)}\n")
        try:
            rc = proc.wait(timeout=1800)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if rc != 0:
            out.seek(0)
            tail = out.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"debootstrap failed with status {rc}:\n{tail}")
    _unmount_all(root)  # debootstrap unmounts its /proc and /sys itself; make sure
    _customise(root)
    _log(f"built {root} in {time.monotonic() - started:.0f}s")


def _customise(root: Path) -> None:
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # Downloaded packages and package lists are not needed at run time (the debs stay in the cache).
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for leftover in root.glob(pattern):
            leftover.unlink()
    # An empty machine-id makes systemd generate a fresh one on every boot of a copy.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("istio-vm-test\n")


class CommandError(subprocess.CalledProcessError):
    """A command that failed; unlike CalledProcessError its message shows the output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!s:.3000}\nstderr: {self.stderr!s:.3000}"


def _host(argv: Sequence[str], timeout: float = 600.0) -> None:
    """Run a host command quietly; raise CommandError with its output when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise CommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)


@dataclass
class Container:
    """A booted container, as booted_container() yields it.

    ``root`` is the overlay holding its root file system on the host; ``path()`` reaches every file
    on the container's root file system; ``live_path()`` also reaches its own /run, /tmp and /dev.
    """

    name: str
    machine: str
    root: Path
    run_dir: Path
    leader_pid: int
    pidns: int  # the inode of pid_namespace, for messages
    pid_namespace: PidNamespace
    cgroups: tuple[Path, ...]
    log_path: Path
    _reboot: Callable[[Container], None] | None = field(default=None, repr=False)

    def reboot(self) -> None:
        """`systemctl reboot` inside, and boot the same root again (its files kept); wait until it runs.

        nspawn exits with status 133 when the container reboots; booted_container starts it again on the
        same overlay. ``leader_pid``, ``pidns`` and ``pid_namespace`` name the new boot afterwards.
        """
        if self._reboot is None:
            raise RuntimeError("not a container of booted_container()")
        self._reboot(self)

    def path(self, p: str | PurePosixPath) -> Path:
        """The host path of the container path ``p`` on its root file system (the overlay).

        A real directory, so tools that canonicalise paths (pip, realpath) work on it. Paths on the
        container's own mounts (/run, /tmp, /dev, /proc, /sys) are refused: see :meth:`live_path`.
        Symbolic links met on the way resolve on the host: use real paths (``/usr/lib``, not ``/lib``).
        """
        absolute = _absolute(p)
        mount = self._mount_point_of(absolute)
        if mount != PurePosixPath("/"):
            raise ValueError(f"{absolute} is on the container's own mount {mount}: use live_path()")
        return self.root / absolute.relative_to("/")

    def live_path(self, p: str | PurePosixPath) -> Path:
        """``p`` as the container sees it, through ``/proc/LEADER/root``, its own mounts included.

        Valid while the container runs. Do not canonicalise it: ``realpath`` of /proc/PID/root is
        ``/``, so e.g. pip given such a path writes to the HOST's directory of that name.
        """
        return Path(f"/proc/{self.leader_pid}/root") / _absolute(p).relative_to("/")

    def _mount_point_of(self, p: PurePosixPath) -> PurePosixPath:
        points = [
            PurePosixPath(line.split()[4].encode().decode("unicode_escape"))
            for line in Path(f"/proc/{self.leader_pid}/mountinfo").read_text().splitlines()
        ]
        return max((m for m in points if m == p or m in p.parents), key=lambda m: len(m.parts))

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (all its namespaces, a clean environment, cwd /).

        The process joins the container's namespaces but stays in the caller's cgroup, so it is not
        part of any unit; output is captured, so a command that leaves a daemon holding stdout open
        runs into ``timeout`` (start daemons as units, e.g. with systemd-run).
        """
        with self.popen(argv, env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) as running:  # fmt: skip
            try:
                stdout, stderr = running.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                running.kill()
                running.wait()
                raise
        proc = subprocess.CompletedProcess(list(argv), running.returncode, stdout, stderr)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside the container without waiting for it (wait for it yourself).

        Its ``send_signal()``, ``terminate()`` and ``kill()`` signal the command, not nsenter.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return _InContainer(self._nsenter(argv), env=_container_env(env), text=True, **kwargs)

    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--target={self.leader_pid}", "--all", "--root", "--wd", "--", *argv]

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside the container."""
        return self.run(["systemctl", "--no-pager", "--no-ask-password", *args], check=check, timeout=timeout)

    def journalctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``journalctl ARGS`` inside the container."""
        return self.run(["journalctl", "--no-pager", *args], check=check, timeout=timeout)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        """The container's journal entries matching ``args`` (e.g. ``"-u", "foo.service"``), as dicts."""
        out = self.journalctl("--output=json", "--all", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for_journal(
        self, predicate: Callable[[dict[str, Any]], bool], *args: str, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Follow the journal (``journalctl -f ARGS``) until an entry satisfies ``predicate``; return it.

        Entries already written count too, so it does not matter whether the entry came first.
        """
        argv = ["journalctl", "--follow", "--lines=all", "--output=json", "--all", *args]
        deadline = time.monotonic() + timeout
        seen = 0
        with self.popen(argv, stdout=subprocess.PIPE) as follow:
            assert follow.stdout is not None
            try:
                buffer = b""
                while (remaining := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select([follow.stdout], [], [], remaining)
                    if not readable:
                        break
                    chunk = os.read(follow.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        seen += 1
                        entry = json.loads(line)
                        if predicate(entry):
                            return cast(dict[str, Any], entry)
            finally:
                follow.kill()
        raise TimeoutError(f"no matching journal entry (of {seen} for {list(args)}) within {timeout}s")

    def processes(self) -> list[int]:
        """Host PIDs of the processes in the container's PID namespace (also after it was powered off:
        the Container holds the namespace, so no later one can take its inode)."""
        return self.pid_namespace.pids()

    def log(self) -> str:
        """What systemd-nspawn and the container's console printed so far."""
        return self.log_path.read_text(errors="replace").replace("\r", "")


class _InContainer(subprocess.Popen[str]):
    """nsenter running a command in the container; signals go to the command.

    To enter a PID namespace nsenter forks the command and then only waits for it. Killing nsenter
    would orphan the command, and the orphan of a host process is adopted by the host's PID 1: it
    would stay a zombie in the container (systemd-shutdown then waits for it in vain).
    """

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        os.kill(self.pid, signal.SIGSTOP)  # a stopped nsenter cannot fork meanwhile
        try:
            os.waitid(os.P_PID, self.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
            children = _children(self.pid)
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, sig)
            if not children:  # not forked yet (or already reaped): nsenter itself
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in task.read_text().split())
    return children


def _container_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The environment of commands run inside: nothing of the host's (no venv, no PIP_*, no pager)."""
    env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}
    env.update(extra or {})
    return env


def _absolute(p: str | PurePosixPath) -> PurePosixPath:
    absolute = PurePosixPath(p)
    if not absolute.is_absolute() or ".." in absolute.parts:
        raise ValueError(f"not an absolute container path: {p}")
    return absolute


def _pidns_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _pids_in_pidns(pidns: int) -> list[int]:
    """The PIDs whose PID namespace has inode ``pidns`` now: only meaningful while that namespace is held
    (see :class:`PidNamespace`); once it is freed the kernel gives its inode number to the next namespace."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pidns_of(int(entry)) == pidns:
            pids.append(int(entry))
    return pids


class PidNamespace:
    """The PID namespace of a process, held open so that it keeps naming that namespace.

    Namespace inode numbers come from one kernel allocator that hands out the lowest free number: as
    soon as a namespace is freed (its last process gone, no file open on it), the next namespace made
    anywhere on the machine (another test run's container) usually gets the same inode. Matching
    processes by a remembered inode then finds a stranger's processes. An open file of the namespace
    keeps it allocated, so its inode (and device) cannot name another while this object lives.
    """

    def __init__(self, pid: int, start_time: str | None) -> None:
        """Hold the PID namespace of ``pid``, the process started at ``start_time`` (field 22 of its
        stat): ProcessLookupError when that process is gone (its PID could name another by now)."""
        try:
            fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ProcessLookupError(f"no process {pid}: {err}") from err
        if not _alive(pid, start_time):  # checked after the open: the file we hold is that process's
            os.close(fd)
            raise ProcessLookupError(f"process {pid} (started {start_time}) is gone")
        stat = os.fstat(fd)
        self.inode: int = stat.st_ino
        self._identity = (stat.st_dev, stat.st_ino)
        self._close = weakref.finalize(self, os.close, fd)  # on close() or when garbage

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is a process of this namespace (False once it is gone)."""
        try:
            stat = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            stat = None
        if not self._close.alive:  # the inode may name another namespace by now
            raise RuntimeError(f"PID namespace {self.inode} no longer held")
        return stat is not None and (stat.st_dev, stat.st_ino) == self._identity

    def pids(self) -> list[int]:
        """Host PIDs of the processes of this namespace."""
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and self.holds(int(entry))]

    def close(self) -> None:
        """Let the namespace go (then holds() raises); garbage collection does the same."""
        self._close()


def run_dir_root(cache_dir: Path = CACHE_DIR) -> Path:
    """Where booted_container keeps its throwaway overlays (one directory per run)."""
    return cache_dir / "run"


class ContainerBootError(RuntimeError):
    pass


class ContainerLeakError(RuntimeError):
    pass


@dataclass
class _Run:
    """Everything one booted_container() created on the host, recorded in ``dir`` for a later sweep."""

    dir: Path
    machine: str
    cgroups: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    pidns: PidNamespace | None = None

    def record(self, what: str, text: str) -> None:
        (self.dir / what).write_text(text + "\n")

    def remaining_processes(self) -> set[int]:
        pids = _cgroup_pids(self.cgroups)
        if self.pidns is not None:
            pids.update(self.pidns.pids())
        return pids

    def shutdown(self, timeout: float) -> None:
        """Power off, kill what is left, remove cgroups, mounts and files; raise if anything survived."""
        _active.pop(id(self), None)
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            # nspawn turns SIGTERM into SIGRTMIN+4 for the container's systemd: a clean poweroff.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"no poweroff within {timeout}s, killed")
                self._kill_all()
                self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while left := self.remaining_processes():  # the kernel tears a dead PID namespace down async
            if time.monotonic() > deadline:
                problems.append(f"processes survived: {sorted(left)}")
                break
            self._kill_all()
            _wait_gone(left, deadline - time.monotonic())
        try:
            _remove_cgroups(self.cgroups)
            propagate = Path("/run/systemd/nspawn/propagate") / self.machine
            if propagate.exists():
                _remove_tree(propagate)
            _remove_tree(self.dir)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            problems.append(str(err))
        if problems:
            raise ContainerLeakError(f"{self.machine}: " + "; ".join(problems))

    def _kill_all(self) -> None:
        if self.leader is not None:  # the container's PID 1: its death ends the whole PID namespace
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.remaining_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


_active: dict[int, _Run] = {}


def _atexit_cleanup() -> None:
    for run in list(_active.values()):
        with contextlib.suppress(Exception):
            run.shutdown(timeout=10.0)


atexit.register(_atexit_cleanup)


def sweep_stale_runs(cache_dir: Path = CACHE_DIR) -> list[Path]:
    """Remove the runs of processes that died without cleaning up (e.g. killed -9); return them.

    Test runs of other checkouts sweep the same directory: a lock makes one of them remove a dead run
    while the others wait (and then find it gone).
    """
    runs = run_dir_root(cache_dir)
    if not runs.is_dir():
        return []
    with _locked(cache_dir / "sweep.lock"):
        return [path for path in sorted(runs.iterdir()) if _sweep_if_stale(path)]


def _sweep_if_stale(path: Path) -> bool:
    try:
        owner_pid, owner_start = (path / "owner").read_text().split()
        if _alive(int(owner_pid), owner_start):
            return False
    except (OSError, ValueError):
        try:
            if time.time() - path.stat().st_mtime < 60:
                return False  # being created right now
        except FileNotFoundError:
            return False  # its owner just removed it
    _log(f"removing the leftovers of a dead test run: {path}")
    _kill_recorded_group(path / "nspawn")
    run = _Run(dir=path, machine=_read(path / "machine") or path.name)
    run.cgroups = [Path(line) for line in (_read(path / "cgroups") or "").splitlines() if line]
    leader = (_read(path / "leader") or "").split()
    if len(leader) == 2:
        with contextlib.suppress(ProcessLookupError):  # gone: its namespace died with it
            run.pidns = PidNamespace(int(leader[0]), leader[1])
            run.leader = int(leader[0])
    try:
        run.shutdown(timeout=30.0)
    finally:
        if run.pidns is not None:
            run.pidns.close()
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def booted_container(
    rootfs: Path,
    *,
    name: str = "istio-vm-test",
    boot_timeout: float = 90.0,
    stop_timeout: float = 30.0,
    cache_dir: Path = CACHE_DIR,
) -> Iterator[Container]:
    """Boot a throwaway overlay of ``rootfs`` and yield it; on exit power it off and delete it.

    Writes go to an overlayfs upper directory in a fresh run directory, so the cached root is never
    changed. ``name`` is the container's host name; its machine name adds a random suffix so that
    containers can run side by side. The container has its own network namespace (loopback only):
    iptables inside it never touch the host's. On exit (also when the body raised) the container is
    powered off (SIGKILL after ``stop_timeout``), no process of its PID namespace or cgroups is left,
    the overlay is unmounted and the run directory deleted; ContainerLeakError says otherwise.
    """
    if not (rootfs / COMPLETE_MARKER).is_file():
        raise ValueError(f"{rootfs} is not a complete root from ensure_rootfs()")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?", name):
        raise ValueError(f"not a usable host name: {name!r}")
    sweep_stale_runs(cache_dir)
    runs = run_dir_root(cache_dir)
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{name}-{secrets.token_hex(4)}"  # also the machine name: letters, digits, "-" only
    path.mkdir(mode=0o700)
    run = _Run(dir=path, machine=path.name)
    _active[id(run)] = run
    try:
        run.record("owner", f"{os.getpid()} {_pid_start_time(os.getpid())}")
        run.record("machine", run.machine)
        run.cgroups = _make_cgroups(run.machine)
        run.record("cgroups", "\n".join(map(str, run.cgroups)))
        root = path / "root"
        for sub in ("upper", "work", "root"):
            (path / sub).mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={rootfs},upperdir={path / 'upper'},workdir={path / 'work'}", str(root)],
            check=True,
        )  # fmt: skip
        leader, pidns = _boot(run, root, name, boot_timeout)
        container = Container(
            name=name,
            machine=run.machine,
            root=root,
            run_dir=path,
            leader_pid=leader,
            pidns=pidns.inode,
            pid_namespace=pidns,
            cgroups=tuple(run.cgroups),
            log_path=path / "console.log",
            _reboot=lambda c: _reboot(run, c, boot_timeout),
        )
        _wait_running(container, boot_timeout)
        yield container
    finally:
        run.shutdown(timeout=stop_timeout)


def _boot(run: _Run, root: Path, hostname: str, timeout: float) -> tuple[int, PidNamespace]:
    """Start systemd-nspawn in the run's cgroups; once the container's systemd is up, return the host
    PID of that systemd and its PID namespace (held).

    nspawn reports the leader's PID (X_NSPAWN_LEADER_PID=) and, with --notify-ready=yes, READY=1
    once the container's systemd finished start-up, on the NOTIFY_SOCKET we give it.
    """
    notify_path = run.dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(notify_path))
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--notify-ready=yes",
            "--console=read-only",  # the container's console (boot and shutdown) goes to console.log
            f"--machine={run.machine}",
            f"--hostname={hostname}",
            "--boot",
            f"--directory={root}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "SYSTEMD_", "LISTEN_"))}
        env["NOTIFY_SOCKET"] = str(notify_path)
        env["TERM"] = "dumb"  # no colour codes in console.log
        procs_files = [cgroup / "cgroup.procs" for cgroup in run.cgroups]

        def in_child() -> None:  # after fork, before exec
            for procs in procs_files:  # with --keep-unit nspawn works below its own cgroup
                procs.write_text(str(os.getpid()))
            _pdeathsig(signal.SIGTERM)  # should the test process die, nspawn powers the container off

        with open(run.dir / "console.log", "ab") as log:  # appended: a reboot boots again
            run.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=in_child,
            )
        run.record("nspawn", f"{run.proc.pid} {_pid_start_time(run.proc.pid)}")
        ready = False
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(run.proc.pid)
        try:
            while not (run.leader and run.pidns and ready):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ContainerBootError(f"container not ready within {timeout}s:\n{_tail(run.dir)}")
                readable, _, _ = select.select([sock.fileno(), pidfd], [], [], remaining)
                if sock.fileno() in readable:
                    for line in sock.recv(4096).decode(errors="replace").splitlines():
                        if line.startswith("X_NSPAWN_LEADER_PID="):
                            run.leader = int(line.partition("=")[2])
                            start_time = _pid_start_time(run.leader)
                            run.record("leader", f"{run.leader} {start_time}")
                            try:
                                run.pidns = PidNamespace(run.leader, start_time)
                            except ProcessLookupError as err:
                                raise ContainerBootError(f"the container's init died: {err}\n{_tail(run.dir)}") from err
                        elif line == "READY=1":
                            ready = True
                elif pidfd in readable:
                    raise ContainerBootError(f"systemd-nspawn exited with {run.proc.wait()}:\n{_tail(run.dir)}")
        finally:
            os.close(pidfd)
        return run.leader, run.pidns
    finally:
        sock.close()


def _reboot(run: _Run, container: Container, timeout: float) -> None:
    assert run.proc is not None
    container.run(["systemctl", "reboot"], check=False)
    status = run.proc.wait(timeout=timeout)
    if status != 133:  # systemd-nspawn(1): 133 = the container asked to be rebooted
        raise ContainerBootError(f"systemd-nspawn exited with {status}, not 133, on reboot:\n{_tail(run.dir)}")
    if run.pidns is not None:
        run.pidns.close()  # the old boot's processes died with its init (and the cgroups still name them)
    run.leader = run.pidns = None
    (run.dir / "notify.sock").unlink()  # _boot binds it afresh
    container.leader_pid, container.pid_namespace = _boot(run, container.root, container.name, timeout)
    container.pidns = container.pid_namespace.inode
    _wait_running(container, timeout)


def _tail(run_dir: Path) -> str:
    try:
        return (run_dir / "console.log").read_text(errors="replace")[-4000:]
    except OSError:
        return "(no console log)"


def _wait_running(container: Container, timeout: float) -> None:
    state = container.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout)
    if state.stdout.strip() not in ("running", "degraded"):
        failed = container.systemctl("--failed", "--plain", check=False).stdout
        raise ContainerBootError(f"system state {state.stdout.strip()!r}; failed units:\n{failed}")


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Block until each of ``pids`` has exited (its pidfd turns readable) or ``timeout`` passes.

    Returns the PIDs still running. An exited process may linger as a zombie until its parent (or
    PID 1, for an orphan) reaps it; that is not running.
    """
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise
    try:
        deadline = time.monotonic() + timeout
        pending = list(fds)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(pending, [], [], remaining)
            pending = [fd for fd in pending if fd not in readable]
        return {fds[fd] for fd in pending}
    finally:
        for fd in fds:
            os.close(fd)


def _source_hash() -> str:
    """Hash of what goes into the project's wheel: pyproject.toml, README.md and istio_vm/."""
    digest = hashlib.sha256()
    files = [PROJECT_DIR / "pyproject.toml", PROJECT_DIR / "README.md"]
    files += sorted(p for p in (PROJECT_DIR / "istio_vm").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(PROJECT_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_wheels(dest: Path, cache_dir: Path = CACHE_DIR) -> list[Path]:
    """Build wheels of istio-vm and its dependencies on the host, copy them to ``dest``; return them.

    The host is Debian 12 like the container (same Python 3.11, same libsystemd), so the wheel of
    systemd-python compiled here runs there. The dependencies' wheels are cached by the hash of
    pyproject.toml, the project's wheel by the hash of its sources.
    """
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError("build the wheels with Debian 12's python3 (3.11), as the container has")
    pyproject = (PROJECT_DIR / "pyproject.toml").read_bytes()
    deps = cache_dir / "wheels" / f"deps-{hashlib.sha256(pyproject).hexdigest()[:16]}"
    own = cache_dir / "wheels" / f"istio-vm-{_source_hash()}"
    # --use-pep517: Debian 12's pip 23.0 otherwise builds systemd-python (an sdist without pyproject.toml)
    # with `setup.py bdist_wheel`, which fails ("invalid command 'bdist_wheel'") where wheel is not installed.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--use-pep517"]
    with _locked(cache_dir / "wheels.lock"):
        for wheels, extra in ((deps, []), (own, ["--no-deps"])):
            if not (wheels / ".complete").is_file():
                _remove_tree(wheels)
                _host([*pip, *extra, "--wheel-dir", str(wheels), str(PROJECT_DIR)])
                (wheels / ".complete").write_text("")
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in deps.glob("*.whl") if not w.name.startswith("istio_vm-")] + list(own.glob("*.whl"))
    for wheel in wanted:
        shutil.copy2(wheel, dest)
    return sorted(dest / wheel.name for wheel in wanted)


def install_project(container: Container, venv: str = "/opt/istio-vm") -> PurePosixPath:
    """Install istio-vm into a new venv at ``venv`` in the container; return the venv's path.

    The wheels are built on the host (:func:`build_wheels`) and installed with no index. The venv is
    made without pip (ensurepip takes seconds); Debian's pip wheel (python3-pip-whl) installs into it.
    """
    inbox = PurePosixPath("/var/tmp/istio-vm-wheels")
    build_wheels(container.path(inbox))
    pip_wheels = sorted(container.path("/usr/share/python-wheels").glob("pip-*.whl"))
    if not pip_wheels:
        raise RuntimeError("no pip wheel in the container's /usr/share/python-wheels (python3-pip-whl)")
    pip_wheel = PurePosixPath("/usr/share/python-wheels", pip_wheels[-1].name)
    container.run(["python3", "-m", "venv", "--without-pip", venv])
    container.run(
        [f"{venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir", "-q",
         "--no-index", f"--find-links={inbox}", "istio-vm"],
        env={"PYTHONPATH": str(pip_wheel)},
        timeout=300,
    )  # fmt: skip
    container.run(["rm", "-rf", str(inbox)])
    return PurePosixPath(venv)


__all__ = [
    "CACHE_DIR",
    "DEB_DEPENDENCIES",
    "PACKAGES",
    "SUITES",
    "CommandError",
    "Container",
    "ContainerBootError",
    "ContainerLeakError",
    "PidNamespace",
    "booted_container",
    "build_wheels",
    "cache_key",
    "ensure_rootfs",
    "install_project",
    "packages_of",
    "sweep_stale_runs",
]
