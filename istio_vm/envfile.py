"""Env files as data: what `set -a; . FILE` in istio-start.sh would assign, without running anything.

python-dotenv lexes the file (names, quotes, escapes, `${NAME}` atoms); this module adds bash's
meaning on top and rejects, with file and line, every construct where bash and dotenv would
disagree or where bash would run code (`$(...)`, backticks, arrays, `source`, `if`, stray words).
"""

from __future__ import annotations

import io
import re
from collections.abc import MutableMapping
from dataclasses import dataclass

from dotenv.parser import parse_stream
from dotenv.variables import Literal, parse_variables

from istio_vm.errors import Problem

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The shape dotenv accepts for one binding; we read the raw value text from it to tell quoting apart.
_BINDING = re.compile(
    r"(?P<export>export[ \t]+)?(?P<key>[^=#\s]+)(?P<gap>[ \t]*)(?:=(?P<after>[ \t]*)(?P<rest>.*))?\Z",
    re.DOTALL,
)
_SINGLE = re.compile(r"'((?:\\.|[^'\\])*)'", re.DOTALL)  # dotenv's single-quoted value
_DOUBLE = re.compile(r'"((?:\\.|[^"\\])*)"', re.DOTALL)  # dotenv's double-quoted value
_SUPPORTED_EXPANSION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}$`\\\"']*)?\}")
_EXPANSION_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")

# Variables bash sets by itself: `${UID}` in bash is not what the environment says, so refuse them.
BASH_MANAGED = frozenset("""
    BASH BASHOPTS BASHPID BASH_ALIASES BASH_ARGC BASH_ARGV BASH_ARGV0 BASH_CMDS BASH_COMMAND BASH_LINENO
    BASH_SOURCE BASH_SUBSHELL BASH_VERSINFO BASH_VERSION COLUMNS DIRSTACK EPOCHREALTIME EPOCHSECONDS EUID
    FUNCNAME GROUPS HISTCMD HOSTNAME HOSTTYPE IFS LINENO LINES MACHTYPE OLDPWD OPTARG OPTERR OPTIND OSTYPE
    PIPESTATUS PPID PS4 PWD RANDOM REPLY SECONDS SHELLOPTS SHLVL SRANDOM UID
""".split())
_CONTROL_WORDS = frozenset("if then else elif fi for while until do done case esac function select".split())
_COMMAND_HINTS = {
    "source": "sourcing another file is not supported (it would run code): merge its assignments here",
    ".": "sourcing another file is not supported (it would run code): merge its assignments here",
    "unset": "'unset' is not supported: remove the assignment instead",
    **dict.fromkeys(_CONTROL_WORDS, "shell control flow is not supported: only NAME=VALUE lines are read"),
}


@dataclass(frozen=True, slots=True)
class Assignment:
    """One `NAME=VALUE` of an env file, with its value as bash would have assigned it."""

    name: str
    value: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class _Statement:
    name: str
    text: str  # the value after dotenv's unquoting, before `${...}` expansion
    expand: bool  # False for single-quoted values, which bash never expands
    line: int


def evaluate(text: str, path: str, env: MutableMapping[str, str]) -> tuple[list[Assignment], list[Problem]]:
    """Assign every binding of one env file in order, as `set -a; . path` would.

    `env` is the shell's variable table: it is read for `${NAME}` expansion and updated with every
    assignment, so a later file sees the earlier one's values (cluster.env after sidecar.env).

    >>> env = {"HOME": "/root"}
    >>> [(a.name, a.value, a.line) for a in evaluate("A=${HOME}/x\\nB='${A}'\\n", "s.env", env)[0]]
    [('A', '/root/x', 1), ('B', '${A}', 2)]
    """
    statements, problems = parse(text, path)
    assignments = []
    for st in statements:
        value = _expand(st, env) if st.expand else st.text
        env[st.name] = value
        assignments.append(Assignment(st.name, value, path, st.line))
    return assignments, problems


def parse(text: str, path: str) -> tuple[list[_Statement], list[Problem]]:
    """Lex one env file with python-dotenv and keep only what bash would read the same way."""
    file_problem = _check_file(text, path)
    if file_problem is not None:
        return [], [file_problem]
    statements: list[_Statement] = []
    problems: list[Problem] = []
    for binding in parse_stream(io.StringIO(text)):
        raw = binding.original.string
        stripped = raw.lstrip()
        line = binding.original.line + raw[: len(raw) - len(stripped)].count("\n")
        where = f"{path}:{line}"
        if not stripped or stripped.startswith("#"):
            continue  # blank or comment
        if binding.error or binding.key is None:
            problems.append(_not_an_assignment(stripped, where))
            continue
        try:
            statement = _statement(stripped, binding.value, line)
        except _Refused as refused:
            problems.append(Problem(where, refused.name, refused.value, refused.message))
            continue
        if statement is not None:
            statements.append(statement)
    return statements, problems


class _Refused(Exception):
    def __init__(self, name: str | None, value: str | None, message: str) -> None:
        super().__init__(message)
        self.name, self.value, self.message = name, value, message


def _check_file(text: str, path: str) -> Problem | None:
    if text.startswith("\ufeff"):
        return Problem(f"{path}:1", None, None, "file starts with a byte-order mark: bash would not "
                       "read the first line as an assignment; save it as UTF-8 without BOM")
    for number, line in enumerate(text.split("\n"), start=1):
        if "\r" in line:
            return Problem(f"{path}:{number}", None, None, "carriage return (Windows line ending): bash "
                           "would keep it in the value; convert the file with dos2unix")
        if "\0" in line:
            return Problem(f"{path}:{number}", None, None, "NUL byte: not a text file")
    return None


def _not_an_assignment(stripped: str, where: str) -> Problem:
    first_line = stripped.split("\n", 1)[0].rstrip()
    word = first_line.split(maxsplit=1)[0] if first_line.split() else first_line
    if re.match(r"[A-Za-z_][A-Za-z0-9_]*=\(", first_line):
        return Problem(where, first_line.split("=", 1)[0], None, "arrays are not supported: use one string")
    if re.match(r"""[A-Za-z_][A-Za-z0-9_]*=["']""", first_line):
        return Problem(where, first_line.split("=", 1)[0], None, "unterminated quote")
    hint = _COMMAND_HINTS.get(word, "not an assignment: bash would run it as a command; "
                                    "only NAME=VALUE lines are supported")
    return Problem(where, None, None, f"{first_line!r}: {hint}")


def _statement(stripped: str, dotenv_value: str | None, line: int) -> _Statement | None:
    m = _BINDING.match(stripped.rstrip("\n"))
    if m is None:  # pragma: no cover - dotenv accepted it, so the shape matches
        raise _Refused(None, None, "cannot read this line")
    key = m["key"]
    if not NAME.match(key):
        raise _Refused(None, None, f"{stripped.splitlines()[0]!r}: not an assignment: {key!r} is not a "
                       "variable name, so bash would run it as a command")
    if m["rest"] is None:
        if m["export"]:
            return None  # `export NAME`: under `set -a` every assignment is exported already
        raise _Refused(None, None, f"{key!r}: not an assignment: bash would run it as a command")
    if m["gap"]:
        raise _Refused(key, None, "space before '=': bash would run the name as a command")
    if key in BASH_MANAGED:
        raise _Refused(key, dotenv_value, "bash manages this variable itself; choose another name")
    value = dotenv_value or ""
    rest: str = m["rest"]
    if m["after"] and rest.strip() and not rest.lstrip().startswith("#"):
        raise _Refused(key, rest.strip(), "space after '=': bash would assign an empty value and run the "
                       "rest as a command; remove the space or quote the value")
    if m["after"] or not rest.strip():
        return _Statement(key, "", False, line)
    if rest[0] == "'":
        body = _quoted_body(_SINGLE, rest, key, value)
        if "\\" in body:
            raise _Refused(key, value, "backslash inside single quotes: bash keeps it, dotenv does not; "
                           "write the value without it")
        return _Statement(key, value, False, line)
    if rest[0] == '"':
        body = _quoted_body(_DOUBLE, rest, key, value)
        _check_double_quoted(body, key, value)
        _check_dollars(body, key, value)
        return _Statement(key, value, True, line)
    _check_dollars(value, key, value)
    _check_unquoted(value, key)
    return _Statement(key, value, True, line)


def _quoted_body(pattern: re.Pattern[str], rest: str, key: str, value: str) -> str:
    m = pattern.match(rest)
    if m is None:
        raise _Refused(key, None, "unterminated quote")
    tail = rest[m.end():]
    if tail[:1] not in ("", " ", "\t", "\n"):
        raise _Refused(key, value, f"text {tail.split()[0]!r} right after the closing quote: bash would "
                       "join it to the value; put the whole value inside one pair of quotes")
    return m.group(1)


def _check_double_quoted(body: str, key: str, value: str) -> None:
    for m in re.finditer(r"\\(.)", body, re.DOTALL):
        char = m.group(1)
        if char in "$`\n" or char in "abfnrtv'":
            raise _Refused(key, value, f"escape {m.group(0)!r} inside double quotes: bash and dotenv read "
                           "it differently; use single quotes for literal text")
    _check_no_backticks(body.replace("\\\\", ""), key, value)


