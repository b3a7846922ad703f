"""Facts about the machine that configuration depends on, gathered at the edge.

istio-start.sh asked `hostname` for the workload IP and name and istio-iptables probed the
interfaces and /etc/passwd; here these are read once, natively, into a `Host` value that the pure
config builder consumes (tests pass their own).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import pwd
import socket
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    interface: str
    ip: str
    interface_is_loopback: bool
    interface_is_up: bool


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


def lookup_user(name: str) -> User | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


@dataclass(frozen=True)
class Host:
    """What the config builder may know about the machine."""

    addresses: tuple[Address, ...] = ()  # in getifaddrs(3) order: every IPv4 address, then every IPv6
    hostname: str = "localhost"
    euid: int = 0
    lookup_user: Callable[[str], User | None] = field(default=lookup_user)

    def first_ip(self) -> str:
        """`hostname --all-ip-addresses | cut -d ' ' -f 1` of istio-start.sh, or "" when it prints none.

        hostname(1) skips loopback and down interfaces and IPv6 link-local addresses.
        """
        for address in self.addresses:
            ip = ipaddress.ip_address(address.ip)
            if address.interface_is_loopback or not address.interface_is_up:
                continue
            if ip.version == 6 and ip.is_link_local:
                continue
            return address.ip
        return ""

    def short_hostname(self) -> str:
        """`hostname -s`: the host name cut at the first dot."""
        return self.hostname.split(".", 1)[0]

    def first_non_loopback_is_ipv6(self) -> bool | None:
        """istio-iptables 1.9's IPv6 probe; None where 1.9 panics (no non-loopback address at all).

        Go's net.InterfaceAddrs lists every address, IPv4 first; IsLoopback looks at the address
        only (127/8, ::1), so link-local and down interfaces count.
        """
        for address in self.addresses:
            ip = ipaddress.ip_address(address.ip)
            if not ip.is_loopback:
                return ip.version == 6
        return None


def read_host() -> Host:
    """The real machine (or the network namespace this process runs in)."""
    return Host(addresses=tuple(interface_addresses()), hostname=socket.gethostname(), euid=os.geteuid())


IFF_UP, IFF_LOOPBACK = 0x1, 0x8


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [  # struct ifaddrs, getifaddrs(3)
    ("ifa_next", ctypes.POINTER(_Ifaddrs)), ("ifa_name", ctypes.c_char_p), ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p), ("ifa_netmask", ctypes.c_void_p), ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]


def interface_addresses() -> list[Address]:
    """Every IPv4 and IPv6 address in getifaddrs(3) order, which is what hostname(1) and Go's
    InterfaceAddrs walk: netlink dumps all IPv4 addresses, then all IPv6 ones."""
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
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
