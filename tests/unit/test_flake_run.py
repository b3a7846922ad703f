"""scripts/flake-run on a scratch repository whose scripts/test is a stand-in: runs in a row on a fresh clone,
stop at the first failure, the CPU hog beside each run, and nothing left after a success, a failure or SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from testbed.wait import process_gone, wait_for
from tests.helpers import ROOT

# The stand-in suite: prints pytest's summary line; fails on the run named by $FAKE_FAIL_ON; records the busy
# loops of its parent (flake-run) in $FAKE_RECORD; with $FAKE_HANG, waits for SIGINT and records it.
FAKE_TEST = r"""#!/usr/bin/python3
import os, pathlib, time
record = pathlib.Path(os.environ["FAKE_RECORD"])
run = len(record.read_text().splitlines()) + 1 if record.exists() else 1
hogs = []
for children in pathlib.Path(f"/proc/{os.getppid()}/task").glob("*/children"):
    for pid in children.read_text().split():
        if b"while True" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
            hogs.append(pid)
with record.open("a") as out:
    print(f"run {run} cwd {os.getcwd()} hogs {' '.join(hogs)}", file=out, flush=True)
    if os.environ.get("FAKE_HANG"):
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", file=out, flush=True)
            raise SystemExit(2)
if run == int(os.environ.get("FAKE_FAIL_ON", "0")):
    print("FAILED tests/unit/test_x.py::test_flaky - AssertionError")
    print("==== 1 failed, 2 passed in 0.05s ====")
    raise SystemExit(1)
print("==== 3 passed, 1 skipped in 0.04s ====")
"""


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A git repository with flake-run and the stand-in scripts/test, one commit."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "flake-run", repo / "scripts" / "flake-run")
    (repo / "scripts" / "test").write_text(FAKE_TEST)
    (repo / "scripts" / "test").chmod(0o755)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "scratch"], check=True)
    return repo


def flake_run(repo: Path, record: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(repo / "scripts" / "flake-run"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FAKE_RECORD": str(record), **env}, check=False)  # fmt: skip


def clone_of(stderr: str) -> Path:
    found = re.search(r" in (/tmp/istio-vm-flake-\S+)/clone, ", stderr)
    assert found is not None, stderr
    return Path(found.group(1))


def test_runs_in_a_row_on_a_fresh_clone_with_the_hog_and_nothing_left(scratch: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    done = flake_run(scratch, record, "-n", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [re.sub(r"in \d+s$", "in Ns", line) for line in lines[1:4]] == [
        "flake-run: run 1/3 passed: 3 passed, 1 skipped in Ns",
        "flake-run: run 2/3 passed: 3 passed, 1 skipped in Ns",
        "flake-run: run 3/3 passed: 3 passed, 1 skipped in Ns",
    ]
    assert len(lines) == 5
    assert re.fullmatch(r"flake-run: 3/3 runs passed on [0-9a-f]{12} in \d+s", lines[-1])
    workdir = clone_of(done.stderr)
    runs = record.read_text().splitlines()
    assert len(runs) == 3
    hogs = []
    for run in runs:  # each in the clone, with one busy loop per core beside it
        _, _, _, cwd, _, *pids = run.split()
        assert cwd == f"{workdir}/clone"
        assert len(pids) == os.cpu_count()
        hogs += [int(pid) for pid in pids]
    assert all(process_gone(pid) for pid in hogs)
    assert not workdir.exists()


def test_stops_at_the_first_failure_and_keeps_its_log(scratch: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    done = flake_run(scratch, record, "-n", "5", "--no-hog", FAKE_FAIL_ON="2")
    assert done.returncode == 1
    assert "flake-run: run 1/5 passed: 3 passed, 1 skipped" in done.stderr
    assert "flake-run: run 2/5 FAILED (status 1): 1 failed, 2 passed in " in done.stderr
    assert "FAILED tests/unit/test_x.py::test_flaky - AssertionError" in done.stderr
    assert len(record.read_text().splitlines()) == 2  # no third run
    assert all(run.split()[-1] == "hogs" for run in record.read_text().splitlines())  # --no-hog: none
    kept = Path(re.search(r"its log: (\S+);", done.stderr).group(1))  # type: ignore[union-attr]
    try:
        assert "==== 1 failed, 2 passed in 0.05s ====" in kept.read_text()
    finally:
        kept.unlink()
    assert not clone_of(done.stderr).exists()


def test_sigterm_interrupts_the_running_suite_with_sigint_and_leaves_nothing(scratch: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    with subprocess.Popen([str(scratch / "scripts" / "flake-run"), "-n", "2"], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "FAKE_RECORD": str(record), "FAKE_HANG": "1"}) as running:  # fmt: skip
        assert running.stderr is not None
        first = running.stderr.readline()
        wait_for(lambda: record.exists() and "hogs" in record.read_text(), timeout=20, what="the stand-in suite")
        running.send_signal(signal.SIGTERM)
        rest = running.stderr.read()
        assert running.wait(timeout=20) == 130
    assert "flake-run: interrupting the running suite" in rest
    started, interrupted = record.read_text().splitlines()
    assert interrupted == "interrupted"  # pytest would get KeyboardInterrupt and tear its fixtures down
    assert all(process_gone(int(pid)) for pid in started.split()[5:])
    assert len(started.split()[5:]) == os.cpu_count()
    assert not clone_of(first).exists()
