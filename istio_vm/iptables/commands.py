"""The iptables commands of istio-start.sh, on top of the rule plan and the apply engine.

install = remove the Istio state found + install the plan (atomic per family, rolled back on failure);
clean = remove what is found (needs no plan, so an edited env file cannot leave rules behind);
verify = compare; tracer = what `iptables trace` follows flows through (the plan, or the live rules,
whoever wrote them). The first three honour ISTIO_CUSTOM_IP_TABLES; install and clean honour DRY_RUN, and log
1.9's 'Environment:'/'Variables:' dumps and the rules written at info level, as 1.9 did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from istio_vm import loggers
from istio_vm.config import render
from istio_vm.config.checks import go_bool
from istio_vm.config.model import Config, Shell
from istio_vm.config.resolve import lenient
from istio_vm.errors import capped
from istio_vm.iptables import apply, capture_state
from istio_vm.iptables.found import Owners
from istio_vm.iptables.parts import ALL_PARTS, CapturePolicy, Part, describe_parts, plan_with
from istio_vm.iptables.plan import build_plan

if TYPE_CHECKING:
    from istio_vm.iptables.runner import Runner
    from istio_vm.iptables.trace import Tracer
    from istio_vm.iptables.verify import VerifyResult

log = loggers.logger(__name__)
CUSTOM = "ISTIO_CUSTOM_IP_TABLES=true: iptables are left alone"


def install(config: Config, on: frozenset[Part] = ALL_PARTS) -> apply.Report | None:
    """The plan with the parts `on` (every part: 1.9's plan; `istio-vm start` with an open policy: the
    parts that stay while no epoch is ready), recorded in the run dir for verify when not all."""
    if config.iptables.custom:
        log.info(CUSTOM)
        return None
    for line in render.istio_dumps(config):
        log.info("%s", line)
    plan = plan_with(build_plan(config.capture), on)
    if config.iptables.skip_rule_apply:
        log.info("SKIP_RULE_APPLY=true: no rules installed")
        return None
    report = apply.install_plan(plan, backend=config.iptables.backend, run_dir=config.supervision.run_dir,
                                dry_run=config.iptables.dry_run, owners=owners_of(config))
    if not config.iptables.dry_run:
        if on >= ALL_PARTS:
            capture_state.remove_expected(config.supervision.run_dir)  # the whole plan: nothing to say
        else:
            capture_state.write_expected(config.supervision.run_dir, config.supervision.capture_policy, on)
    _log_report("install", report)
    return report


def owners_of(config: Config) -> Owners:
    """The values this configuration gives 1.9's built-in-chain rules (found.Owners)."""
    c = config.capture
    return Owners.of(uids=c.proxy_uid, gids=c.proxy_gid, marks=c.inbound_tproxy_mark, interfaces=c.kubevirt_interfaces)


def lift(config: Config) -> apply.Report | None:
    """The parts of ISTIO_VM_CAPTURE's policy that follow the proxy off, the others as installed: for the
    time systemd takes to restart istio-vm (fail-closed: nothing to do)."""
    policy = CapturePolicy(config.supervision.capture_policy)
    if not policy.follows_proxy or config.iptables.custom or config.iptables.skip_rule_apply:
        return None
    on = policy.parts(proxy_ready=False)
    report = apply.install_plan(plan_with(build_plan(config.capture), on), backend=config.iptables.backend,
                                run_dir=config.supervision.run_dir, dry_run=config.iptables.dry_run,
                                owners=owners_of(config))
    if not config.iptables.dry_run:
        capture_state.write_expected(config.supervision.run_dir, str(policy), on)
    log.info("capture: %s until istio-vm is back (ISTIO_VM_CAPTURE=%s)", describe_parts(on), policy,
             extra={"ISTIO_EVENT": "capture", "ISTIO_CAPTURE": describe_parts(on)})
    return report


