"""Composing restore inputs (removal + plan per table) and rollback texts."""

from __future__ import annotations

import pytest

from istio_vm.iptables.found import find
from istio_vm.iptables.restore_input import compose, rollback_text
from istio_vm.iptables.saved import TextError, sections
from tests.helpers import text


def test_plan_tables_first_then_tables_with_only_removals() -> None:
    found = find(text("golden/tproxy.nft.save"))
    inp = compose(found, text("reference-vm/expected-v4.restore"))
    assert inp.tables == ("nat", "mangle")
    assert inp.multi_table
    assert inp.text.count("COMMIT") == 2
    assert inp.text.index("-X ISTIO_REDIRECT") < inp.text.index("-N ISTIO_INBOUND")  # remove, then add
    assert inp.text.endswith("*mangle\n" + "\n".join(found.table("mangle").removal_lines()) + "\nCOMMIT\n")  # type: ignore[union-attr]


def test_nothing_to_do_is_an_empty_input() -> None:
    inp = compose(find(""), "")
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
])
def test_bad_restore_texts(text: str, error: str) -> None:
    with pytest.raises(TextError, match=error):
        sections(text)
