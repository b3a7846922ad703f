"""Composing restore inputs (removal + plan per table) and rollback texts."""

from __future__ import annotations

import pytest

from istio_vm.iptables.found import Owners, find
from istio_vm.iptables.restore_input import compose, undo_text
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.saved import TextError, table_sections
from tests.helpers import text


def test_plan_tables_first_then_tables_with_only_removals() -> None:
    found = find(text("golden/tproxy.nft.save"))
    inp = compose(found, Plan.from_restore(text("reference-vm/expected-v4.restore")).tables(4))
    assert inp.tables == ("nat", "mangle")
    assert inp.multi_table
    assert inp.text.count("COMMIT") == 2
    assert inp.text.index("-X ISTIO_REDIRECT") < inp.text.index("-N ISTIO_INBOUND")  # remove, then add
    assert inp.text.endswith("*mangle\n" + "\n".join(found.table("mangle").removal_lines()) + "\nCOMMIT\n")  # type: ignore[union-attr]


def test_nothing_to_do_is_an_empty_input() -> None:
    inp = compose(find(""), [])
    assert inp.text == ""
    assert inp.tables == ()


SNAPSHOT = ("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
            "-A OUTPUT -d 10.0.0.1/32 -j RETURN\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
            "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN\n"
            "-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n")


def test_undo_is_empty_when_the_istio_state_did_not_change() -> None:
    """A restore that failed whole (the xtables lock held) changed nothing: nothing to undo."""
    assert undo_text(SNAPSHOT, SNAPSHOT) == ""
    foreign = SNAPSHOT.replace("COMMIT", "-A PREROUTING -i eth9 -j DROP\nCOMMIT")
    assert undo_text(foreign, SNAPSHOT) == ""  # another program's new rule is not ours to undo


def test_undo_removes_our_half_written_state_recreates_the_old_and_keeps_foreign_rules() -> None:
    now = ("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n"
           "-A OUTPUT -p tcp -j DROP\n"  # added meanwhile by someone else, at the front
           "-A OUTPUT -d 10.0.0.1/32 -j RETURN\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
           "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n")
    text = undo_text(now, SNAPSHOT)
    lines = text.splitlines()
    assert lines[0] == "*nat"
    assert lines[-1] == "COMMIT"
    assert "-D OUTPUT -p tcp -j ISTIO_OUTPUT" in lines
    assert "-X ISTIO_REDIRECT" in lines
    assert "-A ISTIO_OUTPUT -j RETURN" in lines
    # after the 10.0.0.1 rule, as in the snapshot (the foreign DROP stays first, untouched)
    assert lines[-3:-1] == ["-I OUTPUT 3 -p tcp -j ISTIO_OUTPUT",
                            "-I OUTPUT 4 -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN"]
    assert not any("DROP" in line for line in lines)
    # with owners that do not include uid 997, that rule is not Istio's: neither removed nor recreated
    assert "--uid-owner 997" not in undo_text(now, SNAPSHOT, Owners.of(uids="1337"))


@pytest.mark.parametrize(("text", "error"), [
    ("* nat\n* mangle\nCOMMIT\n", "starts before"),
    ("* nat\nCOMMIT\n* nat\nCOMMIT\n", "appears twice"),
    ("*\nCOMMIT\n", "name missing"),
    ("-A OUTPUT -j RETURN\n", "outside a table"),
    ("* nat\n-A OUTPUT -j RETURN\n", "no COMMIT"),
])
def test_bad_restore_texts(text: str, error: str) -> None:
    with pytest.raises(TextError, match=error):
        table_sections(text)
    with pytest.raises(TextError, match=error):
        Plan.from_restore(text)


def test_a_plan_read_back_from_its_restore_text_renders_the_same_text() -> None:
    for name in ("reference-vm/expected-v4.restore", "tproxy/v4.restore", "ipv6/v6.restore"):
        restore = text(name)
        assert Plan.from_restore(restore, restore).restore(6) == restore
    with pytest.raises(TextError, match="line 2: '-D OUTPUT 1' is not -N, -A or -I"):
        Plan.from_restore("* nat\n-D OUTPUT 1\nCOMMIT\n")
