"""Interface addresses read natively agree with `hostname --all-ip-addresses` in namespaces of every shape."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import hostname_first_ip

FIRST_IP = "from istio_vm.config.load import read_host; print(read_host().first_ip())"


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"istio-vm-host-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.root
@pytest.mark.parametrize("commands", [
    [],  # only lo: no address at all
    ["link add d0 type veth peer name d0p", "link set d0 up", "addr add 10.5.0.9/24 dev d0",
     "addr add fd05::9/64 dev d0 nodad"],
    ["link add d0 type veth peer name d0p", "addr add 10.5.0.9/24 dev d0",  # down: skipped
     "link add d1 type veth peer name d1p", "link set d1 up", "addr add fd06::1/64 dev d1 nodad",
     "addr add 10.6.0.1/24 dev d1"],
    ["link add d1 type veth peer name d1p", "link set d1 up", "addr add fd06::1/64 dev d1 nodad",
     "addr add fe80::5/64 dev d1 nodad"],
    ["link add d1 type veth peer name d1p", "link set d1 up", "addr add 10.9.0.1/24 dev lo",  # on loopback: skipped
     "addr add 10.7.0.1/24 dev d1", "addr add 10.7.0.2/24 dev d1"],
    ["link add d1 type veth peer name d1p", "link set d1 up", "addr add ::ffff:10.8.0.1/128 dev d1 nodad"],
    ["link add d1 type veth peer name d1p", "link set d1 up", "addr add ::10.8.0.1/128 dev d1 nodad"],
], ids=["none", "v4-then-v6", "down-interface", "v6-only", "loopback-address", "v4-mapped", "v4-compatible"])
def test_first_ip_matches_hostname_in_a_namespace(netns: str, commands: list[str]) -> None:
    prefix = ["ip", "netns", "exec", netns]
    subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], check=True)
    for command in commands:
        subprocess.run([*prefix, "ip", *command.split()], check=True)
    ours = subprocess.run([*prefix, sys.executable, "-c", FIRST_IP], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert ours == hostname_first_ip(prefix)