def _check_unquoted(value: str, key: str) -> None:
    if value.startswith("("):
        raise _Refused(key, value, "arrays are not supported: use one string")
    _check_no_backticks(value, key, value)
    if re.search(r"\s", value):
        raise _Refused(key, value, "unquoted whitespace: bash would end the value at the space and run the "
                       "rest as a command; quote the value")
    bad = re.search(r"""[\\'";&|<>()]""", value)
    if bad:
        raise _Refused(key, value, f"unquoted {bad.group(0)!r}: bash gives it a special meaning; "
                       "quote the value")
    if value.startswith("~") or ":~" in value:
        raise _Refused(key, value, "unquoted '~': bash would expand it to a home directory; quote the value")


def _check_no_backticks(text: str, key: str, value: str) -> None:
    if "`" in text:
        raise _Refused(key, value, "command substitution (backticks) is never executed: write the value itself")


def _check_dollars(text: str, key: str, value: str) -> None:
    """Every `$` must be a `${NAME}` / `${NAME:-default}` we expand, or one bash keeps literally."""
    for m in re.finditer(r"(\\\\)|(\\\$)|\$", text):
        if m.group(1) or m.group(2):
            continue  # an escaped backslash; `\$` was refused already in double quotes
        start = m.start()
        following = text[start + 1 : start + 2]
        if following == "(":
            raise _Refused(key, value, "command substitution $(...) is never executed: write the value itself")
        if following == "{":
            found = _SUPPORTED_EXPANSION.match(text, start)
            if found is None:
                close = text.find("}", start)
                shown = text[start : close + 1] if close != -1 else text[start:]
                raise _Refused(key, value, f"unsupported expansion {shown!r}: only ${{NAME}} and "
                               "${NAME:-default} are supported")
            name = _EXPANSION_NAME.match(text, start)
            if name and name.group(1) in BASH_MANAGED:
                raise _Refused(key, value, f"${{{name.group(1)}}} is set by bash itself, so its value "
                               "cannot be reproduced; write the value itself")
            continue
        if re.match(r"[A-Za-z_]", following):
            name_match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[start + 1 :])
            assert name_match is not None
            raise _Refused(key, value, f"${name_match.group(0)} without braces is not supported: "
                           f"write ${{{name_match.group(0)}}}")
        if following and (following.isdigit() or following in "@*#?$!-[\"'"):
            raise _Refused(key, value, f"special parameter or quoting '${following}' is not supported")


def _expand(statement: _Statement, env: MutableMapping[str, str]) -> str:
    """Expand `${NAME}` and `${NAME:-default}` with bash's meaning (`:-` also covers empty values)."""
    return "".join(_resolve(atom, env) for atom in parse_variables(statement.text))


def _resolve(atom: object, env: MutableMapping[str, str]) -> str:
    if isinstance(atom, Literal):
        return atom.value
    name: str = atom.name  # type: ignore[attr-defined]
    default: str | None = atom.default  # type: ignore[attr-defined]
    current = env.get(name, "")
    if default is not None and current == "":
        return default
    return current

