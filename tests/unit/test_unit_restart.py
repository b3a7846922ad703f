"""istio_vm.service.unit_restart: when ExecStopPost= and OnFailure= keep the capture (systemd restarts the unit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from istio_vm.service.start import run_lock
from istio_vm.service.unit_restart import UnitFacts, clean_unless_restarting, coming_back, systemctl_facts

UNIT = "istio-sidecar.service"
PREVENT = ("64", "77", "78")  # the unit's RestartPreventExitStatus=


def stop_post(result: str, code: str, status: str, *jobs: str, restart: str = "on-failure") -> UnitFacts:
    return UnitFacts("deactivating", "stop-post", restart, PREVENT, jobs, result, code, status)


@pytest.mark.parametrize(("facts", "kept"), [
    (stop_post("success", "exited", "0", "stop"), False),  # systemctl stop
    (stop_post("success", "exited", "0", "restart"), True),  # systemctl restart
    (stop_post("success", "exited", "0"), False),  # exited 0 by itself: Restart=on-failure does nothing
    (stop_post("signal", "killed", "KILL"), True),  # istio-vm SIGKILLed: restarted after RestartSec
    (stop_post("exit-code", "exited", "69"), True),  # crash loop: restarted (until the start limit)
    (stop_post("exit-code", "exited", "78"), False),  # RestartPreventExitStatus=64 77 78
    (stop_post("exit-code", "exited", "64"), False),
    (stop_post("exit-code", "exited", "77"), False),
    (stop_post("exit-code", "exited", "75"), True),  # already running: retried
    (stop_post("exit-code", "exited", "78", "start"), False),  # ... also when the failing start is its job
    (stop_post("exit-code", "exited", "69", "start"), True),
    (stop_post("signal", "killed", "KILL", "stop"), False),  # killed while being stopped
    (stop_post("watchdog", "killed", "ABRT"), True),
    (stop_post("signal", "killed", "KILL", restart="no"), False),
    (stop_post("timeout", "killed", "KILL", restart="on-abort"), False),
    (stop_post("signal", "killed", "TERM", restart="on-failure"), False),  # SIGTERM counts as clean
    (UnitFacts("failed", "failed", "on-failure", ("78",), ()), False),  # OnFailure=: gone for good
    (UnitFacts("inactive", "dead", "on-failure", ("78",), ()), False),
    (UnitFacts("activating", "auto-restart", "on-failure", ("78",), ()), True),
    (UnitFacts("failed", "failed", "on-failure", ("78",), ("start",)), True),  # started again meanwhile
])
def test_coming_back(facts: UnitFacts, kept: bool) -> None:
    assert (coming_back(facts) is not None) is kept


def test_facts_from_systemctl() -> None:
    answers = {"show": "ActiveState=deactivating\nSubState=stop-post\nRestart=on-failure\n"
                       "RestartPreventExitStatus=78 SIGKILL\n",
               "list-jobs": f"1234 {UNIT} restart running\n1240 other.service start waiting\n"}
    facts = systemctl_facts(UNIT, {"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"},
                            run=lambda args: answers[args[0]])
    assert facts == UnitFacts("deactivating", "stop-post", "on-failure", ("78", "SIGKILL"), ("restart",),
                              "success", "exited", "0")
    assert coming_back(facts) == "a restart job is queued"


def test_clean_only_when_not_coming_back_and_not_while_a_start_holds_the_lock(tmp_path: Path) -> None:
    cleaned: list[int] = []
    gone = UnitFacts("failed", "failed", "on-failure", (), ())
    back = UnitFacts("activating", "auto-restart", "on-failure", (), ())
    clean_unless_restarting(UNIT, {}, lambda: cleaned.append(1), run_dir=str(tmp_path), facts=lambda: back)
    assert cleaned == []
    clean_unless_restarting(UNIT, {}, lambda: cleaned.append(1), run_dir=str(tmp_path), facts=lambda: gone)
    assert cleaned == [1]
    with run_lock(str(tmp_path)):  # an `istio-vm start` runs: its rules stay
        clean_unless_restarting(UNIT, {}, lambda: cleaned.append(2), run_dir=str(tmp_path), facts=lambda: gone)
    assert cleaned == [1]


def test_without_systemd_it_cleans(tmp_path: Path) -> None:
    cleaned: list[int] = []

    def broken() -> UnitFacts:
        raise OSError("systemctl: not found")

    clean_unless_restarting(UNIT, {}, lambda: cleaned.append(1), run_dir=str(tmp_path), facts=broken)
    assert cleaned == [1]
