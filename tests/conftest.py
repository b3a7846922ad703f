"""Shared pytest set-up: the host network-state guard and the `root` marker."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator

import pytest

from tests import host_guard


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
