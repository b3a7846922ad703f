"""Starting, signalling and reaping the proxy's processes (the loop's `ProcessOps` seam).

Children start in their own session (so a process group per epoch), with stdout and stderr on pipes
for the log relay; the supervisor is a child subreaper, so what a child leaves behind (pilot-agent's
Envoy) is re-parented to it and can be killed and reaped instead of being orphaned to PID 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class Child:
    pid: int
    stdout: int  # read ends of the child's stdout / stderr pipes (non-blocking)
    stderr: int


class ProcessOps(Protocol):
    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child: ...
    def signal(self, pid: int, signum: int) -> None: ...
    def kill_tree(self, pid: int, keep: Iterable[int]) -> None: ...
    def reap(self) -> list[tuple[int, int]]: ...
    def remove_foreign(self, path: str) -> None: ...


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (prctl PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


class RealProcessOps:
    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # posix_spawn: no Python runs in the child between fork and exec (unlike preexec_fn), and
            # a failed exec is reported here as an OSError. setsid gives each epoch its own group.
            pid = os.posix_spawn(
                argv[0], list(argv), dict(env), setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        return Child(pid, out_r, err_r)

    def signal(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def kill_tree(self, pid: int, keep: Iterable[int]) -> None:
        """SIGKILL the process group `pid` and every descendant of ours outside the groups in `keep`."""
        import psutil  # here: only after an exit, never between the start and the first spawn

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        kept = set(keep)
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) not in kept:
                    process.kill()

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
        """Remove `path` if another user owns it (a file we own is left alone)."""
        try:
            if os.stat(path).st_uid != os.geteuid():
                os.unlink(path)
                log.info("Removed %s (left by another user)", path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("Cannot remove %s: %s", path, e)
