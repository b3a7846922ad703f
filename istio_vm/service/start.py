"""`istio-vm start` (and `istio-start`): the order of effects of istio-start.sh, made safe.

lock -> spawn epoch 0 (as the proxy's user) -> iptables clean + install (root) while it boots -> drop
privileges -> supervise (READY=1 only now, after the rules) -> exit status.
`init`/`-p` stop after the iptables; `run` skips them; ISTIO_CUSTOM_IP_TABLES=true skips them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from istio_vm import __version__, loggers, trust
from istio_vm.config.model import Config
from istio_vm.errors import ExitStatus, LockedError
from istio_vm.iptables.parts import ALL_PARTS, CapturePolicy, Part

if TYPE_CHECKING:
    from istio_vm.service.capture_helper import CaptureHelper
    from istio_vm.service.metrics_file import MetricsWriter
    from istio_vm.service.processes import Child
    from istio_vm.service.proxy_output import ProxyOutput

log = loggers.logger(__name__)
RUN_LOCK = "lock"  # not the iptables lock (iptables/state.py), which only one install or clean holds


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """One `istio-vm start` at a time per host: an flock on RUN_DIR/lock holding our pid."""
    trust.check_root_dir(run_dir)
    path = os.path.join(run_dir, RUN_LOCK)
    fd = trust.open_checked(path, os.O_RDWR | os.O_CREAT, 0o644, owners=(os.geteuid(),))
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


def running_pid(run_dir: str, proc_locks: str = "/proc/locks") -> int | None:
    """The pid of the running `istio-vm start`, if one holds the lock.

    The pid written in the file is believed only if that very process holds the exclusive flock on
    that very file (/proc/locks): a stale or forged number is never signalled.
    """
    path = os.path.join(run_dir, RUN_LOCK)
    trust.check_root_dir(run_dir, create=False)
    try:
        fd = trust.open_checked(path, os.O_RDONLY, owners=(0,) if os.geteuid() == 0 else None)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            holders = flock_holders(os.fstat(fd), proc_locks)
            if text.isdigit() and int(text) in holders:
                return int(text)
            raise LockedError(f"{path} names pid {text or '(none)'}, but the lock is held by "
                              f"{', '.join(map(str, sorted(holders))) or 'no process found'}: not signalling") from None
        return None  # nobody holds it
    finally:
        os.close(fd)


def flock_holders(st: os.stat_result, proc_locks: str = "/proc/locks") -> set[int]:
    """Pids holding an exclusive flock on the file of `st`, from /proc/locks
    ("1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; the device in hex, the inode in decimal)."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open(proc_locks, encoding="ascii", errors="replace") as f:
        for line in f:
            words = line.split()
            if "->" in words:  # a waiter, not a holder
                continue
            if (len(words) >= 6 and words[1] == "FLOCK" and words[3] == "WRITE" and words[5] == device
                    and words[4].isdigit()):
                holders.add(int(words[4]))
    return holders


def raise_nofile() -> None:
    """Envoy needs many file descriptors: soft limit = hard limit, inherited by the proxy (#47802)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("RLIMIT_NOFILE %s", hard)


@contextlib.contextmanager
def _ignored_until_the_loop(supervising: bool) -> Iterator[None]:
    """`istio-vm reload` (SIGHUP) and `iptables verify` (SIGUSR2) signal the run lock's holder, and both
    signals kill by default: ignored until the loop queues them. Ignoring would be inherited across exec,
    but the loop's handlers are in place before the first spawn (exec resets a handler to the default)."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGHUP, signal.SIGUSR2)
                if supervising}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start(config: Config, mode: str, *, install_iptables: Callable[[Config, frozenset[Part]], object]) -> int:
    """Run `istio-start [init|run|""]` (`clean` is `istio-vm iptables clean`); returns the exit status."""
    log.info("istio-vm %s starting (mode %s)", __version__, mode or "default")  # which release runs, in the journal
    with _ignored_until_the_loop(mode != "init"), run_lock(config.supervision.run_dir):
        if mode == "init":
            install_iptables(config, ALL_PARTS)  # `init` supervises nothing: 1.9's plan
            return ExitStatus.OK
        check_root_proxy(config)  # before the rules: a refusal changes nothing (exit 78)
        return supervise(config, install_iptables=install_iptables if mode == "" else None)


