"""`istio-vm reload`: re-read and validate the files, then apply them, or change nothing; and its supervisor side.

The supervisor runs unprivileged after the drop and cannot run iptables, so the reload's root part runs
in `istio-vm reload` itself (ExecReload=+, as root): it validates, installs the new plan (one atomic
restore per family), writes the proxy's new settings to a request file in the root-owned run dir and
sends SIGHUP; the supervisor applies them and answers in a directory of its own, which reload waits for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from istio_vm import loggers, trust
from istio_vm.config.model import Config
from istio_vm.config.settings import BY_NAME
from istio_vm.errors import ConfigError, ExitStatus, IstioVmError, LockedError, Problem, UntrustedPathError
from istio_vm.service import privileges
from istio_vm.service.machine import Policy
from istio_vm.service.proxy_command import ProxyCommand, proxy_command

log = loggers.logger(__name__)

RUNNING = "running.json"  # run dir (root's): what `start` runs with, written before the privilege drop
REQUEST = "reload-request.json"  # run dir (root's): the new settings of one reload
OWN_DIR = "supervisor"  # run dir/supervisor, owned by the user the supervisor drops to: its answers
RESULT = "reload-result.json"
RELOAD_LOCK = "reload.lock"
WAIT_INTERVAL = 0.05
# What a reload cannot change: the identity and directories the supervisor was set up with, the proxy kind,
# the hot-restart memory and admin port both epochs share, and who owns the rules (a backend or mode change
# would leave the old rules where the new install does not look).
RESTART_ONLY = ("EXEC_USER", "ISTIO_VM_RUN_DIR", "ISTIO_VM_PROXY", "ISTIO_LOG_TARGET", "ISTIO_LOG_DIR",
                "ENVOY_BASE_ID", "ENVOY_ADMIN_PORT", "ISTIO_CUSTOM_IP_TABLES", "ISTIO_IPTABLES_BACKEND",
                "ISTIO_INBOUND_INTERCEPTION_MODE", "ISTIO_VM_CAPTURE", "ISTIO_VM_METRICS_FILE")


class ReloadError(IstioVmError):
    """The reload was not carried out (or failed half-way); the message says what is in effect."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.FAILURE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    command: ProxyCommand
    policy: Policy
    rules: tuple[tuple[int, int], ...] | None = None  # (family, count) of the plan reload installed; None: none

    def to_json(self) -> str:
        command = self.command._asdict()
        command["environment"] = dict(self.command.environment)
        policy = dataclasses.asdict(self.policy)
        policy.pop("capture_follows")  # ISTIO_VM_CAPTURE needs a restart: the supervisor keeps its own
        return json.dumps({"id": self.id, "command": command, "policy": policy,
                           "rules": None if self.rules is None else [list(r) for r in self.rules]})

    @classmethod
    def from_json(cls, text: str) -> Request:
        data = json.loads(text)
        c = data["command"]
        command = ProxyCommand(**{**c, "before_epoch": tuple(c["before_epoch"]),
                                  "after_epoch": tuple(c["after_epoch"])})
        rules = data.get("rules")
        return cls(str(data["id"]), command, Policy(**data["policy"]),
                   None if rules is None else tuple((int(f), int(n)) for f, n in rules))


def restart_only(config: Config) -> dict[str, str]:
    return {name: config.value(name).value for name in RESTART_ONLY}


def rule_counts(config: Config) -> tuple[tuple[int, int], ...]:
    """The rules of the config's plan per family, every part on (for the metrics file)."""
    from istio_vm.iptables.plan import build_plan

    plan = build_plan(config.capture)
    return (4, len(plan.v4)), (6, len(plan.v6))


