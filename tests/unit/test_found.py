"""Finding Istio's state in real iptables-save dumps (golden files from netns runs) and removing it."""

from __future__ import annotations

import shlex

import pytest

from istio_vm.iptables.backend import BACKENDS
from istio_vm.iptables.found import find, has_rules, ownership
from istio_vm.iptables.saved import _words, parse_rule, parse_save
from tests.helpers import text


def golden(name: str, backend: str) -> str:
    return text(f"golden/{name}.{backend}.save")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_install_is_found_whole(backend: str) -> None:
    found = find(golden("reference", backend))
    nat = found.table("nat")
    assert nat is not None
    assert found.table("mangle") is None
    assert nat.chains == ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")
    assert nat.removal_lines() == [
        "-D PREROUTING -p tcp -j ISTIO_INBOUND",
        "-D OUTPUT -p tcp -j ISTIO_OUTPUT",
        "-D OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN",
        "-D OUTPUT -p udp -m udp --dport 53 -m owner --gid-owner 997 -j RETURN",
        "-D OUTPUT -d 10.10.10.6/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "-F ISTIO_INBOUND", "-F ISTIO_IN_REDIRECT", "-F ISTIO_OUTPUT", "-F ISTIO_REDIRECT",
        "-X ISTIO_INBOUND", "-X ISTIO_IN_REDIRECT", "-X ISTIO_OUTPUT", "-X ISTIO_REDIRECT",
    ]
    assert len(nat.chain_rules) == 14  # 19 rules in the plan, 5 of them in built-in chains
    assert len(nat.view()) == 4 + 5 + 14


@pytest.mark.parametrize("backend", BACKENDS)
def test_tproxy_connmark_rules_are_found(backend: str) -> None:
    mangle = find(golden("tproxy", backend)).table("mangle")
    assert mangle is not None
    assert [r.line for r in mangle.owned] == [
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
    ]
    assert mangle.chains == ("ISTIO_DIVERT", "ISTIO_INBOUND", "ISTIO_TPROXY")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leftovers_of_19_restarts_are_all_found_and_foreign_rules_are_not(backend: str) -> None:
    dump = golden("leftovers-1.9", backend)
    found = find(dump)
    nat, mangle = found.table("nat"), found.table("mangle")
    assert nat is not None
    assert mangle is not None
    assert nat.chains == ("ISTIO_REDIRECT",)  # stuck: still referenced by the kubevirt rule
    reasons = [ownership(r) for r in nat.owned]
    assert reasons.count("1.9 DNS exemption (--uid-owner 997)") == 5  # one more per 1.9 restart
    assert reasons.count("1.9 DNS capture (10.10.10.6/32)") == 5
    assert "jump to ISTIO_REDIRECT" in reasons
    assert "1.9 kubevirt interface eth1" in reasons
    assert len(mangle.owned) == 4
    assert not mangle.chains
    owned = {r.line for t in found.tables for r in t.owned}
    foreign = [line for line in dump.splitlines() if line.startswith("-A") and line not in owned]
    assert foreign == [
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A PREROUTING -i eth1 -p tcp -j RETURN",
        "-A OUTPUT -p udp -m udp --dport 53 -j RETURN",
        "-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 997 -j ACCEPT",
        "-A OUTPUT -j MY_CHAIN",
        "-A MY_CHAIN -d 192.0.2.10/32 -j RETURN",
    ]


