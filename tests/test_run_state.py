"""The state file (atomic JSON) and the lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_vm import run_state
from istio_vm.errors import ApplyError


def test_round_trip_and_absence(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    assert run_state.read(run_dir) == run_state.RunState()
    state = run_state.RunState("legacy", (("ip", "rule", "add", "fwmark", "1", "lookup", "2"),))
    run_state.write(run_dir, state)
    assert run_state.read(run_dir) == state
    assert os.listdir(run_dir) == [run_state.STATE_FILE]  # no temporary file left behind
    run_state.remove(run_dir)
    run_state.remove(run_dir)
    assert run_state.read(run_dir) == run_state.RunState()


@pytest.mark.parametrize("content", ["{", '{"backend": "iptables"}', "[]"])
def test_unreadable_state_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / run_state.STATE_FILE).write_text(content)
    assert run_state.read(str(tmp_path)) == run_state.RunState()


def test_lock_is_exclusive_and_time_boxed(tmp_path: Path) -> None:
    with run_state.locked(str(tmp_path)):
        pid = os.fork()
        if pid == 0:
            try:
                with run_state.locked(str(tmp_path), timeout=0.2):
                    os._exit(1)
            except ApplyError:
                os._exit(0)
            os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with run_state.locked(str(tmp_path), timeout=0.2):
        pass