class CleanSettings(NamedTuple):
    custom: bool
    backend: str | None
    run_dir: str
    dry_run: bool
    owners: Owners = Owners()

    @classmethod
    def from_shell(cls, shell: Shell) -> CleanSettings:
        """From possibly broken env files: each setting if valid, else its default (and a warning)."""
        values, problems = lenient(shell, "ISTIO_CUSTOM_IP_TABLES", "ISTIO_IPTABLES_BACKEND", "ISTIO_VM_RUN_DIR",
                                   "DRY_RUN", "PROXY_UID", "PROXY_GID", "ENVOY_USER", "ISTIO_INBOUND_TPROXY_MARK",
                                   "KUBE_VIRT_INTERFACES")
        for line in capped(problems):
            log.warning("ignored for clean: %s", line)
        uids = values["PROXY_UID"] or _uid_of(values["ENVOY_USER"])
        owners = Owners.of(uids=uids, gids=values["PROXY_GID"] or uids, marks=values["ISTIO_INBOUND_TPROXY_MARK"],
                           interfaces=values["KUBE_VIRT_INTERFACES"])
        return cls(values["ISTIO_CUSTOM_IP_TABLES"] == "true", values["ISTIO_IPTABLES_BACKEND"] or None,
                   values["ISTIO_VM_RUN_DIR"], go_bool(values["DRY_RUN"]), owners)


def _uid_of(user: str) -> str:
    """PROXY_UID's default, as istio-iptables derives it: ENVOY_USER's uid ("" if there is none)."""
    import pwd

    try:
        return str(pwd.getpwnam(user).pw_uid)
    except KeyError:
        return ""


def clean(settings: CleanSettings) -> apply.Report | None:
    if settings.custom:
        log.info(CUSTOM)
        return None
    report = apply.clean_host(backend=settings.backend, run_dir=settings.run_dir, dry_run=settings.dry_run,
                              owners=settings.owners)
    if not settings.dry_run:
        capture_state.remove_expected(settings.run_dir)
    _log_report("clean", report)
    return report


def verify(config: Config) -> VerifyResult:
    from istio_vm.iptables.verify import compare

    plan = build_plan(config.capture)
    recorded = capture_state.read_expected(config.supervision.run_dir)
    if recorded is not None:  # a fail-open policy's service switched parts: compare with what it says is on
        policy, on = recorded
        log.info("capture: %s by ISTIO_VM_CAPTURE=%s (%s/%s)", describe_parts(on), policy,
                 config.supervision.run_dir, capture_state.CAPTURE_FILE)
        plan = plan_with(plan, on)
    return compare(plan, backend=config.iptables.backend, run_dir=config.supervision.run_dir,
                   owners=owners_of(config))


def _log_report(what: str, report: apply.Report) -> None:
    log.info("iptables %s%s: %s", what, " (dry run: nothing changed)" if report.dry_run else "", report.summary())
    for family in report.families:
        if family.restore_input:
            log.info("%s IPv%s input to iptables-restore:\n%s", "Would write" if report.dry_run else "Wrote",
                     family.family, family.restore_input.rstrip())


def tracer(config: Config, *, live: bool, runner: Runner | None = None) -> Tracer:
    """`iptables trace`'s tracer: over this configuration's plan, or (live) the rules on this host now,
    read with the engine's backend; the host's addresses, and with live the kernel's routes."""
    from istio_vm.config.load import interface_addresses
    from istio_vm.iptables import explain, state, trace
    from istio_vm.iptables.backend import take
    from istio_vm.iptables.runner import SubprocessRunner

    addresses = interface_addresses()
    outside = [a for a in addresses if not a.interface_is_loopback and a.interface_is_up]
    sources: dict[int, str] = {}
    for address in outside:
        sources.setdefault(6 if ":" in address.ip else 4, address.ip.split("%")[0])
    run = runner or SubprocessRunner()
    host = trace.HostView(frozenset(a.ip.split("%")[0] for a in addresses),
                          outside[0].interface if outside else "eth0",
                          route=(lambda dst: _route_dev(run, dst)) if live else None, sources=sources)
    planned = trace.tracer_for_plan(build_plan(config.capture), host, lambda rule: explain.origin(rule, config))
    if not live:
        return planned
    recorded = state.read(config.supervision.run_dir).backend
    snap = take(run, override=config.iptables.backend, recorded=recorded, optional={6})
    return trace.tracer_for_saves(snap.saves, host, planned)


def _route_dev(runner: Runner, dst: str) -> str | None:
    """The output interface the kernel's routing picks for dst (`ip route get`), None when it has none."""
    done = runner.run(["ip", "route", "get", dst], timeout=10)
    words = done.stdout.split()
    return words[words.index("dev") + 1] if done.ok and "dev" in words[:-1] else None
