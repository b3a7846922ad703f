"""Facts about the machine that configuration depends on, as plain values (pure).

istio-start.sh asked `hostname` for the workload IP and name and istio-iptables probed the
interfaces and /etc/passwd; load.py reads these once, natively, into a `Host`, and the config
builder applies hostname(1)'s and Go's rules to it here. Tests pass their own `Host`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple


class Address(NamedTuple):
    interface: str
    ip: str
    interface_is_loopback: bool
    interface_is_up: bool


class User(NamedTuple):
    name: str
    uid: int
    gid: int
    home: str


class Host(NamedTuple):
    """What the config builder may know about the machine."""

    # In getifaddrs(3) order: every IPv4 address, then every IPv6 (load.py's reads them on first use).
    addresses: Sequence[Address] = ()
    hostname: str = "localhost"
    euid: int = 0
    users: Mapping[str, User] = MappingProxyType({})  # the accounts the env files name, by name

    def user(self, name: str) -> User | None:
        return self.users.get(name)

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
