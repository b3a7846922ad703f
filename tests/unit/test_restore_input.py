"""Composing restore inputs (removal + plan per table) and rollback texts."""

from __future__ import annotations

import pytest

from istio_vm.iptables.found import find
from istio_vm.iptables.restore_input import compose, rollback_text
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


def test_rollback_copies_the_saved_tables_and_empties_absent_ones() -> None:
    snapshot = "# Generated\n*nat\n:OUTPUT ACCEPT [5:6]\n-A OUTPUT -j RETURN\nCOMMIT\n# Completed\n"
    assert rollback_text(snapshot, ["nat", "mangle"]) == (
        "*nat\n:OUTPUT ACCEPT [5:6]\n-A OUTPUT -j RETURN\nCOMMIT\n*mangle\nCOMMIT\n")


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
