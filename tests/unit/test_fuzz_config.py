"""The standing defence of the config path: thousands of seeded mutations of the corpus env files, each
exit 0 or 78 with one bounded line per problem, no traceback, within 2 s and 100 MB (testbed/fuzz_config.py;
the longer run is `python -m benchmarks.fuzz_config`, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from testbed.fuzz_config import CASE_MEMORY, FILES, Mutator, Outcome, clear, corpus, violations

SEED = 14  # fixed: a failure here reproduces with `python -m testbed.fuzz_config --seed 14 --cases 2000`
CASES = 2000


def test_thousands_of_mutated_configs_end_in_0_or_78_with_bounded_lines() -> None:
    done = subprocess.run([sys.executable, "-m", "testbed.fuzz_config", "--seed", str(SEED), "--cases", str(CASES)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.stderr == ""  # nothing logged past the reports, no traceback
    report = json.loads(done.stdout)
    assert report["violations"] == [], "\n".join(report["violations"][:10])
    assert done.returncode == 0
    assert set(report["statuses"]) == {"0", "78"}  # the mutations reach both outcomes
    assert report["statuses"]["0"] >= CASES // 20
    assert sum(report["statuses"].values()) == CASES
    assert report["max_rss_growth_mb"] < CASE_MEMORY / 1e6


def files_of(directory: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for name in (*FILES, "resolv.conf"):
        path = directory / name
        if path.is_symlink():
            found[name] = f"-> {path.readlink()}".replace(str(directory), "DIR")
        elif path.is_file():
            found[name] = path.read_bytes()
        else:
            found[name] = "special" if path.exists() else "missing"
    return found


def test_the_same_seed_writes_the_same_cases(tmp_path: Path) -> None:
    seeds = corpus()
    first, second = Mutator(3, seeds), Mutator(3, seeds)
    (tmp_path / "a").mkdir()
    for _ in range(100):
        a = first.case(tmp_path / "a")
        written = files_of(tmp_path / "a")
        clear(tmp_path / "a")
        b = second.case(tmp_path / "a")
        assert (a.seed, a.actions) == (b.seed, b.actions)
        assert files_of(tmp_path / "a") == written
        clear(tmp_path / "a")


def test_a_replayed_seed_writes_that_case_again(tmp_path: Path) -> None:
    mutator = Mutator(5, corpus())
    for _ in range(7):
        case = mutator.case(tmp_path)
        written = files_of(tmp_path)
        clear(tmp_path)
    again = Mutator(99, corpus()).replay(case.seed, tmp_path)
    assert again.actions == case.actions
    assert files_of(tmp_path) == written


def test_violations_see_what_breaks_the_contract() -> None:
    assert violations(Outcome(0, (), (), 0.01)) == []
    assert violations(Outcome(78, ("a: b",), ("a: b",), 0.01)) == []
    assert violations(Outcome(-1, (), (), 0.01, error="ValueError: x"))[0].startswith("status -1")
    assert violations(Outcome(78, (), (), 0.01)) == ["exit 78 without a problem"]
    assert violations(Outcome(78, ("a",), ("a\nb",), 0.01))[0].startswith("problem not one bounded line")
    assert violations(Outcome(78, ("a",), ("a" * 1000,), 0.01))[0].startswith("problem not one bounded line")
    assert violations(Outcome(0, (), (), 2.5)) == ["took 2.50s"]
