"""Network namespaces for kernel tests: a "vm" and a "client" joined by a veth pair.

Every namespace is named istio-vm-<role>-<random> and deleted by its creator's finalizer, also on
failure. `Netns.entered()` moves the calling thread into the namespace (setns(2) is per thread), so
sockets made there stay there and subprocesses started there run there; it always moves back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

CLIENT_V4, VM_V4 = "10.99.0.1", "10.99.0.2"
CLIENT_V6, VM_V6 = "fd99::1", "fd99::2"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=input, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Netns:
    name: str

    @classmethod
    def create(cls, role: str, prefix: str = "istio-vm") -> Netns:
        ns = cls(f"{prefix}-{role}-{uuid.uuid4().hex[:8]}")
        sh("ip", "netns", "add", ns.name)
        ns.ip("link", "set", "lo", "up")
        return ns

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, role: str) -> Iterator[Netns]:
        """A namespace for the block, deleted afterwards, also when the block failed."""
        ns = cls.create(role)
        try:
            yield ns
        finally:
            ns.delete()

    def delete(self) -> None:
        sh("ip", "netns", "delete", self.name, check=False)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "-n", self.name, *args, check=check)

    def run(self, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(*self.exec_prefix(), *argv, check=check, input=input)

    def exec_prefix(self) -> list[str]:
        """argv prefix running a command inside this namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread in the namespace; always come back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                if os.stat("/proc/thread-self/ns/net").st_ino != os.fstat(target).st_ino:
                    raise RuntimeError(f"setns into {self.name} did not take effect")
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def call(self, fn: Callable[[], Any], *, uid: int | None = None, timeout: float = 20) -> Any:
        """Run fn in a forked child inside the namespace (as uid:uid if given); return its result."""
        read_end, write_end = os.pipe()
        expected = os.stat(f"/run/netns/{self.name}").st_ino
        with self.entered():
            pid = os.fork()
            if pid == 0:  # child: stays in the namespace and never returns into pytest
                status = 0
                try:
                    os.close(read_end)
                    signal.alarm(max(1, int(timeout)))  # a hung child dies instead of hanging pytest
                    # Guard: never send test traffic from the host's own namespace.
                    if os.stat("/proc/thread-self/ns/net").st_ino != expected:
                        raise RuntimeError(f"child is not in {self.name}")
                    if uid is not None:
                        os.setgroups([])
                        os.setgid(uid)
                        os.setuid(uid)
                    payload = pickle.dumps(("ok", fn()))
                except BaseException as e:  # report everything to the parent
                    payload = pickle.dumps(("error", repr(e)))
                    status = 1
                finally:
                    with os.fdopen(write_end, "wb") as out:
                        out.write(payload)
                    os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as data:
            raw = data.read()
        os.waitpid(pid, 0)  # the child's alarm bounds this
        if not raw:
            raise AssertionError(f"child in {self.name} died without a result (timeout {timeout}s?)")
        kind, value = pickle.loads(raw)
        if kind != "ok":
            raise AssertionError(f"in {self.name} as uid {uid}: {value}")
        return value


@dataclass
class Pair:
    """A vm and a client namespace joined by veth: client 10.99.0.1/fd99::1, vm 10.99.0.2/fd99::2."""

    vm: Netns
    client: Netns
    vm_if: str
    client_if: str


@contextlib.contextmanager
def pair(prefix: str = "istio-vm") -> Iterator[Pair]:
    created: list[Netns] = []
    try:
        vm = Netns.create("vm", prefix)
        created.append(vm)
        client = Netns.create("cl", prefix)
        created.append(client)
        tag = uuid.uuid4().hex[:6]
        vm_if, client_if = f"iv{tag}v", f"iv{tag}c"
        # Created inside the vm namespace, so nothing ever appears in the host's own.
        vm.ip("link", "add", vm_if, "type", "veth", "peer", "name", client_if, "netns", client.name)
        for ns, ifname, v4, v6 in ((vm, vm_if, VM_V4, VM_V6), (client, client_if, CLIENT_V4, CLIENT_V6)):
            ns.ip("addr", "add", f"{v4}/24", "dev", ifname)
            ns.ip("-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad")
            ns.ip("link", "set", ifname, "up")
        yield Pair(vm, client, vm_if, client_if)
    finally:
        for ns in reversed(created):
            ns.delete()



@contextlib.contextmanager
def resolv_conf(netns: str, nameserver: str) -> Iterator[None]:
    """`ip netns exec NAME` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf: the namespace's
    nameserver for a service started there (the file and its directory are removed afterwards)."""
    directory = Path("/etc/netns") / netns
    directory.mkdir(parents=True)
    try:
        (directory / "resolv.conf").write_text(f"nameserver {nameserver}\n")
        yield
    finally:
        shutil.rmtree(directory)