@pytest.mark.parametrize(("table", "chain", "spec", "owned"), [
    ("nat", "OUTPUT", "-p udp -m udp --dport 53 -m owner --gid-owner 1337 -j RETURN", True),
    ("nat", "OUTPUT", "-p udp --dport 53 -m owner --uid-owner 997 -j RETURN", True),  # 1.9's own spelling
    ("nat", "OUTPUT", "-p udp --dport 53 -d 10.10.10.6/32 -j REDIRECT --to-port 15053", True),
    ("nat", "OUTPUT", "-d 10.10.10.6/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15054", False),
    ("nat", "OUTPUT", "-d 10.0.0.0/8 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053", False),
    ("nat", "OUTPUT", "-p tcp -m tcp --dport 53 -m owner --uid-owner 997 -j RETURN", False),
    ("nat", "OUTPUT", "! -p udp -m udp --dport 53 -m owner --uid-owner 997 -j RETURN", False),
    ("nat", "PREROUTING", "-i eth0 -j RETURN", True),
    ("nat", "PREROUTING", "! -i eth0 -j RETURN", False),
    ("nat", "PREROUTING", "-d 10.1.0.0/16 -i eth0 -j ISTIO_REDIRECT", True),
    ("nat", "POSTROUTING", "-g ISTIO_X", True),
    ("mangle", "PREROUTING", "-p tcp -m mark --mark 0x1 -j CONNMARK --save-mark", True),
    ("mangle", "PREROUTING", "-p tcp -m mark --mark 0x1 -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff",
     False),
    ("mangle", "OUTPUT", "-p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark", True),
    ("mangle", "OUTPUT", "-p tcp -m mark --mark 0x539 -j CONNMARK --restore-mark", False),
    ("filter", "INPUT", "-j ISTIO_INBOUND", False),  # only nat and mangle are Istio's
    ("nat", "MY_CHAIN", "-j ISTIO_REDIRECT", False),  # only built-in chains
    ("nat", "OUTPUT", '-m comment --comment "a \\"quoted\\" -j ISTIO_X" -j RETURN', False),
])
def test_ownership_shapes(table: str, chain: str, spec: str, owned: bool) -> None:
    assert (ownership(parse_rule(table, chain, spec)) is not None) is owned


def test_has_rules_ignores_empty_builtin_tables() -> None:
    empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [3:4]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
    assert not has_rules(empty)
    assert has_rules(empty.replace("COMMIT\n*filter", ":X - [0:0]\nCOMMIT\n*filter"))
    assert has_rules("*raw\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j NOTRACK\nCOMMIT\n")


def test_parse_save_keeps_specs_verbatim() -> None:
    saved = parse_save("# Generated\n*nat\n:OUTPUT ACCEPT [1:2]\n-A OUTPUT -m comment --comment \"x y\" -j RETURN\n"
                       "COMMIT\n# Completed\n")
    rule = saved["nat"].rules[0]
    assert rule.spec == '-m comment --comment "x y" -j RETURN'
    assert (False, "--comment", "x y") in rule.options
    assert rule.target == "RETURN"


SPECS = [  # what iptables-save prints, and what a user's rules can hold
    "-p tcp -m tcp --dport 15008 -j RETURN",
    "-s 127.0.0.6/32 -o lo -j ISTIO_IN_REDIRECT",
    '-m comment --comment "a user\'s rule" -j ACCEPT',
    "-m comment --comment 'single quoted' -j ACCEPT",
    '-m comment --comment "escaped \\" quote" -j ACCEPT',
    "-m comment --comment a\\ b -j ACCEPT",
    "-m comment --comment \"tab\there\" -j ACCEPT",
    "-m comment --comment \"caf\u00e9\" -j ACCEPT",
    "-m comment --comment \"no space\u00a0break\" -j ACCEPT",
    "-p tcp  -j  RETURN",
    "-m comment --comment \"unbalanced -j ACCEPT",
]


@pytest.mark.parametrize("spec", SPECS)
def test_the_fast_word_split_is_shlex_wherever_shlex_reads_the_spec(spec: str) -> None:
    try:
        expected = shlex.split(spec)
    except ValueError:
        expected = spec.split()
    assert _words(spec) == expected


@pytest.mark.parametrize("name", ["reference", "tproxy", "leftovers-1.9"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rule_of_the_golden_dumps_splits_as_shlex_splits_it(name: str, backend: str) -> None:
    rules = [rule for table in parse_save(golden(name, backend)).values() for rule in table.rules]
    assert rules
    assert all(_words(rule.spec) == shlex.split(rule.spec) for rule in rules)


def test_a_dump_is_parsed_once_and_each_reader_gets_its_own_dict() -> None:
    dump = golden("reference", "nft")
    first, second = parse_save(dump), parse_save(dump)
    assert first == second
    assert first is not second
    assert first["nat"] is second["nat"]  # the same immutable tables: parsed once
