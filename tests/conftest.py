"""Shared pytest set-up: the host network-state guard, the `root` marker, `--update-golden`, a clean environment."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator

import pytest

from istio_vm.config.settings import SETTINGS
from tests import host_guard


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under tests/golden/ from the current output")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (creates network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _host_network_untouched() -> Iterator[None]:
    """Fail the session if the host's iptables, ip rules or routes changed (tests must use netns)."""
    before = host_guard.fingerprint()
    yield
    after = host_guard.fingerprint()
    changed = host_guard.differences(before, after)
    if changed:
        diffs: list[str] = []
        for label in sorted(changed):
            diffs.extend(difflib.unified_diff(before.get(label, "").splitlines(),
                                              after.get(label, "").splitlines(),
                                              f"{label} (session start)", f"{label} (session end)", lineterm=""))
        pytest.fail("the host's own network state changed during the tests:\n" + "\n".join(diffs))


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
