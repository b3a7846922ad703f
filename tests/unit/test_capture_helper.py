"""The capture helper's protocol: exactly "on PART" / "off PART" (PART: inbound, outbound, all)."""

from __future__ import annotations

import pytest

from istio_vm.iptables.parts import ALL_PARTS, Part
from istio_vm.service.capture_helper import parse_request


@pytest.mark.parametrize(("message", "parsed"), [
    (b"on inbound", (True, frozenset({Part.INBOUND}))),
    (b"off outbound", (False, frozenset({Part.OUTBOUND}))),
    (b"off all", (False, ALL_PARTS)),
    (b"on  inbound", None), (b"on inbound ", None), (b"ON inbound", None), (b"on", None), (b"", None),
    (b"on dns", None), (b"off inbound outbound", None), (b"-A OUTPUT -j ACCEPT", None), (b"\xff\xfe", None),
])
def test_only_on_or_off_and_a_part(message: bytes, parsed: tuple[bool, frozenset[Part]] | None) -> None:
    assert parse_request(message) == parsed
