"""`istio-vm start` (and `istio-start`): the order of effects of istio-start.sh, made safe.

lock -> iptables clean + install (root) -> drop privileges -> supervise -> exit status.
`init`/`-p` stop after the iptables; `run` skips them; ISTIO_CUSTOM_IP_TABLES=true skips them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import signal
from collections.abc import Callable, Iterator

from istio_vm import logs
from istio_vm.config.model import Config
from istio_vm.errors import ExitStatus, IstioVmError
from istio_vm.service import privileges
from istio_vm.service.loop import Daemon, admin_for
from istio_vm.service.notify import Notifier
from istio_vm.service.processes import RealProcessOps, become_subreaper
from istio_vm.service.signals import captured

log = logging.getLogger(__name__)
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
LOCK_FILE = "lock"


class LockedError(IstioVmError):
    status = ExitStatus.LOCKED


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """One `istio-vm start` at a time per host: an flock on RUN_DIR/lock holding our pid."""
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"another istio-vm start is running (pid {holder}, lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield  # the fd stays open (and locked) across the privilege drop, until we exit
    finally:
        os.close(fd)


def running_pid(run_dir: str) -> int | None:
    """The pid of the running `istio-vm start`, if one holds the lock."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None  # nobody holds it
    finally:
        os.close(fd)


def raise_nofile() -> None:
    """Envoy needs many file descriptors: soft limit = hard limit, inherited by the proxy (#47802)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("RLIMIT_NOFILE %s", hard)


def start(config: Config, mode: str, *, install_iptables: Callable[[Config], object]) -> int:
    """Run `istio-start [init|run|""]` (`clean` is `istio-vm iptables clean`); returns the exit status."""
    with run_lock(config.supervision.run_dir):
        if mode in ("", "init"):
            install_iptables(config)
        if mode == "init":
            return ExitStatus.OK
        return supervise(config)


def supervise(config: Config) -> int:
    identity = privileges.resolve(config.agent.exec_user)
    become_subreaper()
    raise_nofile()
    privileges.drop_to(identity)
    target = logs.choose_target(config.supervision.log_target)
    name = "envoy" if config.supervision.proxy == "envoy" else "pilot-agent"
    output = logs.ChildOutput(target, name=name, log_dir=config.agent.log_dir)
    watchdog = _watchdog_interval()
    try:
        with captured(HANDLED) as queue:
            daemon = Daemon(config, RealProcessOps(), Notifier(), output, admin_for(config),
                            identity_env=identity.environment(), watchdog_interval=watchdog)
            return daemon.run(queue)
    finally:
        output.close()


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