def starting_parts(config: Config) -> frozenset[Part]:
    """What `start` installs: with an open policy only the parts that stay while no epoch is ready, since
    none is yet (installing all and lifting once supervising would send the VM's connections to a proxy
    that is not listening for as long as the helper's first restore takes; fail-closed: everything)."""
    return CapturePolicy(config.supervision.capture_policy).parts(proxy_ready=False)


def check_root_proxy(config: Config) -> None:
    """When the proxy would run as root (TPROXY: EXEC_USER root), every file it runs or reads its
    configuration from must be one only root can change: else any user who can write it is root."""
    if config.agent.exec_user.uid != 0 or os.geteuid() != 0:
        return
    from istio_vm.service.proxy_command import proxy_command

    command = proxy_command(config, {})
    paths = [("ENVOY_BINARY" if command.hot_restart else "ISTIO_BIN_BASE/pilot-agent", command.argv(0)[0])]
    if command.hot_restart:
        paths.append(("ENVOY_BOOTSTRAP", config.supervision.envoy_bootstrap))
    for what, path in paths:
        trust.check_root_path(path, f"{what} (the proxy runs as root)")


def capture_helper_for(config: Config, *, installed: bool, on: frozenset[Part] = ALL_PARTS) -> CaptureHelper | None:
    """The privileged helper, for a policy with parts that follow the proxy and rules we installed (`on`)."""
    policy = CapturePolicy(config.supervision.capture_policy)
    if not policy.follows_proxy:
        return None  # without importing the capture helper's module (and its apply engine)
    from istio_vm.iptables.commands import owners_of
    from istio_vm.iptables.plan import build_plan
    from istio_vm.service.capture_helper import start_helper

    if not installed:
        log.warning("ISTIO_VM_CAPTURE=%s: no rules were installed by this start, so capture does not follow "
                    "the proxy", policy)
        return None
    return start_helper(build_plan(config.capture), policy=str(policy), run_dir=config.supervision.run_dir,
                        backend=config.iptables.backend, on=on, owners=owners_of(config))


def metrics_writer(config: Config, *, installed: bool) -> MetricsWriter | None:
    """ISTIO_VM_METRICS_FILE's writer (None: not set), with the rule counts of each capture state when this
    start installed the rules; as root, the previous run's verify result is dropped."""
    from istio_vm.iptables.parts import plan_with
    from istio_vm.iptables.plan import build_plan
    from istio_vm.service.metrics_file import MetricsWriter, forget_verify

    forget_verify(config.supervision.run_dir)
    if not config.supervision.metrics_file:
        return None
    rules = None
    if installed:
        plan = build_plan(config.capture)
        counts: dict[frozenset[Part], dict[int, int]] = {}
        for on in (ALL_PARTS, *(ALL_PARTS - {part} for part in ALL_PARTS), frozenset()):
            switched = plan_with(plan, on)
            counts[on] = {4: len(switched.v4), 6: len(switched.v6)}
        rules = counts.__getitem__
    return MetricsWriter(config.supervision.metrics_file, config.supervision.run_dir, __version__,
                         config.supervision.capture_policy, rules)


