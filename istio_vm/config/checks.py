"""Checks for the text of one setting: ports, port and CIDR lists, booleans, marks, durations.

Each check takes the raw string and returns None when it is acceptable, or a short reason when it
is not. Values are never rewritten here: istio-iptables passes the strings through to its rules, so a
number is accepted only in the one spelling every reader (iptables, ip, Envoy, Python) takes the same
way: plain decimal, no sign, no spaces, no leading zero (docs/security.md, "Values mean what they say").
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable

from istio_vm.errors import shown

Check = Callable[[str], str | None]

GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|ms|s|m|h))+\Z")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# A number as text: at most 20 digits are ever looked at (int() of a longer string is slow, and
# over 4300 digits it raises), so the length is bounded before any conversion.
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,19})\Z")
_HEX = re.compile(r"0[xX][0-9A-Fa-f]{1,8}\Z")
_LEADING_ZERO = re.compile(r"0[0-9]")
MAX_SECONDS = 86400.0  # every duration: at most a day (the loop's deadlines must fit epoll's int milliseconds)
# The kernel's dev_valid_name(): 1-15 bytes, not "." or "..", no "/", ":" or whitespace. Of those,
# iptables reads a trailing "+" as a wildcard ("+" alone: every interface) and a leading "!" as a
# negation, and `ip link` prints "NAME@PEER"; so only letters, digits and "_.-" are accepted.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\Z")


def decimal(text: str, low: int, high: int) -> int | None:
    """The value of a plain decimal number from low to high, or None (no sign, spaces, `_` or leading zero)."""
    if not _DECIMAL.match(text):
        return None
    number = int(text)
    return number if low <= number <= high else None


def _leading_zero(text: str) -> str | None:
    """The reason a number with a leading zero is refused, or None when `text` has none."""
    if not (_LEADING_ZERO.match(text) and len(text) <= 20 and text.isascii() and text.isdigit()):
        return None
    octal = f"as octal {int(text, 8)}" if set(text) <= set("01234567") else "as octal, and refuse it"
    return f"{shown(text)} has a leading zero: iptables and ip read it {octal}; write {text.lstrip('0') or '0'}"


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
    if decimal(text, 1, 65535) is not None:
        return None
    return _leading_zero(text) or "not a port (1-65535)"


def port_list(*, wildcard: bool) -> Check:
    def check(text: str) -> str | None:
        if text == "*":
            return None if wildcard else "'*' is not allowed here (Istio only accepts it for ISTIO_INBOUND_PORTS)"
        for item in split(text):
            if item == "*":
                return "'*' must be the whole value, not one item of a list"
            if (zero := _leading_zero(item)) is not None:
                return zero
            if port(item) is not None:
                return f"{shown(item)} is not a port (1-65535); write ports separated by commas, no spaces"
        return None

    return check


@functools.lru_cache(maxsize=1 << 14)
def go_cidr(item: str) -> tuple[int, str, bool] | None:
    """Go's net.ParseCIDR: (list it goes to, ipNet.String(), ip.IsLoopback()), or None where Go fails.

    Go files an IPv4-mapped IPv6 address (::ffff:a.b.c.d) under IPv4 and prints a mapped network
    in dotted form; Python's ipaddress does neither, and it also accepts forms Go rejects
    (netmasks after the slash, %zone), hence the checks. Cached: `cidr_list`'s check and the plan
    (iptables/plan.py) both ask, and a list of thousands of CIDRs is parsed once.
    """
    address, slash, length = item.partition("/")
    if not slash or "%" in address or not (length.isascii() and length.isdigit()):
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    digits = length.lstrip("0") or "0"  # Go takes leading zeros; int() of thousands of digits raises
    prefix = int(digits) if len(digits) <= 3 else ip.max_prefixlen + 1
    if prefix > ip.max_prefixlen:
        return None
    network = ipaddress.ip_network((ip, prefix), strict=False)
    if isinstance(ip, ipaddress.IPv4Address):
        return 4, str(network), ip.is_loopback
    mapped = ip.ipv4_mapped
    masked = network.network_address
    assert isinstance(masked, ipaddress.IPv6Address)
    masked_v4 = masked.ipv4_mapped
    text = f"{masked_v4}/{prefix - 96}" if masked_v4 is not None else f"{masked.compressed}/{prefix}"
    if mapped is not None:
        return 4, text, mapped.is_loopback
    return 6, text, ip == ipaddress.IPv6Address("::1")


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
            parsed = go_cidr(item)
            if parsed is not None and not (parsed[0] == 4 and ":" in address) and not _LEADING_ZERO.match(prefix):
                continue  # valid; the plan reuses the parse. Otherwise, which rule it breaks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"{item!r} is not an IPv4 or IPv6 CIDR"
            if "%" in address:
                return f"{item!r}: a zone (%...) is not allowed in a CIDR"
            # Go's ParseCIDR, which istio-iptables uses, takes only ADDRESS/DECIMAL-LENGTH.
            if (zero := _leading_zero(prefix)) is not None:
                return f"{shown(item)}: the prefix length {zero}"
            if decimal(prefix, 0, ip.max_prefixlen) is None:
                return f"{item!r}: the prefix length must be 0-{ip.max_prefixlen}"
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                return f"{item!r}: write IPv4-mapped addresses as IPv4 CIDRs"
        return None

    return check


def interception_mode(text: str) -> str | None:
    return None if text in ("REDIRECT", "TPROXY") else "must be REDIRECT or TPROXY (case-sensitive)"


def mark(text: str) -> str | None:
    number = int(text, 16) if _HEX.match(text) else decimal(text, 0, 0xFFFFFFFF)
    if number is None or number == 0:
        return _leading_zero(text) or "not a packet mark (1-4294967295, decimal or 0x hex)"
    return None


def route_table(text: str) -> str | None:
    number = decimal(text, 1, 0xFFFFFFFF)
    if number is None:
        return _leading_zero(text) or "not a routing table number (1-4294967295)"
    if number in (253, 254, 255):
        return "tables 253-255 are the kernel's default, main and local tables; choose another"
    return None


def id_list(text: str) -> str | None:
    items = split(text)
    if not items:
        return "empty list"
    for item in items:
        if decimal(item, 0, 0xFFFFFFFE) is None:
            return _leading_zero(item) or f"{shown(item)} is not a numeric user or group id"
    return None


def interface_list(text: str) -> str | None:
    for item in split(text):
        if "+" in item:
            return (f"{shown(item)}: iptables reads '+' as a wildcard ('+' alone matches every interface); "
                    "name each interface")
        if "@" in item:
            return f"{shown(item)}: `ip link` shows NAME@PEER; write only the name before '@'"
        if not _IFNAME.match(item):
            return (f"{shown(item)} is not a network interface name (1-15 letters, digits, '_', '.' or '-', "
                    "not starting with '.' or '-')")
    return None


def duration(text: str) -> str | None:
    if seconds(text) is None:
        if len(text) <= 40 and (value := _seconds(text)) is not None and value > MAX_SECONDS:
            return "longer than a day (24h)"
        return "not a duration (e.g. 5s, 500ms, 1m30s, or a number of seconds)"
    return None


def seconds(text: str) -> float | None:
    """A Go duration ("1m30s") or a plain number of seconds, in seconds; None above a day (or over 40
    characters: no real duration is that long, and the length bounds the work)."""
    if len(text) > 40:
        return None
    value = _seconds(text)
    return value if value is not None and value <= MAX_SECONDS else None


def _seconds(text: str) -> float | None:
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
        return float(text)
    if not _DURATION.match(text):
        return None
    total = 0.0
    for number, unit in re.findall(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)", text):
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
        if decimal(text, low, high) is not None:
            return None
        return _leading_zero(text) or f"not a whole number from {low} to {high}"

    return check


def absolute_path(text: str) -> str | None:
    return None if text.startswith("/") else "not an absolute path"


def metrics_file(text: str) -> str | None:
    if not text.startswith("/"):
        return "not an absolute path"
    name = text.rsplit("/", 1)[1]
    if not name.endswith(".prom") or name.startswith("."):
        return "not a *.prom file name (node_exporter's textfile collector reads only those)"
    return None
