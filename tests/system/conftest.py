"""Fixtures of the system tier: the cached Debian root, and a booted container with istio-vm installed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import systemd_container as sc
from tests.system.container_vm import Vm, install


@pytest.fixture(scope="module")
def rootfs() -> Path:
    return sc.ensure_rootfs()


@pytest.fixture
def vm(rootfs: Path) -> Iterator[Vm]:
    with sc.booted_container(rootfs, name="istio-sidecar") as container:
        install(container)
        yield Vm(container)
    # The harness powered the container off; nothing of it may be left on the host.
    assert container.processes() == [], "processes of the container survived"
    assert not container.run_dir.exists(), "the container's overlay was not removed"
    assert str(container.run_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not any(cgroup.exists() for cgroup in container.cgroups)
