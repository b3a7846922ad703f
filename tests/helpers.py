"""Paths of the test data and golden files, the golden comparison, a fake reference VM, and where a
test connection or datagram landed (the capture tests of two tiers)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from istio_vm.config.host import Address, Host, User

TESTS = Path(__file__).parent
ROOT = TESTS.parent
DATA = TESTS / "data"
GOLDEN = TESTS / "golden"
EXAMPLES = ROOT / "istio_vm" / "examples"


def text(name: str) -> str:
    """A file of tests/data, e.g. "reference-vm/expected-v4.restore"."""
    return (DATA / name).read_text()


def ip_commands(name: str) -> list[list[str]]:
    """A JSON list of `ip` argv lists of tests/data."""
    loaded: list[list[str]] = json.loads(text(name))
    return loaded


def hostname_first_ip(prefix: list[str]) -> str:
    """`hostname --all-ip-addresses | cut -d ' ' -f 1`, as istio-start.sh ran it (after an optional argv prefix)."""
    out = subprocess.run([*prefix, "hostname", "--all-ip-addresses"], capture_output=True, text=True,
                         check=True).stdout
    return out.split(" ")[0].strip()


def check_golden(path: Path, actual: str, update: bool) -> None:
    """Compare with a golden file, or (re)write it under --update-golden."""
    if update:
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: derive it by hand from the spec (or run pytest --update-golden " \
                          "and review it)"
    assert actual == path.read_text(encoding="utf-8")


REFERENCE_USERS = {"istio-proxy": User("istio-proxy", 997, 997, "/var/lib/istio"), "root": User("root", 0, 0, "/root")}


class EveryUser(Mapping[str, User]):
    """Accounts of a machine where every name exists (UID 997): for tests about env files, not users."""

    def __getitem__(self, name: str) -> User:
        return User(name, 997, 997, "/var/lib/istio")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def fake_host(users: Iterable[str] = ()) -> Host:
    """The reference VM as istio-vm sees it: istio-proxy has UID 997, eth0 has 10.10.10.20.

    Takes (and ignores) the user names, so it can stand in for config.load.read_host.
    """
    return Host(addresses=(Address("lo", "127.0.0.1", True, True), Address("eth0", "10.10.10.20", False, True)),
                hostname="rawvm-1.example", euid=os.geteuid(), users=REFERENCE_USERS)


def iptables_args(directory: Path, env_file: Path, *extra: str) -> list[str]:
    """argv of `istio-vm iptables EXTRA...` reading env_file as cluster.env and directory/resolv.conf."""
    cluster_env = directory / "cluster.env"
    shutil.copy(env_file, cluster_env)  # a copy we own: as root, istio-vm refuses env files of other users
    cluster_env.chmod(0o644)  # ... and ones others may write (a checkout under umask 002 is group-writable)
    return ["--sidecar-env", str(directory / "missing-sidecar.env"), "--cluster-env", str(cluster_env),
            "iptables", *extra, "--resolv-conf", str(directory / "resolv.conf")]


@contextlib.contextmanager
def alarm_after(seconds: int, error: BaseException) -> Iterator[None]:
    """Raise `error` if the block is still running after `seconds` (SIGALRM): a test that would block
    forever fails instead of hanging the suite."""
    def expired(signum: int, frame: object) -> None:
        raise error

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


DNS_QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01"  # "." IN A


def landed(*listeners: tuple[str, socket.socket]) -> str:
    """The name of the listener that got the connection or datagram (accepting/reading it), or "nowhere"."""
    ready, _, _ = select.select([s for _, s in listeners], [], [], 3)
    if not ready:
        return "nowhere"
    [(name, s)] = [(n, s) for n, s in listeners if s is ready[0]]
    if s.type == socket.SOCK_STREAM:
        s.accept()[0].close()
    else:
        s.recv(512)
    return name
