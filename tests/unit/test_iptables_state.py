"""The state file (atomic JSON) and the lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_vm.errors import ApplyError
from istio_vm.iptables import state


def test_round_trip_and_absence(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    assert state.read(run_dir) == state.RunState()
    recorded = state.RunState("legacy", (("ip", "rule", "add", "fwmark", "1", "lookup", "2"),))
    state.write(run_dir, recorded)
    assert state.read(run_dir) == recorded
    assert os.listdir(run_dir) == [state.STATE_FILE]  # no temporary file left behind
    state.remove(run_dir)
    state.remove(run_dir)
    assert state.read(run_dir) == state.RunState()


@pytest.mark.parametrize("content", ["{", '{"backend": "iptables"}', "[]", '{"ip_commands": "ip"}',
                                     '{"ip_commands": [["ip", 1]]}', '\xff'])
def test_unreadable_state_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / state.STATE_FILE).write_text(content)
    assert state.read(str(tmp_path)) == state.RunState()


def test_lock_is_exclusive_and_time_boxed(tmp_path: Path) -> None:
    with state.locked(str(tmp_path)):
        pid = os.fork()
        if pid == 0:
            try:
                with state.locked(str(tmp_path), timeout=0.2):
                    os._exit(1)
            except ApplyError:
                os._exit(0)
            os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with state.locked(str(tmp_path), timeout=0.2):
        pass