def helper_plan(config: Config) -> str | None:
    """The rules the capture helper was started with (its digest), when the policy has parts that follow the
    proxy; None under fail-closed. That root helper switches parts of the plan it was given at start, so a
    reload that changes the plan would leave it switching the old rules: such a change needs a restart."""
    import hashlib

    from istio_vm.iptables.parts import CapturePolicy
    from istio_vm.iptables.plan import build_plan

    if not CapturePolicy(config.supervision.capture_policy).follows_proxy:
        return None
    return hashlib.sha256(repr(build_plan(config.capture)).encode()).hexdigest()


# ---- the supervisor's side (set up by start as root, used unprivileged by the loop) --------------------------
def prepare(config: Config, *, iptables: bool) -> ReloadChannel:
    """As root, before the drop: record what runs (the pid reload signals), clear a previous run's request.

    The supervisor's own directory is made by `istio-vm reload`: chown(2) needs CAP_CHOWN, which the unit's
    bounding set leaves out, while ExecReload=+ runs with full privileges.
    """
    run_dir = config.supervision.run_dir
    for stale in (os.path.join(run_dir, REQUEST), os.path.join(run_dir, OWN_DIR, RESULT)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    # The environment too: reload must build the proxy's from start's, not from its own (ExecReload's has
    # MAINPID and another JOURNAL_STREAM). Root's only (0600): a unit's Environment= may hold secrets.
    trust.write_atomic(run_dir, RUNNING, json.dumps(
        {"pid": os.getpid(), "iptables": iptables, "settings": restart_only(config),
         "helper_plan": helper_plan(config) if iptables else None, "environment": dict(os.environ)}) + "\n", 0o600)
    return ReloadChannel(run_dir)


def start_environment(run_dir: str) -> dict[str, str] | None:
    """The process environment of the running `istio-vm start` (None: none recorded)."""
    try:
        return _running(run_dir).environment
    except ReloadError:
        return None


@dataclass
class ReloadChannel:
    """The loop's end: the request of the latest `istio-vm reload`, and where its outcome goes."""

    run_dir: str
    _seen: set[str] = dataclasses.field(default_factory=set)

    def take(self) -> Request | None:
        """The new request (None: none, or one already handled; then SIGHUP was a plain `kill -HUP`)."""
        try:
            with open(os.path.join(self.run_dir, REQUEST), encoding="utf-8") as f:
                request = Request.from_json(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("Reload request unreadable: %s", e, extra={"ISTIO_EVENT": "reload"})
            return None
        if request.id in self._seen:
            return None
        self._seen.add(request.id)
        return request

    def report(self, request: str, ok: bool, message: str) -> None:
        try:
            trust.replace_file(os.path.join(self.run_dir, OWN_DIR, RESULT),
                               json.dumps({"id": request, "ok": ok, "message": message}) + "\n", 0o644)
        except OSError as e:  # the reload then times out, saying so; the supervisor carries on
            log.error("Cannot write the reload result: %s", e, extra={"ISTIO_EVENT": "reload"})


# ---- `istio-vm reload` (root) ---------------------------------------------------------------------------------
def reload(config: Config, *, install_iptables: Callable[[Config], object], timeout: float = 90.0) -> str:
    """Apply `config` (valid: the caller loaded it) to the running `istio-vm start`; the outcome in words.

    Raises ConfigError (78) when a setting needs a restart, LockedError (75) while another reload runs,
    ReloadError otherwise; nothing has changed then unless its message says so.
    """
    run_dir = config.supervision.run_dir
    running = _running(run_dir)
    changed = [(name, old, config.value(name)) for name, old in running.settings.items()
               if name in BY_NAME and config.value(name).value != old]
    if changed:
        raise ConfigError(Problem(value.source, BY_NAME[name].variable, value.value,
                                  f"cannot change while istio-sidecar runs (running: {old!r}): "
                                  "systemctl restart istio-sidecar") for name, old, value in changed)
    if running.helper_plan is not None and helper_plan(config) != running.helper_plan:
        policy = config.value("ISTIO_VM_CAPTURE")
        raise ConfigError([Problem(policy.source, "ISTIO_VM_CAPTURE", policy.value,
                                   "the capture rules cannot change while istio-sidecar runs under this policy "
                                   "(its helper switches the rules it started with): systemctl restart "
                                   "istio-sidecar")])
    identity = privileges.resolve(config.agent.exec_user)
    command = proxy_command(config, identity.environment())
    request = Request(uuid.uuid4().hex, command, Policy.of(config.supervision, hot_restart=command.hot_restart),
                      rule_counts(config) if running.iptables else None)
    with _reload_lock(run_dir):
        # Under an open policy the plan is the one the helper holds (checked above), and which of its parts
        # are on follows the proxy: installing the whole plan now would capture for a proxy that may be down.
        if running.iptables and running.helper_plan is None:
            install_iptables(config)  # atomic per family; on failure rolled back, and the proxy is left alone
        own = os.path.join(run_dir, OWN_DIR)
        os.makedirs(own, mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(own, RESULT))
        path = os.path.join(run_dir, REQUEST)
        trust.write_atomic(run_dir, REQUEST, request.to_json(), 0o400)
        if os.geteuid() == 0:
            os.chown(own, identity.uid, identity.gid)  # where the supervisor (that user) answers
            os.chown(path, identity.uid, identity.gid)  # the proxy's environment may hold what only it may read
        os.kill(running.pid, signal.SIGHUP)
        log.info("Sent the new settings to istio-vm start (pid %s); waiting for the proxy", running.pid)
        outcome = _wait(os.path.join(run_dir, OWN_DIR, RESULT), request.id, timeout)
    rules = "the new iptables rules are installed; " if running.iptables and running.helper_plan is None else ""
    if outcome is None:
        raise ReloadError(f"no answer from istio-vm start within {timeout:g}s ({rules}see journalctl -u "
                          "istio-sidecar)")
    if not outcome["ok"]:
        status = ExitStatus.LOCKED if str(outcome["message"]).endswith("try again") else ExitStatus.FAILURE
        raise ReloadError(f"reload failed: {outcome['message']} ({rules or 'nothing changed'})", status)
    return str(outcome["message"])


@dataclass(frozen=True, slots=True)
class _Running:
    pid: int
    iptables: bool
    settings: dict[str, str]
    environment: dict[str, str]
    helper_plan: str | None = None  # see helper_plan()


def _running(run_dir: str) -> _Running:
    """The running start: the lock's holder, and what it recorded (the same pid, or it is not ours)."""
    from istio_vm.service.start import running_pid

    pid = running_pid(run_dir)
    try:
        with open(os.path.join(run_dir, RUNNING), encoding="utf-8") as f:
            data = json.load(f)
        running = _Running(int(data["pid"]), bool(data["iptables"]),
                           {str(k): str(v) for k, v in data["settings"].items()},
                           {str(k): str(v) for k, v in data["environment"].items()},
                           None if data.get("helper_plan") is None else str(data["helper_plan"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        running = None
    if pid is None or running is None or running.pid != pid:
        raise ReloadError(f"no istio-vm start is running (no lock held in {run_dir}; did ISTIO_VM_RUN_DIR "
                          "change? that needs a restart)")
    return running


@contextlib.contextmanager
def _reload_lock(run_dir: str) -> Iterator[None]:
    fd = os.open(os.path.join(run_dir, RELOAD_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError("another istio-vm reload is under way: try again") from None
        yield
    finally:
        os.close(fd)


def _wait(path: str, request: str, timeout: float) -> dict[str, object] | None:
    """The supervisor's answer to `request`, polled until `timeout` (a file: the supervisor holds no socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # as root, in a directory the proxy's user owns: a link planted there is not followed
            with open(trust.open_checked(path, os.O_RDONLY), encoding="utf-8") as f:
                answer = json.load(f)
        except (FileNotFoundError, ValueError, UntrustedPathError):
            answer = None
        if isinstance(answer, dict) and answer.get("id") == request:
            return answer
        time.sleep(WAIT_INTERVAL)
    return None
