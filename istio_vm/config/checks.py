"""Checks for the text of one setting: ports, port and CIDR lists, booleans, marks, durations.

Each check takes the raw string and returns None when it is acceptable, or a short reason when it
is not. Values are never rewritten here: istio-iptables passes the strings through to its rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

Check = Callable[[str], str | None]

GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+\Z")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_IFNAME = re.compile(r"[A-Za-z0-9_.@+-]{1,15}\Z")


def split(text: str) -> list[str]:
    """istio-iptables' split(): comma-separated, empty items dropped, nothing trimmed."""
    return [item for item in text.split(",") if item]


def go_bool(text: str) -> bool:
    """strconv.ParseBool for a value that has passed `boolean`."""
    return text in GO_TRUE


def boolean(text: str) -> str | None:
    if text in GO_TRUE or text in GO_FALSE:
        return None
    return "not a boolean (true or false)"


def true_or_false(text: str) -> str | None:
    return None if text in ("true", "false") else "must be exactly 'true' or 'false'"


def port(text: str) -> str | None:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return None
    return "not a port (1-65535)"


def port_list(*, wildcard: bool) -> Check:
    def check(text: str) -> str | None:
        if text == "*":
            return None if wildcard else "'*' is not allowed here (Istio only accepts it for ISTIO_INBOUND_PORTS)"
        for item in split(text):
            if item == "*":
                return "'*' must be the whole value, not one item of a list"
            if port(item) is not None:
                return f"{item!r} is not a port (1-65535); write ports separated by commas, no spaces"
        return None

    return check


def cidr_list(*, wildcard: bool) -> Check:
    def check(text: str) -> str | None:
        if text == "*":
            return None if wildcard else "'*' is not allowed here (istio-iptables 1.9 panics on it)"
        for item in split(text):
            if item == "*":
                return "'*' must be the whole value, not one item of a list"
            if "/" not in item:
                return f"{item!r} is not a CIDR: write {item}/32 (or /128) for one address"
            address, _, prefix = item.partition("/")
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"{item!r} is not an IPv4 or IPv6 CIDR"
            if "%" in address:
                return f"{item!r}: a zone (%...) is not allowed in a CIDR"
            # Go's ParseCIDR, which istio-iptables uses, takes only ADDRESS/DECIMAL-LENGTH.
            if not (prefix.isascii() and prefix.isdigit() and int(prefix) <= ip.max_prefixlen):
                return f"{item!r}: the prefix length must be 0-{ip.max_prefixlen}"
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                return f"{item!r}: write IPv4-mapped addresses as IPv4 CIDRs"
        return None

    return check


def interception_mode(text: str) -> str | None:
    return None if text in ("REDIRECT", "TPROXY") else "must be REDIRECT or TPROXY (case-sensitive)"


def _uint32(text: str) -> int | None:
    try:
        number = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None
    return number if 0 <= number <= 0xFFFFFFFF and text.isascii() else None


def mark(text: str) -> str | None:
    number = _uint32(text)
    if number is None or number == 0:
        return "not a packet mark (1-4294967295, decimal or 0x hex)"
    return None


def route_table(text: str) -> str | None:
    number = _uint32(text) if text.isdigit() else None
    if number is None or number == 0:
        return "not a routing table number (1-4294967295)"
    if number in (253, 254, 255):
        return "tables 253-255 are the kernel's default, main and local tables; choose another"
    return None


def id_list(text: str) -> str | None:
    items = split(text)
    if not items:
        return "empty list"
    for item in items:
        if not (item.isascii() and item.isdigit() and int(item) < 0xFFFFFFFF):
            return f"{item!r} is not a numeric user or group id"
    return None


def interface_list(text: str) -> str | None:
    for item in split(text):
        if not _IFNAME.match(item):
            return f"{item!r} is not a network interface name"
    return None


def duration(text: str) -> str | None:
    if seconds(text) is None:
        return "not a duration (e.g. 5s, 500ms, 1m30s, or a number of seconds)"
    return None


def seconds(text: str) -> float | None:
    """A Go duration ("1m30s") or a plain number of seconds, in seconds."""
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not _DURATION.match(text):
        return None
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text):
        total += float(number) * _DURATION_UNITS[unit]
    return total


def ip_address(text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return "not an IP address"
    return None


def choice(*options: str) -> Check:
    def check(text: str) -> str | None:
        return None if text in options else "must be one of " + ", ".join(options)

    return check


def integer(low: int, high: int) -> Check:
    def check(text: str) -> str | None:
        if text.isascii() and text.isdigit() and low <= int(text) <= high:
            return None
        return f"not a whole number from {low} to {high}"

    return check


def absolute_path(text: str) -> str | None:
    return None if text.startswith("/") else "not an absolute path"
