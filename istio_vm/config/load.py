"""The edge of the config wing: read the env files, resolv.conf and the machine, then build the Config.

`load()` is the only entry point that touches the host for configuration: sources.read_shell for the
env files, resolv.conf as text, and `read_host()` for the interface addresses (getifaddrs(3)), the
host name, the euid and the accounts the env files name. Everything it read goes to resolve.build.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import overload

from istio_vm.config.host import Address, Host, User
from istio_vm.config.model import Config, ResolvConf
from istio_vm.config.resolve import build, user_names
from istio_vm.config.sources import Sources, read_shell


def load(sources: Sources, environ: Mapping[str, str], host: Host | None = None,
         overrides: Mapping[str, tuple[str, str]] | None = None) -> Config:
    """Read sidecar.env then cluster.env as `set -a; . FILE` would, and build the Config.

    `host` None reads the real machine (or network namespace); tests pass their own.
    """
    shell = read_shell(sources, environ, os.geteuid() if host is None else host.euid, overrides)
    if host is None:
        host = read_host(user_names(shell.variables))
    return build(shell, host, read_resolv_conf(sources.resolv_conf))


def read_resolv_conf(path: str) -> ResolvConf:
    """The nameservers' file, or why it cannot be read (only an error when DNS capture needs it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return ResolvConf(path, f.read())
    except (OSError, UnicodeDecodeError) as e:
        return ResolvConf(path, error=str(e))


def read_host(users: Iterable[str] = ()) -> Host:
    """The real machine (or the network namespace this process runs in), with the accounts `users`."""
    found = {name: user for name in users if (user := lookup_user(name)) is not None}
    # gethostname(2) is uname(2)'s nodename on Linux: no socket module needed.
    return Host(addresses=InterfaceAddresses(), hostname=os.uname().nodename, euid=os.geteuid(), users=found)


class InterfaceAddresses(Sequence[Address]):
    """The machine's addresses, read (getifaddrs(3), through ctypes) only when a setting is derived from
    them: a configuration that sets ISTIO_SVC_IP and ENABLE_INBOUND_IPV6 never loads ctypes."""

    @cached_property
    def _read(self) -> tuple[Address, ...]:
        return tuple(interface_addresses())

    @overload
    def __getitem__(self, index: int) -> Address: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Address]: ...
    def __getitem__(self, index: int | slice) -> Address | Sequence[Address]:
        return self._read[index]

    def __len__(self) -> int:
        return len(self._read)

    def __iter__(self) -> Iterator[Address]:
        return iter(self._read)

    def __repr__(self) -> str:
        return repr(self._read)


def lookup_user(name: str) -> User | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


IFF_UP, IFF_LOOPBACK = 0x1, 0x8


def interface_addresses() -> list[Address]:
    """Every IPv4 and IPv6 address in getifaddrs(3) order, which is what hostname(1) and Go's
    InterfaceAddrs walk: netlink dumps all IPv4 addresses, then all IPv6 ones."""
    import ctypes  # here, not at the top: most configurations never need the interfaces
    import socket

    class Ifaddrs(ctypes.Structure):  # struct ifaddrs, getifaddrs(3)
        pass

    Ifaddrs._fields_ = [
        ("ifa_next", ctypes.POINTER(Ifaddrs)), ("ifa_name", ctypes.c_char_p), ("ifa_flags", ctypes.c_uint),
        ("ifa_addr", ctypes.c_void_p), ("ifa_netmask", ctypes.c_void_p), ("ifa_ifu", ctypes.c_void_p),
        ("ifa_data", ctypes.c_void_p),
    ]
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs")
    found = []
    try:
        entry = head
        while entry:
            ifa = entry.contents
            if ifa.ifa_addr:
                raw = ctypes.string_at(ifa.ifa_addr, 24)  # sockaddr_in6 up to the address
                family = int.from_bytes(raw[:2], "little")
                ip = None
                if family == socket.AF_INET:
                    ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
                elif family == socket.AF_INET6:
                    ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
                if ip is not None:
                    name = (ifa.ifa_name or b"").decode(errors="replace")
                    found.append(Address(name, ip, bool(ifa.ifa_flags & IFF_LOOPBACK), bool(ifa.ifa_flags & IFF_UP)))
            entry = ifa.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found
