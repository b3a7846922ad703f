"""istio-start.sh's command line: its modes, and istio-iptables 1.9's flags in every pflag spelling."""

from __future__ import annotations

import pytest

from istio_vm.config.start_args import FLAGS, StartArgs, parse_iptables_flags, parse_start_args
from istio_vm.errors import ConfigError


@pytest.mark.parametrize(("args", "mode"), [
    ([], ""), (["run"], "run"), (["clean"], "clean"), (["init"], "init"), (["-p", "15001"], "init"),
    (["whatever"], ""),  # istio-start.sh looked at its first word only
])
def test_modes_by_the_first_word(args: list[str], mode: str) -> None:
    assert parse_start_args(args).mode == mode


def test_run_and_clean_take_no_flags() -> None:
    assert parse_start_args(["run", "-p", "1"]) == StartArgs("run", {})


@pytest.mark.parametrize("args", [
    ["-p", "15101"], ["-p15101"], ["-p=15101"], ["--envoy-port", "15101"], ["--envoy-port=15101"],
])
def test_every_pflag_spelling_of_a_value(args: list[str]) -> None:
    assert parse_iptables_flags(args) == {"ENVOY_PORT": ("15101", "--envoy-port")}


@pytest.mark.parametrize(("args", "value"), [
    (["-n"], "true"), (["--dry-run"], "true"), (["--dry-run=false"], "false"), (["-n=false"], "false"),
])
def test_booleans_need_no_value_and_take_one_after_equals(args: list[str], value: str) -> None:
    assert parse_iptables_flags(args) == {"DRY_RUN": (value, "--dry-run")}


def test_init_passes_its_flags_on_and_ignores_positional_words() -> None:
    parsed = parse_start_args(["init", "-p", "15101", "-z", "15106", "-m", "TPROXY", "-b", "*", "stray",
                               "--redirect-dns", "--istio-service-cidr=10.0.0.0/8"])
    assert parsed.mode == "init"
    assert parsed.overrides == {
        "ENVOY_PORT": ("15101", "--envoy-port"), "INBOUND_CAPTURE_PORT": ("15106", "--inbound-capture-port"),
        "ISTIO_INBOUND_INTERCEPTION_MODE": ("TPROXY", "--istio-inbound-interception-mode"),
        "ISTIO_INBOUND_PORTS": ("*", "--istio-inbound-ports"), "REDIRECT_DNS": ("true", "--redirect-dns"),
        "ISTIO_SERVICE_CIDR": ("10.0.0.0/8", "--istio-service-cidr"),
    }


def test_the_last_of_a_repeated_flag_wins() -> None:
    assert parse_iptables_flags(["-p", "1", "--envoy-port=2"]) == {"ENVOY_PORT": ("2", "--envoy-port")}


def test_unknown_flags_and_missing_values_are_all_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_iptables_flags(["--nope", "-Y", "-p"])
    assert [str(p) for p in raised.value.problems] == [
        "command line: unknown istio-iptables flag '--nope'",
        "command line: unknown istio-iptables flag '-Y'",
        "command line: flag '-p' needs a value",
    ]


def test_every_flag_names_a_setting_once() -> None:
    variables = [variable for _, _, variable, _ in FLAGS]
    assert len(variables) == len(set(variables))
    for short, long, variable, is_bool in FLAGS:
        spelled = [f"-{short}"] if short else [f"--{long}"]
        expected = "true" if is_bool else "x"
        assert parse_iptables_flags(spelled if is_bool else [*spelled, "x"]) == {variable: (expected, f"--{long}")}
