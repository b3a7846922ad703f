"""ip commands as ip -batch input: family options, inverses, grouping, failure parsing."""

from __future__ import annotations

import pytest

from istio_vm.iptables import ip_batch


def test_family_option_is_dropped_where_the_command_implies_it() -> None:
    rule = ip_batch.parse_command(["ip", "-f", "inet", "rule", "add", "fwmark", "1337", "lookup", "133"])
    route = ip_batch.parse_command(["ip", "-f", "inet", "route", "add", "local", "default", "dev", "lo",
                                    "table", "133"])
    addr = ip_batch.parse_command(["ip", "-6", "addr", "add", "::6/128", "dev", "lo"])
    assert [c.family for c in (rule, route, addr)] == [None, None, None]
    assert [b.argv() for b in ip_batch.batches([rule, route, addr])] == [("ip", "-force", "-batch", "-")]
    assert ip_batch.batches([rule, route, addr])[0].text() == (
        "rule add fwmark 1337 lookup 133\nroute add local default dev lo table 133\naddr add ::6/128 dev lo\n")


def test_ipv6_rules_need_their_own_batch() -> None:
    v6rule = ip_batch.parse_command(["ip", "-6", "rule", "add", "fwmark", "1337", "lookup", "133"])
    v4rule = ip_batch.parse_command(["ip", "rule", "add", "fwmark", "1337", "lookup", "133"])
    assert [b.argv() for b in ip_batch.batches([v6rule, v4rule])] == [
        ("ip", "-f", "inet6", "-force", "-batch", "-"), ("ip", "-force", "-batch", "-")]


def test_inverse_keeps_the_arguments() -> None:
    command = ip_batch.parse_command(["ip", "-f", "inet", "rule", "add", "fwmark", "1337", "lookup", "133"])
    assert command.inverse().argv == ("ip", "-f", "inet", "rule", "del", "fwmark", "1337", "lookup", "133")
    assert command.inverse().inverse() == command


def test_install_deletes_recorded_and_planned_before_adding() -> None:
    a = ip_batch.parse_command(["ip", "rule", "add", "fwmark", "1", "lookup", "5"])
    b = ip_batch.parse_command(["ip", "route", "add", "local", "default", "dev", "lo", "table", "5"])
    c = ip_batch.parse_command(["ip", "-6", "addr", "add", "::6/128", "dev", "lo"])
    lines = [x.line() for x in ip_batch.install_commands([a, b], [a, c])]
    assert lines == ["route del local default dev lo table 5", "rule del fwmark 1 lookup 5",
                     "addr del ::6/128 dev lo", "rule add fwmark 1 lookup 5", "addr add ::6/128 dev lo"]


def test_failed_lines() -> None:
    stderr = "RTNETLINK answers: File exists\nCommand failed -:4\nCannot find device \"x\"\nCommand failed -:6\n"
    assert ip_batch.failed_lines(stderr) == {4, 6}


@pytest.mark.parametrize("argv", [
    ["iptables", "-L"], ["ip", "link", "set", "lo", "up"], ["ip", "rule", "flush"], ["ip", "-n", "x", "rule", "add"],
    ["ip", "rule", "add", "from", "all", "lookup", "a b"], ["ip", "rule", "add", "x#y", "lookup", "1"],
])
def test_refused(argv: list[str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is asserted in test_apply_fake
        ip_batch.parse_command(argv)
