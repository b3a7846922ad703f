"""Env-file constructs bash would run or read differently: each refused with its FILE:LINE, nothing kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from istio_vm.config.envfile import evaluate
from istio_vm.config.host import Host
from istio_vm.config.load import load
from istio_vm.config.sources import Sources
from istio_vm.errors import ConfigError, Problem
from tests.helpers import DATA, EXAMPLES, EveryUser

REJECT = DATA / "envfiles" / "reject"
RESOLV_CONF = str(EXAMPLES / "resolv.conf")
MISSING = "/nonexistent/cluster.env"

# file, line, variable (None: not an assignment, or the whole file), a fragment of the reason
CASES: list[tuple[str, int, str | None, str]] = [
    ("command_substitution.env", 3, "A", "command substitution $(...) is never executed"),
    ("command_substitution_double.env", 1, "A", "command substitution $(...)"),
    ("backticks_unquoted.env", 1, "A", "command substitution (backticks)"),
    ("backticks_double.env", 3, "A", "command substitution (backticks)"),
    ("array.env", 1, "A", "arrays are not supported"),
    ("source.env", 2, None, "sourcing another file is not supported"),
    ("dot_source.env", 1, None, "sourcing another file is not supported"),
    ("if_then.env", 1, None, "shell control flow is not supported"),
    ("fi.env", 2, None, "shell control flow is not supported"),
    ("bare_word.env", 2, None, "'hostname': not an assignment: bash would run it as a command"),
    ("space_around_equals.env", 1, "A", "space before '='"),
    ("space_after_equals.env", 1, "A", "space after '='"),
    ("unquoted_space.env", 1, "A", "unquoted whitespace"),
    ("semicolon.env", 1, "A", "unquoted ';'"),
    ("pipe.env", 1, "A", "unquoted '|'"),
    ("tilde.env", 1, "A", "unquoted '~'"),
    ("tilde_in_default.env", 1, "A", "unquoted '~'"),
    ("tilde_after_colon.env", 1, "A", "unquoted '~'"),
    ("dollar_name_without_braces.env", 1, "A", "$HOME without braces is not supported: write ${HOME}"),
    ("dollar_name_double.env", 1, "A", "$HOME without braces"),
    ("expansion_dash.env", 1, "A", "unsupported expansion '${B-x}'"),
    ("expansion_assign.env", 1, "A", "unsupported expansion '${B:=x}'"),
    ("expansion_length.env", 1, "A", "unsupported expansion '${#B}'"),
    ("expansion_replace.env", 1, "A", "unsupported expansion '${B/x/y}'"),
    ("expansion_nested_default.env", 1, "A", "unsupported expansion"),
    ("expansion_uid.env", 1, "A", "${UID} is set by bash itself"),
    ("assign_uid.env", 1, "UID", "bash manages this variable itself"),
    ("assign_underscore.env", 1, "_", "bash manages this variable itself"),
    ("export_uid.env", 1, "UID", "exporting it would export bash's own value"),
    ("special_parameter.env", 1, "A", "special parameter or arithmetic '$1'"),
    ("ansi_c_quote.env", 1, "A", "$'...' quoting is not supported"),
    ("escape_n_double.env", 1, "A", "escape '\\\\n' inside double quotes"),
    ("escaped_dollar_double.env", 1, "A", "escape '\\\\$' inside double quotes"),
    ("line_continuation_double.env", 1, "A", "escape '\\\\\\n' inside double quotes"),
    ("backslash_single.env", 1, "A", "backslash inside single quotes"),
    ("backslash_unquoted.env", 1, "A", "unquoted '\\': bash removes it"),
    ("glued_after_single_quote.env", 1, "A", "text 'y' right after the closing quote"),
    ("glued_after_double_quote.env", 1, "A", "text '/x' right after the closing quote"),
    ("comment_glued_to_quote.env", 1, "A", "text '#c' right after the closing quote"),
    ("text_after_quoted_value.env", 1, "A", "text 'y' after the value: bash would run it as a command"),
    ("operator_after_quoted_value.env", 1, "A", "shell operator ';' after the value"),
    ("several_assignments.env", 1, "A", "several assignments on one line"),
    ("unterminated_double.env", 2, "A", "unterminated quote"),
    ("unterminated_single.env", 1, "A", "unterminated quote"),
    ("quoted_name.env", 1, None, "\"'A'\" is not a variable name"),
    ("dotted_name.env", 1, None, "'A.B' is not a variable name"),
    ("append.env", 1, None, "'A+' is not a variable name"),
    ("export_two_names.env", 1, None, "only 'export NAME' and 'export NAME=VALUE', one per line"),
    ("path_unset.env", 2, "A", "${PATH} is not set, so bash would expand its own default"),
    ("export_path_unset.env", 1, "PATH", "not set, so bash would export its own default"),
    ("nbsp_in_unquoted_value.env", 1, "A", "unquoted whitespace character U+00A0"),
    ("nbsp_at_line_start.env", 1, None, "whitespace character U+00A0 at the start of the line"),
    ("nbsp_after_equals.env", 1, "A", "space after '='"),
    ("form_feed.env", 1, None, "control character U+000C"),
    ("control_character.env", 2, None, "control character U+0001"),
    ("crlf.env", 1, None, "carriage return (Windows line ending)"),
    ("bom.env", 1, None, "byte-order mark"),
    ("nul_byte.env", 2, None, "NUL byte"),
    ("invalid_utf8.env", 2, None, "not valid UTF-8"),
]
MULTI = {"three_problems.env", "after_multiline.env"}  # checked by the tests at the end
TEXT_CASES = [c for c in CASES if c[0] != "invalid_utf8.env"]  # the others decode, so evaluate() can read them


HOST = Host(hostname="vm-1.example.com", euid=1000, users=EveryUser())


def load_problems(sidecar: Path, cluster: str = MISSING) -> list[Problem]:
    with pytest.raises(ConfigError) as raised:
        load(Sources(sidecar_env=str(sidecar), cluster_env=cluster, resolv_conf=RESOLV_CONF), {}, HOST)
    return list(raised.value.problems)


def test_every_rejection_file_is_in_the_table() -> None:
    assert len(CASES) >= 20
    assert sorted(p.name for p in REJECT.iterdir()) == sorted({c[0] for c in CASES} | MULTI)


@pytest.mark.parametrize(("name", "line", "variable", "reason"), CASES, ids=[c[0] for c in CASES])
def test_rejected_with_file_line_and_name(name: str, line: int, variable: str | None, reason: str) -> None:
    path = REJECT / name
    [problem] = load_problems(path)
    assert (problem.where, problem.variable) == (f"{path}:{line}", variable)
    assert reason in problem.message
    assert str(problem).startswith(f"{path}:{line}: " + (f"{variable}" if variable else ""))
    assert "\n" not in str(problem)


@pytest.mark.parametrize(("name", "line", "variable", "reason"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_nothing_of_a_refused_line_is_kept(name: str, line: int, variable: str | None, reason: str) -> None:
    text = (REJECT / name).read_bytes().decode("utf-8")
    env: dict[str, str] = {}
    assignments, problems = evaluate(text, name, env)
    assert [(p.where, p.variable) for p in problems] == [(f"{name}:{line}", variable)]
    assert line not in {a.line for a in assignments}
    if variable is not None:
        assert variable not in env
        assert variable not in {a.name for a in assignments}


def test_all_problems_of_a_file_at_once_with_the_right_lines() -> None:
    env: dict[str, str] = {}
    text = (REJECT / "three_problems.env").read_text(encoding="utf-8")
    assignments, problems = evaluate(text, "t.env", env)
    assert [(p.where, p.variable) for p in problems] == [("t.env:3", "A"), ("t.env:7", "C"), ("t.env:11", None)]
    assert "$(...)" in problems[0].message
    assert "unquoted whitespace" in problems[1].message
    assert "'export E F'" in problems[2].message
    assert [(a.name, a.line) for a in assignments] == [("OK", 2), ("B", 5), ("D", 10)]
    assert env == {"OK": "1", "B": "multi\nline", "D": "fine"}


def test_line_numbers_after_multiline_values_and_blank_lines() -> None:
    text = (REJECT / "after_multiline.env").read_text(encoding="utf-8")
    assignments, problems = evaluate(text, "m.env", {})
    assert [(a.name, a.line) for a in assignments] == [("A", 1), ("B", 5)]
    assert [str(p) for p in problems] == [
        "m.env:10: C='`id`': command substitution (backticks) is never executed: write the value itself"]


def test_problems_of_both_files_in_one_error() -> None:
    sidecar, cluster = REJECT / "three_problems.env", REJECT / "after_multiline.env"
    problems = load_problems(sidecar, str(cluster))
    assert [p.where for p in problems] == [f"{sidecar}:3", f"{sidecar}:7", f"{sidecar}:11", f"{cluster}:10"]
