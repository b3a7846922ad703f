"""Values mean what they say: every number in one spelling, interface names without iptables' wildcards,
bounded lengths and durations, and a restart budget that always ends a crash loop (docs/security.md)."""

from __future__ import annotations

import pytest

from istio_vm.config import checks
from istio_vm.config.model import ResolvConf, Shell
from istio_vm.config.resolve import build
from istio_vm.config.settings import SETTINGS
from istio_vm.errors import ConfigError, Problem
from tests.helpers import fake_host

HOST = fake_host()
RESOLV = ResolvConf("/etc/resolv.conf", "nameserver 10.10.10.6\n")
BASE = {"EXEC_USER": "root"}


def problems(**variables: str) -> list[Problem]:
    """The problems of a build with these variables (each from a.env, line in order), [] when it builds."""
    shell = {**BASE, **variables}
    origins = {name: f"a.env:{n}" for n, name in enumerate(variables, start=1)}
    try:
        build(Shell(shell, origins), HOST, RESOLV)
    except ConfigError as e:
        return list(e.problems)
    return []


# Every setting whose value is a number that reaches iptables, ip or Envoy: (variable, good, with zeros)
NUMBERS = [
    ("ENVOY_PORT", "15001", "015001"),
    ("INBOUND_CAPTURE_PORT", "15006", "015006"),
    ("INBOUND_TUNNEL_PORT", "15008", "015008"),
    ("ISTIO_INBOUND_PORTS", "8080,10", "8080,010"),
    ("ISTIO_LOCAL_EXCLUDE_PORTS", "15090", "015090"),
    ("ISTIO_OUTBOUND_PORTS", "80", "080"),
    ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "22", "0022"),
    ("PROXY_UID", "1747", "01747"),
    ("PROXY_GID", "997,1747", "997,01747"),
    ("ISTIO_INBOUND_TPROXY_MARK", "1337", "01337"),
    ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "376", "0376"),
    ("ISTIO_SERVICE_CIDR", "10.0.0.0/8", "10.0.0.0/08"),
    ("ISTIO_SERVICE_EXCLUDE_CIDR", "10.0.0.0/8", "10.0.0.0/008"),
    ("ISTIO_PILOT_PORT", "15012", "015012"),
    ("IPTABLES_PROBE_PORT", "15002", "015002"),
    ("ENVOY_ADMIN_PORT", "15000", "015000"),
    ("ENVOY_BASE_ID", "1", "01"),
    ("ENVOY_DRAIN_TIME_S", "45", "045"),
    ("ENVOY_PARENT_SHUTDOWN_TIME_S", "60", "060"),
    ("ISTIO_VM_MAX_RESTARTS", "5", "05"),
]


@pytest.mark.parametrize(("variable", "good", "zeros"), NUMBERS, ids=[n[0] for n in NUMBERS])
def test_a_leading_zero_is_refused_in_every_number(variable: str, good: str, zeros: str) -> None:
    assert problems(**{variable: good}) == []
    [problem] = problems(**{variable: zeros})
    assert (problem.where, problem.variable, problem.value) == ("a.env:1", variable, zeros)
    assert "leading zero" in problem.message


def test_the_leading_zero_message_says_what_iptables_would_read() -> None:
    [port] = problems(ENVOY_PORT="015001")
    assert str(port) == ("a.env:1: ENVOY_PORT='015001': '015001' has a leading zero: iptables and ip read it "
                         "as octal 6657; write 15001")
    [table] = problems(ISTIO_INBOUND_TPROXY_ROUTE_TABLE="0376")  # 0376 = 254, the main table
    assert "as octal 254" in table.message
    [invalid] = problems(ISTIO_OUTBOUND_PORTS="080")
    assert "as octal, and refuse it; write 80" in invalid.message


@pytest.mark.parametrize("value", ["+5", " 5", "5 ", "1_0", "٣", "5.0", "-1", "0x", "0x123456789"])
def test_numbers_have_one_spelling(value: str) -> None:
    for check in (checks.port, checks.mark, checks.route_table, checks.id_list, checks.integer(0, 10)):
        assert check(value) is not None, (check, value)


