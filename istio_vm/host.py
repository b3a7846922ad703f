"""Facts about the machine that configuration depends on, gathered at the edge.

istio-start.sh asked `hostname` for the workload IP and name and istio-iptables probed the
interfaces and /etc/passwd; here these are read once, natively, into a `Host` value that the pure
config builder consumes (tests pass their own).
"""

from __future__ import annotations

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
    import psutil  # getifaddrs(3): only when the real machine is asked

    stats = psutil.net_if_stats()
    per_interface = psutil.net_if_addrs()
    addresses = []
    # getifaddrs(3) (netlink) dumps all IPv4 addresses before all IPv6 ones; psutil groups by
    # interface, so regroup by family to get the order hostname(1) and Go's InterfaceAddrs see.
    for family in (socket.AF_INET, socket.AF_INET6):
        for name, entries in per_interface.items():
            flags = stats[name].flags.split(",") if name in stats else []
            for entry in entries:
                if entry.family == family:
                    addresses.append(Address(name, entry.address.split("%", 1)[0], "loopback" in flags,
                                             "up" in flags))
    return Host(addresses=tuple(addresses), hostname=socket.gethostname(), euid=os.geteuid())
