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

from istio_vm import __version__
from istio_vm.config.model import Config
from istio_vm.errors import ExitStatus, LockedError

log = logging.getLogger(__name__)
RUN_LOCK = "lock"  # not the iptables lock (iptables/state.py), which only one install or clean holds


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """One `istio-vm start` at a time per host: an flock on RUN_DIR/lock holding our pid."""
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    path = os.path.join(run_dir, RUN_LOCK)
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
    path = os.path.join(run_dir, RUN_LOCK)
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
    log.info("istio-vm %s starting (mode %s)", __version__, mode or "default")  # which release runs, in the journal
    with run_lock(config.supervision.run_dir):
        if mode in ("", "init"):
            install_iptables(config)
        if mode == "init":
            return ExitStatus.OK
        return supervise(config)


def supervise(config: Config) -> int:
    """Drop privileges and run the loop until the proxy is stopped: the composition root of the service.

    The supervisor's modules are imported here: `istio-start init` (the iptables only) and `istio-vm
    reload` do not pay for them (psutil, http.client, systemd).
    """
    from istio_vm import logs
    from istio_vm.service import privileges
    from istio_vm.service.loop import SIGNALS, Loop
    from istio_vm.service.machine import Policy, Supervisor
    from istio_vm.service.notify import Notifier, watchdog_interval
    from istio_vm.service.processes import RealProcessOps, become_subreaper
    from istio_vm.service.proxy_admin import admin_for
    from istio_vm.service.proxy_command import proxy_command
    from istio_vm.service.proxy_output import ProxyOutput
    from istio_vm.service.signals import captured

    identity = privileges.resolve(config.agent.exec_user)
    become_subreaper()
    raise_nofile()
    privileges.drop_to(identity)
    command = proxy_command(config, identity.environment())
    output = ProxyOutput(logs.choose_target(config.supervision.log_target), name=command.name,
                         log_dir=config.agent.log_dir)
    supervisor = Supervisor(Policy.of(config.supervision, hot_restart=command.hot_restart))
    try:
        with captured((*SIGNALS, signal.SIGCHLD)) as queue:  # SIGCHLD wakes the loop's select
            loop = Loop(supervisor, command, RealProcessOps(), Notifier(), output, admin_for(command),
                        watchdog_interval=watchdog_interval(os.environ, os.getpid()))
            return loop.run(queue)
    finally:
        output.close()
