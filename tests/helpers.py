"""Paths of the test data and golden files, and the golden comparison."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).parent / "golden"


def check_golden(path: Path, actual: str, update: bool) -> None:
    """Compare with a golden file, or (re)write it under --update-golden."""
    if update:
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: derive it by hand from the spec (or run pytest --update-golden " \
                          "and review it)"
    assert actual == path.read_text(encoding="utf-8")
