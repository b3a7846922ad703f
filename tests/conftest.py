"""Shared fixtures: the `--update-golden` option, and a clean, hermetic configuration environment."""

from __future__ import annotations

import pytest

from istio_vm.settings import SETTINGS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under tests/golden/ from the current output")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the environment the tests happen to run in."""
    for setting in SETTINGS:
        monkeypatch.delenv(setting.variable, raising=False)
    for name in ("TERMINATION_DRAIN_DURATION_SECONDS", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
