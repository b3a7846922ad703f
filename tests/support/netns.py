"""Two network namespaces ("vm" and "client") joined by a veth pair, for root-only Envoy tests.

Names are istio-vm-envoy-<role>-<random>; `pair()` deletes both on exit, also on failure. The veth pair is
created inside the vm namespace with its peer in the client's, so nothing appears in the host's namespace, and
iptables rules applied with `Netns.run("iptables-restore", ...)` live and die with the namespace.
`Netns.entered()` moves the calling thread into the namespace (setns(2) is per thread): sockets made there
belong there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
CLIENT_IP, VM_IP = "10.98.0.1", "10.98.0.2"

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def sh(*argv: str, input: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=input, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Netns:
    name: str

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def run(self, *argv: str, input: str | None = None) -> str:
        return sh("ip", "netns", "exec", self.name, *argv, input=input)

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command in this namespace (ip execs it: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.name]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread in the namespace; always come back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)


@dataclass
class Pair:
    vm: Netns
    client: Netns


@contextlib.contextmanager
def pair() -> Iterator[Pair]:
    """vm (eth0 10.98.0.2/24) and client (eth0 10.98.0.1/24), loopback up in both; deleted afterwards."""
    tag = uuid.uuid4().hex[:8]
    created: list[Netns] = []
    try:
        for role in ("vm", "cl"):
            ns = Netns(f"istio-vm-envoy-{role}-{tag}")
            sh("ip", "netns", "add", ns.name)
            created.append(ns)
            ns.ip("link", "set", "lo", "up")
        vm, client = created
        vm.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client.name)
        for ns, addr in ((vm, VM_IP), (client, CLIENT_IP)):
            ns.ip("addr", "add", f"{addr}/24", "dev", "eth0")
            ns.ip("link", "set", "eth0", "up")
        yield Pair(vm, client)
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True, check=False)
