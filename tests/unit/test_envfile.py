"""envfile edge cases (each checked against bash by hand; the corpus tests run bash itself)."""

from __future__ import annotations

import doctest

import pytest

from istio_vm.config import envfile
from istio_vm.config.envfile import evaluate


def assigned(text: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables after reading `text`; fails on any problem."""
    env = dict(environ or {})
    _, problems = evaluate(text, "t.env", env)
    assert [str(p) for p in problems] == []
    return env


def refused(text: str, environ: dict[str, str] | None = None) -> list[str]:
    env = dict(environ or {})
    _, problems = evaluate(text, "t.env", env)
    return [str(p) for p in problems]


def test_doctests() -> None:
    failures, tests = doctest.testmod(envfile)
    assert (failures, tests > 0) == (0, True)


@pytest.mark.parametrize(("text", "expected"), [
    ("export A # a comment\n", {}),  # `export NAME` with a comment: nothing to assign
    ("A= # only a comment\n", {"A": ""}),
    ("A=#not-a-comment\n", {"A": "#not-a-comment"}),
    ("A='x'  # c\nB=\"y\"\t# c\n", {"A": "x", "B": "y"}),
    ("A=${X:-a}~\nB=x=~\nC=\"~\"\n", {"A": "a~", "B": "x=~", "C": "~"}),  # no tilde expansion there
    ("A='\u00a0x\u2028'\nB=\"\u00a0${E}\"\n", {"A": "\u00a0x\u2028", "B": "\u00a0e"}),  # quoted: kept
    ("A=\"$'x'\"\n", None),  # `$'` inside double quotes is literal in bash, but refused: rarely meant
])
def test_values(text: str, expected: dict[str, str] | None) -> None:
    if expected is None:
        assert refused(text) != []
    else:
        assert assigned(text, {"E": "e"}) == {"E": "e"} | expected


def test_variables_bash_fills_in_are_fine_when_the_environment_has_them() -> None:
    environ = {"PATH": "/usr/bin", "SHELL": "/bin/sh", "TERM": "xterm"}
    assert assigned("A=${PATH}:/opt\nB=${SHELL:-x}${TERM}\nexport PATH\n", environ) == environ | {
        "A": "/usr/bin:/opt", "B": "/bin/shxterm"}
    assert assigned("PATH=/bin\nA=${PATH}\n") == {"PATH": "/bin", "A": "/bin"}  # set by the file first


@pytest.mark.parametrize(("text", "reason"), [
    ("A=${PATH}\n", "t.env:1: A='${PATH}': ${PATH} is not set, so bash would expand its own default"),
    ("A=\"${TERM:-dumb}\"\n", "t.env:1: A='${TERM:-dumb}': ${TERM} is not set"),
    ("A=${SHELL}\n", "t.env:1: A='${SHELL}': ${SHELL} is not set"),
    ("export TERM\n", "t.env:1: TERM: not set, so bash would export its own default"),
    ("A=${_}\n", "t.env:1: A='${_}': ${_} is set by bash itself"),
    ("A=${X:-~}\n", "t.env:1: A='${X:-~}': unquoted '~'"),
    ("A=x\u00a0\n", "t.env:1: A='x\\xa0': unquoted whitespace character U+00A0"),
    ("A=x\u3000y\n", "t.env:1: A='x\\u3000y': unquoted whitespace character U+3000"),
    ("A=x \u00a0\n", "t.env:1: A='x \\xa0': unquoted whitespace"),
    ("A='x' \u00a0\n", "t.env:1: A='x': text '\\xa0' after the value"),
    ("A='x'\u00a0\n", "t.env:1: A='x': text '\\xa0' right after the closing quote"),
    ("A\u00a0=1\n", "t.env:1: 'A\\xa0=1': not an assignment: 'A\\xa0' is not a variable name"),
    ("export\u00a0A=1\n", "t.env:1: 'export\\xa0A=1': not an assignment"),
    ("\u00a0# comment\n", "t.env:1: '\\xa0# comment': whitespace character U+00A0 at the start of the line"),
    ("A=\"x\\\x7f\"\n", "t.env:1: control character U+007F"),
    ("A='x';\n", "t.env:1: A='x': shell operator ';' after the value"),
    ("export A# c\n", "t.env:1: 'export A# c': only 'export NAME' and 'export NAME=VALUE'"),
])
def test_refused(text: str, reason: str) -> None:
    [problem] = refused(text)
    assert problem.startswith(reason)


def test_a_refused_line_assigns_nothing_and_problems_come_in_line_order() -> None:
    env = {"A": "before"}
    assignments, problems = evaluate("B=${PATH}\nA=$(id)\nC=${A}\n", "t.env", env)
    assert [p.where for p in problems] == ["t.env:1", "t.env:2"]
    assert env == {"A": "before", "C": "before"}
    assert [(a.name, a.value, a.line) for a in assignments] == [("C", "before", 3)]
