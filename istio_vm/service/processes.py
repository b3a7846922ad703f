"""Starting, signalling and reaping the proxy's processes (the loop's `ProcessOps` seam).

Children start in their own session (so a process group per epoch), with stdout and stderr on pipes
for the log relay, and die with the supervisor (PR_SET_PDEATHSIG); the supervisor is a child
subreaper, so what a child leaves behind (pilot-agent's Envoy) is re-parented to it and can be killed
and reaped instead of being orphaned to PID 1. The epochs' process groups are recorded under the run
dir, so the next start kills what a SIGKILLed supervisor's proxy left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from istio_vm import loggers, trust
from istio_vm.errors import UntrustedPathError
from istio_vm.service.privileges import PR_SET_NO_NEW_PRIVS

log = loggers.logger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CHILDREN_FILE = "children"  # RUN_DIR/children: "pid start-time uid" of each live epoch's process group
# The signals the supervisor catches (loop.SIGNALS, SIGUSR2, SIGCHLD): a child gets them at their default
# even when it is spawned before the loop's handlers exist (start.py ignores SIGHUP and SIGUSR2 until then,
# and an ignored signal stays ignored across exec).
CAUGHT = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD})
KILL_PASSES = 100  # kill_tree's bound: each pass sees what was forked while the previous one looked


class Child(NamedTuple):
    pid: int
    stdout: int  # read ends of the child's stdout / stderr pipes (non-blocking)
    stderr: int


class ProcessOps(Protocol):
    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child: ...
    def signal(self, pid: int, signum: int) -> None: ...
    def kill_tree(self, pid: int, keep: Iterable[int]) -> None: ...
    def reap(self) -> list[tuple[int, int]]: ...
    def remove_foreign(self, path: str) -> None: ...


_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (prctl PR_SET_CHILD_SUBREAPER)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


class RealProcessOps:
    def __init__(self, children: int | None = None, *, user: tuple[int, int, tuple[int, ...]] | None = None) -> None:
        self._children = children  # fd of RUN_DIR/children, opened as root before the privilege drop
        self._recorded: dict[int, tuple[float, int]] = {}
        self._user = user  # (uid, gid, groups) a child spawned while we are root switches to before its exec

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], *, record: bool = True) -> Child:
        """Start a child; `record=False` leaves the RUN_DIR/children entry to a later `record()`."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = _fork_exec(argv, env, out_w, err_w, self._child_user())
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        if record:
            self.record(pid)
        return Child(pid, out_r, err_r)

    def _child_user(self) -> tuple[int, int, tuple[int, ...]] | None:
        """The (uid, gid, groups) a child switches to before its exec: only while we are root (after the
        privilege drop it is already running as that user, like us)."""
        return self._user if self._user is not None and os.geteuid() == 0 else None

    def record(self, pid: int) -> None:
        """RUN_DIR/children := the epochs' groups still alive, with their start times (pid reuse)."""
        if self._children is None:
            return
        import psutil  # here, not at the top: the start imports nothing it needs only after the first spawn

        uid = user[0] if (user := self._child_user()) is not None else os.getuid()
        with contextlib.suppress(psutil.Error):
            self._recorded[pid] = (psutil.Process(pid).create_time(), uid)
        for old in [p for p, (started, _) in self._recorded.items() if not _alive(p, started)]:
            del self._recorded[old]
        text = "".join(f"{p} {started!r} {uid}\n" for p, (started, uid) in self._recorded.items())
        try:
            os.ftruncate(self._children, 0)
            os.pwrite(self._children, text.encode(), 0)
        except OSError as e:
            log.warning("cannot record the proxy's pid: %s", e)

    def signal(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def kill_tree(self, pid: int, keep: Iterable[int]) -> None:
        """SIGKILL the process group `pid` and every descendant of ours outside the groups in `keep`,
        pass after pass until one finds nothing alive left to kill: what forked while a pass listed
        the tree is seen by the next (a process cannot fork once SIGKILL is pending for it)."""
        import psutil  # here: only after an exit, never between the start and the first spawn

        kept = set(keep)
        killed: set[int] = set()
        for _ in range(KILL_PASSES):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            found = []
            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if (process.pid not in killed and os.getpgid(process.pid) not in kept
                            and process.status() != psutil.STATUS_ZOMBIE):
                        found.append(process)
            if not found:
                return
            for process in found:
                with contextlib.suppress(psutil.Error):
                    process.kill()
                killed.add(process.pid)
        log.warning("Killing the tree of %s: processes still appearing after %s passes", pid, KILL_PASSES)

    def reap(self) -> list[tuple[int, int]]:
        """Every child that has exited, with its wait status (waitpid(-1, WNOHANG) until none)."""
        reaped = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except OSError as e:  # pragma: no cover - EINTR is retried by Python (PEP 475)
                if e.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                break
            reaped.append((pid, status))
        return reaped

    def remove_foreign(self, path: str) -> None:
        remove_foreign(path, os.geteuid())


def discard(child: Child) -> None:
    """SIGKILL a child's process group and reap it, its pipes closed: an epoch the start gave up on
    before the loop took it over (start.py: the install failed while the proxy booted)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, 0)
    for fd in (child.stdout, child.stderr):
        os.close(fd)


def remove_foreign(path: str, owner: int) -> None:
    """Remove `path` if a user other than `owner` owns it (the owner's own is left alone).

    start.py calls it as root before the privilege drop: /dev/shm is sticky, so once we are the
    proxy's user a root-owned leftover (Envoy's memory of an old run as root) cannot be removed.
    """
    try:
        if os.lstat(path).st_uid != owner:
            os.unlink(path)
            log.info("Removed %s (left by another user)", path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("Cannot remove %s: %s", path, e)


def _alive(pid: int, started: float) -> bool:
    """`pid` is still the process that started at `started` (not a reused pid), and not a zombie."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_leftovers(run_dir: str) -> int:
    """At start, before anything else: SIGKILL what is left of the process groups a previous
    supervisor recorded (it was SIGKILLed, and its proxy's children lived on, holding the ports).

    A recorded group is ours while its leader is the recorded process (same start time), or, the
    leader being dead, in its members: the kernel never gives a pid to a new process while a group
    of that number exists, and the members must run as the recorded user and be younger than the
    leader (a zombie leader, which an init that does not reap leaves, still names its group).
    Returns how many processes were killed.
    """
    path = os.path.join(run_dir, CHILDREN_FILE)
    try:
        fd = trust.open_checked(path, os.O_RDONLY, owners=(os.geteuid(),))
    except FileNotFoundError:
        return 0
    except (OSError, UntrustedPathError) as e:
        log.warning("%s: not read (%s)", path, e)
        return 0
    with open(fd, encoding="ascii", errors="replace") as f:
        lines = f.read(1 << 16).splitlines()
    groups: dict[int, tuple[float, int]] = {}
    for line in lines:
        words = line.split()
        with contextlib.suppress(IndexError, ValueError):
            groups[int(words[0])] = (float(words[1]), int(words[2]))
    groups.pop(os.getpid(), None)
    groups.pop(1, None)
    if not groups:
        return 0
    import psutil  # only when a killed predecessor recorded groups

    killed = 0
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            group = os.getpgid(process.pid)
            if group not in groups or process.status() == psutil.STATUS_ZOMBIE:
                continue
            started, uid = groups[group]
            leader = _leader(group)
            if leader is not None:  # the recorded process, alive or a zombie nobody reaped
                ours = leader == started
            else:
                ours = process.uids().real == uid and process.create_time() >= started
            if ours:
                log.warning("Killing %s (pid %s, process group %s): left running by a previous istio-vm that "
                            "was killed", process.name(), process.pid, group, extra={"ISTIO_EVENT": "leftover"})
                process.kill()
                killed += 1
    return killed


def _leader(group: int) -> float | None:
    """The start time of process `group` (zombie or not), None if there is no such process."""
    import psutil

    try:
        return psutil.Process(group).create_time()
    except psutil.Error:
        return None


def open_children_file(run_dir: str) -> int:
    """RUN_DIR/children, kept open across the privilege drop so the supervisor can go on writing it."""
    return trust.open_checked(os.path.join(run_dir, CHILDREN_FILE), os.O_RDWR | os.O_CREAT, 0o600,
                              owners=(os.geteuid(),))


def _fork_exec(argv: Sequence[str], env: Mapping[str, str], out_w: int, err_w: int,
               user: tuple[int, int, tuple[int, ...]] | None = None) -> int:
    """fork, then in the child: own session, `user`'s groups, group and uid (as privileges.drop_to, with
    no_new_privs) if given, PR_SET_PDEATHSIG(SIGKILL), stdio, execve.

    posix_spawn cannot set the parent-death signal, so this forks. Signals are blocked around fork,
    so no handler of ours runs in the child, whose handlers go back to default before the mask is
    restored for the exec. If the supervisor died before the prctl took effect, the child has been
    re-parented already: the getppid() check closes that race. A failed exec comes back through a
    close-on-exec pipe, as an OSError here (as posix_spawn reports it).
    """
    parent = os.getpid()
    report_r, report_w = os.pipe()
    blocked = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, seen by the tests that run real processes
            try:
                os.close(report_r)
                signal.set_wakeup_fd(-1)
                for signum in blocked:
                    with contextlib.suppress(OSError, ValueError):
                        if signum in CAUGHT or signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                            signal.signal(signum, signal.SIG_DFL)
                os.setsid()
                if user is not None:  # before the prctl: the kernel clears the death signal when the uid changes
                    os.setgroups(list(user[2]))
                    os.setgid(user[1])
                    os.setuid(user[0])
                    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
                if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
                    os._exit(127)
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                os.execve(argv[0], list(argv), dict(env))
            except OSError as e:
                os.write(report_w, str(e.errno).encode())
            finally:
                os._exit(127)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(report_w)
    report = b""
    try:
        while chunk := os.read(report_r, 64):
            report += chunk
    finally:
        os.close(report_r)
    if report:
        os.waitpid(pid, 0)
        number = int(report) if report.isdigit() else errno.ENOEXEC
        raise OSError(number, os.strerror(number), argv[0])
    return pid
