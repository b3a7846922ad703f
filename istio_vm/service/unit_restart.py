"""Is systemd about to start the unit again? What `iptables clean --unless-restarting UNIT` asks before it cleans.

Fail-closed capture stays while istio-vm is restarted (after a crash, `systemctl restart`) and goes when
the unit stops for good. ExecStopPost= cannot see systemd's restart decision, so it is re-derived here
from what it can see: $SERVICE_RESULT/$EXIT_CODE/$EXIT_STATUS, the unit's Restart= settings and its
queued jobs (`systemctl`). When the restart then never comes (start limit hit), the unit enters
`failed` and its OnFailure= unit asks again, and cleans.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from istio_vm import loggers
from istio_vm.errors import LockedError

log = loggers.logger(__name__)

COMING_BACK_JOBS = ("restart", "start", "try-restart", "reload-or-start")  # list-jobs' TYPE column
CLEAN_SIGNALS = ("HUP", "INT", "TERM", "PIPE")  # systemd.service(5): a clean exit, like status 0
PROPERTIES = ("ActiveState", "SubState", "Restart", "RestartPreventExitStatus")
SYSTEMCTL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class UnitFacts:
    """What systemd shows of the unit, and what ExecStopPost= is told about the run that just ended."""

    active_state: str
    sub_state: str
    restart: str  # Restart=: no, always, on-success, on-failure, on-abnormal, on-abort, on-watchdog
    restart_prevent: tuple[str, ...]  # RestartPreventExitStatus=: exit statuses and signal names
    jobs: tuple[str, ...]  # the types of the unit's queued jobs
    service_result: str | None = None  # $SERVICE_RESULT: only set for ExecStop=/ExecStopPost=
    exit_code: str | None = None  # $EXIT_CODE: exited, killed, dumped
    exit_status: str | None = None  # $EXIT_STATUS: a number, or a signal name without SIG


def _would_restart(f: UnitFacts) -> bool:
    """systemd.service(5)'s table of Restart= against how the main process ended."""
    status = (f.exit_status or "").removeprefix("SIG")
    if f.exit_code in ("exited", "killed", "dumped") and (
            status in f.restart_prevent or f"SIG{status}" in f.restart_prevent):
        return False
    clean = f.service_result == "success" or (f.exit_code == "killed" and status in CLEAN_SIGNALS)
    kind = {"success": "clean", "exit-code": "exit", "signal": "signal", "core-dump": "signal",
            "timeout": "timeout", "watchdog": "watchdog"}.get(f.service_result or "", "failure")
    if clean:
        return f.restart in ("always", "on-success")
    return f.restart == "always" or (f.restart == "on-failure") or (
        f.restart == "on-abnormal" and kind in ("signal", "timeout", "watchdog")) or (
        f.restart == "on-abort" and kind == "signal") or (f.restart == "on-watchdog" and kind == "watchdog")


def coming_back(f: UnitFacts) -> str | None:
    """Why systemd will start the unit again (keep the capture), or None (it is gone for good: clean)."""
    for job in f.jobs:
        # In ExecStopPost= a start job is the start that is failing right now: Restart= decides below.
        if job in COMING_BACK_JOBS and not (job == "start" and f.service_result is not None):
            return f"a {job} job is queued"
    if "stop" in f.jobs:
        return None  # systemctl stop: no restart follows, whatever the result
    if f.service_result is not None:  # ExecStopPost=: the unit is deactivating; systemd decides next
        if _would_restart(f):
            return (f"Restart={f.restart} restarts after {f.service_result} ({f.exit_code} {f.exit_status}); "
                    "if the start limit stops it, OnFailure= cleans")
        return None
    if f.active_state in ("active", "activating", "reloading"):
        return f"the unit is {f.active_state} ({f.sub_state})"
    return None


def systemctl_facts(unit: str, environ: Mapping[str, str],
                    run: Callable[[list[str]], str] | None = None) -> UnitFacts:
    """The unit's facts from `systemctl show` and `systemctl list-jobs`, and the ExecStopPost= variables."""
    run = run or _systemctl
    shown = dict(line.split("=", 1) for line in run(
        ["show", f"--property={','.join(PROPERTIES)}", unit]).splitlines() if "=" in line)
    jobs = tuple(words[2] for line in run(["list-jobs", "--no-legend", "--full", unit]).splitlines()
                 if len(words := line.split()) >= 3 and words[1] == unit)
    return UnitFacts(shown.get("ActiveState", ""), shown.get("SubState", ""), shown.get("Restart", "no"),
                     tuple(shown.get("RestartPreventExitStatus", "").split()), jobs,
                     environ.get("SERVICE_RESULT"), environ.get("EXIT_CODE"), environ.get("EXIT_STATUS"))


def _systemctl(args: list[str]) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        raise OSError(f"systemctl {' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


def clean_unless_restarting(unit: str, environ: Mapping[str, str], clean: Callable[[], object], *,
                            run_dir: str, facts: Callable[[], UnitFacts] | None = None,
                            lift: Callable[[], object] = lambda: None) -> None:
    """Clean, unless systemd is about to start `unit` again or an `istio-vm start` runs; when it restarts,
    `lift` the parts the capture policy keeps on only while a proxy is ready (none for fail-closed)."""
    from istio_vm.service.start import run_lock

    try:
        reason = coming_back((facts or (lambda: systemctl_facts(unit, environ)))())
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot tell whether %s restarts (%s): cleaning", unit, e)
        reason = None
    if reason is not None:
        log.info("iptables kept: %s: %s", unit, reason, extra={"ISTIO_EVENT": "capture", "ISTIO_CAPTURE": "kept"})
        try:
            lift()
        except Exception as e:  # a broken config now, a failed restore: better no capture than a dead proxy's
            log.warning("cannot lift the parts that follow the proxy (%s): cleaning", e)
            clean()
        return
    try:
        with run_lock(run_dir):  # an `istio-vm start` begun meanwhile waits for us (or exits 4): no race
            clean()
    except LockedError as e:
        log.info("iptables kept: %s", e, extra={"ISTIO_EVENT": "capture", "ISTIO_CAPTURE": "kept"})