def supervise(config: Config, *,
              install_iptables: Callable[[Config, frozenset[Part]], object] | None = None) -> int:
    """Start the proxy, install the rules (`install_iptables`, if given: the parts `starting_parts` names)
    while it boots, drop privileges and run the loop until the proxy is stopped: the composition root of
    the service.

    The supervisor's modules are imported here: `istio-start init` (the iptables only) and `istio-vm
    reload` do not pay for them (psutil, http.client, systemd); and only those that start the proxy are
    imported before its spawn (the iptables wing and the loop's are imported while it boots).
    """
    from istio_vm.service import privileges, processes
    from istio_vm.service.processes import RealProcessOps, become_subreaper
    from istio_vm.service.proxy_command import proxy_command

    identity = privileges.resolve(config.agent.exec_user)
    become_subreaper()
    raise_nofile()
    command = proxy_command(config, identity.environment())
    # Root's last chores: what a killed predecessor left behind, which the proxy's user could not undo.
    processes.kill_leftovers(config.supervision.run_dir)
    children = processes.open_children_file(config.supervision.run_dir)
    if command.shared_memory is not None:
        processes.remove_foreign(command.shared_memory, identity.uid)
    ops = RealProcessOps(children, user=None if identity.uid == 0 else identity.credentials())
    # Epoch 0 is spawned now, still as root (the child switches to the proxy's user before its exec, and
    # gets the signals the loop will catch at their defaults), so that Envoy's own start (~60-90 ms)
    # overlaps the rest: the iptables install, the imports of the loop. The loop adopts the epoch; READY=1
    # only comes from the loop's probe, after the rules are in. The rules' order is unchanged (the install
    # still removes what it finds and adds the starting parts atomically per family, and the capture
    # helper starts after it); a failed install kills the epoch before its error ends the start, with the
    # status and message it always had.
    first: Child | OSError
    try:
        first = ops.spawn(command.argv(0), command.environment, record=False)
    except OSError as e:  # the loop's first spawn fails as a later one would (spawn_failed, backoff)
        first = e
    helper: CaptureHelper | None = None
    output: ProxyOutput | None = None
    try:
        on = starting_parts(config)
        installed = install_iptables is not None and install_iptables(config, on) is not None
        if not isinstance(first, OSError):
            ops.record(first.pid)
        from istio_vm import logs
        from istio_vm.service import reload
        from istio_vm.service.loop import SIGNALS, Loop
        from istio_vm.service.machine import Policy, Supervisor
        from istio_vm.service.notify import Notifier, watchdog_interval
        from istio_vm.service.proxy_admin import admin_for
        from istio_vm.service.proxy_output import ProxyOutput
        from istio_vm.service.signals import captured

        capture = installed and not config.iptables.dry_run
        # Before the drop: the helper stays root (NET_ADMIN/RAW only).
        helper = capture_helper_for(config, installed=capture, on=on)
        metrics = metrics_writer(config, installed=capture)
        reloads = reload.prepare(config, iptables=install_iptables is not None)
        privileges.drop_to(identity)
        output = ProxyOutput(logs.choose_target(config.supervision.log_target), name=command.name,
                             log_dir=config.agent.log_dir)
    except BaseException:
        if not isinstance(first, OSError):
            processes.discard(first)
        _close(children, helper, output)
        raise
    policy = Policy.of(config.supervision, hot_restart=command.hot_restart)
    if helper is not None:
        import dataclasses  # after the spawn, like the machine's own dataclasses

        policy = dataclasses.replace(policy, capture_follows=CapturePolicy(config.supervision.capture_policy)
                                     .follows_proxy)
    supervisor = Supervisor(policy)
    try:
        # SIGCHLD wakes the loop's select; SIGUSR2: a verify recorded its result for the metrics file.
        with captured((*SIGNALS, signal.SIGUSR2, signal.SIGCHLD)) as queue:
            loop = Loop(supervisor, command, ops, Notifier(), output, admin_for(command),
                        watchdog_interval=watchdog_interval(os.environ, os.getpid()), capture=helper,
                        reloads=reloads, metrics=metrics, first=first)
            return loop.run(queue)
    finally:
        _close(children, helper, output)


def _close(children: int, helper: CaptureHelper | None, output: ProxyOutput | None) -> None:
    if output is not None:
        output.close()
    os.close(children)
    if helper is not None:
        helper.close()