def test_hex_marks_and_zero_itself_are_still_accepted() -> None:
    assert checks.mark("0x539") is None
    assert checks.mark("0x0539") is None  # explicit hex: the zeros mean nothing
    assert checks.integer(0, 45)("0") is None
    assert problems(ENVOY_BASE_ID="0") == []


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.check is not None], ids=lambda s: s.variable)
def test_a_number_of_5000_digits_is_a_problem_not_a_crash(setting: object) -> None:
    variable = setting.variable  # type: ignore[attr-defined]
    for value in ("1" * 5000, "0" + "7" * 5000, "0x" + "f" * 5000, "1" * 5000 + "s", "10.0.0.0/" + "1" * 5000):
        for problem in problems(**{variable: value}):  # building may refuse it, never raise anything else
            assert len(str(problem)) < 600


def test_a_nameserver_of_5000_digits_and_one_with_leading_zeros() -> None:
    resolv = ResolvConf("r.conf", f"nameserver {'1' * 5000}\nnameserver 010.010.010.006\n")
    with pytest.raises(ConfigError) as caught:
        build(Shell({**BASE, "REDIRECT_DNS": "true"}, {}), HOST, resolv)
    [problem] = caught.value.problems
    assert problem.where == "r.conf:2"
    assert "'010.010.010.006' has a leading zero" in problem.message


@pytest.mark.parametrize("name", ["+", "eth+", "!eth0", "-i", ".", "..", ".hidden", "a/b", "a:b", "eth0@if3",
                                  "a b", "a\tb", "x" * 16, "ethé", "eth0,+"])
def test_interface_names_iptables_would_read_otherwise_are_refused(name: str) -> None:
    [problem] = problems(KUBE_VIRT_INTERFACES=name)
    assert (problem.variable, problem.value) == ("KUBE_VIRT_INTERFACES", name)


def test_plus_is_named_as_the_wildcard() -> None:
    [problem] = problems(KUBE_VIRT_INTERFACES="+")
    assert "'+' alone matches every interface" in problem.message


@pytest.mark.parametrize("name", ["eth0", "ens3.100", "br-lan", "veth_1", "x" * 15, "eth0,eth1"])
def test_real_interface_names_are_accepted(name: str) -> None:
    assert problems(KUBE_VIRT_INTERFACES=name) == []


@pytest.mark.parametrize(("value", "seconds"), [("24h", 86400.0), ("1m30s", 90.0), ("1.5", 1.5), ("05s", 5.0)])
def test_durations_up_to_a_day(value: str, seconds: float) -> None:
    assert checks.seconds(value) == seconds


@pytest.mark.parametrize("value", ["24h1s", "86401", "1e9", "٣s", "inf", "nan", "1" * 400 + "s"])
def test_durations_over_a_day_or_not_plain_are_refused(value: str) -> None:
    assert checks.duration(value) is not None
    assert checks.seconds(value) is None


@pytest.mark.parametrize("variables", [
    {"ISTIO_VM_BACKOFF_INITIAL": "0", "ISTIO_VM_RESTART_WINDOW": "0"},
    {"ISTIO_VM_BACKOFF_INITIAL": "0"},
    {"ISTIO_VM_BACKOFF_MAX": "0s"},
    {"ISTIO_VM_RESTART_WINDOW": "0"},
    {"ISTIO_VM_RESTART_WINDOW": "31s"},  # 1+2+4+8+16: the sixth exit comes after 31 s at the earliest
    {"ISTIO_VM_BACKOFF_INITIAL": "1ms", "ISTIO_VM_BACKOFF_MAX": "1ms", "ISTIO_VM_MAX_RESTARTS": "1000",
     "ISTIO_VM_RESTART_WINDOW": "1s"},
], ids=["zero-zero", "zero-backoff", "zero-max", "zero-window", "window-of-the-waits", "window-too-short"])
def test_a_restart_budget_that_never_ends_a_crash_loop_is_refused(variables: dict[str, str]) -> None:
    [problem] = problems(**variables)
    assert problem.variable in variables
    assert "restart" in problem.message


@pytest.mark.parametrize("variables", [
    {},  # the defaults: 31 s of waits in a 300 s window
    {"ISTIO_VM_RESTART_WINDOW": "32s"},
    {"ISTIO_VM_BACKOFF_INITIAL": "0.2s", "ISTIO_VM_BACKOFF_MAX": "0.2s", "ISTIO_VM_MAX_RESTARTS": "1000"},
    {"ISTIO_VM_MAX_RESTARTS": "2", "ISTIO_VM_BACKOFF_INITIAL": "0.1s"},
])
def test_restart_budgets_that_end_a_crash_loop_are_accepted(variables: dict[str, str]) -> None:
    assert problems(**variables) == []
