"""Env files as data: what `set -a; . FILE` in istio-start.sh would assign, without running anything.

python-dotenv lexes each statement (names, quotes, escapes, `${NAME}` atoms); this module reads each
one the way bash would too (only space and tab separate words), requires both readings to agree, and
rejects, with file and line, every construct where they would not or where bash would run code
(`$(...)`, backticks, arrays, `source`, `if`, stray words). Where a statement ends is bash's reading
(a newline outside quotes): python-dotenv before 1.2 (Debian 12's 0.21, Debian 13's 1.0.1) ran a
double-quoted value ending in an escaped backslash (`"a\\"`) on into the next lines.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import re
import sys
from collections.abc import MutableMapping
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

from istio_vm.errors import Problem


def dotenv_module(name: str) -> ModuleType:
    """python-dotenv's `dotenv.NAME`, without running the package's __init__.py when it can.

    That __init__ imports dotenv.main (the .env loading API, and with it pathlib, tempfile, shutil
    and urllib.parse: ~10 ms of every command) for nothing istio-vm uses. The lexer's modules,
    parser.py and variables.py, import only the standard library, so they are loaded from their files
    under their own names, as the import system would (a later `import dotenv` shares them). Where
    that is not possible (no such file, e.g. a zipped install) the ordinary import runs: slower, the
    same code. tests/unit/test_imports.py checks that the fast way is taken.
    """
    full = f"dotenv.{name}"
    if full in sys.modules:
        return sys.modules[full]
    package = importlib.util.find_spec("dotenv")  # locates the package without importing it
    locations = package.submodule_search_locations if package is not None else None
    spec = importlib.util.spec_from_file_location(full, f"{locations[0]}/{name}.py") if locations else None
    if spec is None or spec.loader is None:
        return importlib.import_module(full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    try:
        spec.loader.exec_module(module)
    except OSError:  # not a file after all
        del sys.modules[full]
        return importlib.import_module(full)
    except BaseException:
        del sys.modules[full]
        raise
    return module


if TYPE_CHECKING:
    from dotenv.parser import Binding, parse_stream
    from dotenv.variables import Literal, Variable, parse_variables
else:
    parse_stream = dotenv_module("parser").parse_stream
    _lexer_variables = dotenv_module("variables")
    Literal, Variable, parse_variables = (_lexer_variables.Literal, _lexer_variables.Variable,
                                          _lexer_variables.parse_variables)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# One binding as bash reads it: words end at a space or tab (not at other Unicode whitespace).
_BINDING = re.compile(
    r"(?P<export>export[ \t]+)?(?P<key>[^ \t\n=]+)(?P<gap>[ \t]*)"
    r"(?:=(?P<after>[ \t]*)(?P<rest>.*)|(?<=[ \t])#.*)?\Z",
    re.DOTALL,
)
_SINGLE = re.compile(r"'([^']*)'")  # bash: no escapes inside single quotes
_DOUBLE = re.compile(r'"((?:\\.|[^"\\])*+)"', re.DOTALL)  # possessive: no backtracking stack per character
_WORD = re.compile(r"[^ \t\n]*")
_END = re.compile(r"(?:[ \t]+#.*|[ \t]*)\Z", re.DOTALL)  # what may follow a value: blanks, a comment
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline
_OTHER_SPACE = re.compile(r"[^\S \t\n]")  # whitespace to Python and dotenv, a plain character to bash
_TILDE = re.compile(r"(?:\A|:|\$\{[A-Za-z_][A-Za-z0-9_]*:-)~")  # where bash expands `~` in an assignment
_SUPPORTED_EXPANSION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}$`\\\"']*)?\}")
_EXPANSION_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")

# Every assigned value is exported to the proxy, and execve(2) refuses a string over MAX_ARG_STRLEN
# (128 KiB) and an environment over ARG_MAX (2 MiB by default); so longer values are refused here,
# before they are built (a `${A}${A}...` chain would otherwise double its size with every line).
MAX_VALUE = 128 * 1024
MAX_ASSIGNED = 2 * 1024 * 1024
# Variables bash sets by itself: `${UID}` in bash is not what the environment says, so refuse them.
BASH_MANAGED = frozenset("""
    BASH BASHOPTS BASHPID BASH_ALIASES BASH_ARGC BASH_ARGV BASH_ARGV0 BASH_CMDS BASH_COMMAND BASH_COMPAT
    BASH_EXECUTION_STRING BASH_LINENO BASH_LOADABLES_PATH BASH_REMATCH BASH_SOURCE BASH_SUBSHELL
    BASH_VERSINFO BASH_VERSION BASH_XTRACEFD COLUMNS DIRSTACK EPOCHREALTIME EPOCHSECONDS EUID FUNCNAME GROUPS
    HISTCMD HOSTNAME HOSTTYPE IFS LINENO LINES MACHTYPE OLDPWD OPTARG OPTERR OPTIND OSTYPE PIPESTATUS PPID
    PS4 PWD RANDOM REPLY SECONDS SHELLOPTS SHLVL SRANDOM UID _
""".split())
# Variables bash gives a value of its own when the environment has none (`env -i bash -c set`).
BASH_DEFAULTS = frozenset({"PATH", "SHELL", "TERM"})
_CONTROL_WORDS = frozenset("if then else elif fi for while until do done case esac function select".split())
_COMMAND_HINTS = {
    "source": "sourcing another file is not supported (it would run code): merge its assignments here",
    ".": "sourcing another file is not supported (it would run code): merge its assignments here",
    "unset": "'unset' is not supported: remove the assignment instead",
    "export": "only 'export NAME' and 'export NAME=VALUE', one per line, are supported",
    **dict.fromkeys(_CONTROL_WORDS, "shell control flow is not supported: only NAME=VALUE lines are read"),
}


class Assignment(NamedTuple):
    """One `NAME=VALUE` of an env file, with its value as bash would have assigned it."""

    name: str
    value: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class _Statement(NamedTuple):
    name: str
    text: str  # the value after unquoting, before `${...}` expansion
    expand: bool  # False for single-quoted values, which bash never expands
    line: int
    assign: bool = True  # False for `export NAME`, which assigns nothing


def evaluate(text: str, path: str, env: MutableMapping[str, str]) -> tuple[list[Assignment], list[Problem]]:
    """Assign every binding of one env file in order, as `set -a; . path` would.

    `env` is the shell's variable table: it is read for `${NAME}` expansion and updated with every
    assignment, so a later file sees the earlier one's values (cluster.env after sidecar.env).
    A refused line assigns nothing.

    >>> env = {"HOME": "/root"}
    >>> [(a.name, a.value, a.line) for a in evaluate("A=${HOME}/x\\nB='${A}'\\n", "s.env", env)[0]]
    [('A', '/root/x', 1), ('B', '${A}', 2)]
    >>> [str(p) for p in evaluate("A=1\\nB=$(id)\\nC=${PATH}\\n", "s.env", env)[1]]
    ["s.env:2: B='$(id)': command substitution $(...) is never executed: write the value itself", \
"s.env:3: C='${PATH}': ${PATH} is not set, so bash would expand its own default: set PATH in the \
environment or write the value itself"]
    """
    statements, problems = read_statements(text, path)
    assignments = []
    assigned = 0  # characters assigned by this file so far
    for st in statements:
        if not st.assign:
            if st.name in BASH_DEFAULTS and st.name not in env:
                problems.append(Problem(f"{path}:{st.line}", st.name, None, "not set, so bash would export its "
                                        f"own default: set {st.name} in the environment or remove this line"))
            continue  # `export NAME`: under `set -a` every assignment is exported already
        if st.expand and (missing := _bash_default_needed(st.text, env)) is not None:
            problems.append(Problem(f"{path}:{st.line}", st.name, st.text, f"${{{missing}}} is not set, so "
                                    f"bash would expand its own default: set {missing} in the environment "
                                    "or write the value itself"))
            continue
        size = _expanded_length(st.text, env) if st.expand else len(st.text)
        if size > MAX_VALUE or assigned + size > MAX_ASSIGNED:
            problems.append(Problem(f"{path}:{st.line}", st.name, None, f"the value would be {size} characters "
                                    f"long{'' if size > MAX_VALUE else ' (with the values before it)'}: "
                                    f"more than the kernel passes to a process ({MAX_VALUE // 1024} KiB a value, "
                                    f"{MAX_ASSIGNED // 1048576} MiB in all)"))
            continue
        assigned += size
        value = _expand(st, env) if st.expand else st.text
        env[st.name] = value
        assignments.append(Assignment(st.name, value, path, st.line))
    problems.sort(key=lambda p: int(p.where.rsplit(":", 1)[1]))
    return assignments, problems


def read_statements(text: str, path: str) -> tuple[list[_Statement], list[Problem]]:
    """Lex one env file with python-dotenv and keep only what bash would read the same way."""
    file_problem = _check_file(text, path)
    if file_problem is not None:
        return [], [file_problem]
    statements: list[_Statement] = []
    problems: list[Problem] = []
    for line, raw in _bash_statements(text):
        stripped = raw.lstrip(" \t")
        if not stripped.strip(" \t\n") or stripped.startswith("#"):
            continue  # blank or comment
        try:
            statements.append(_statement(stripped.rstrip("\n"), _lex(stripped), line))
        except _Refused as refused:
            problems.append(Problem(f"{path}:{line}", refused.name, refused.value, refused.message))
    return statements, problems


def _bash_statements(text: str) -> list[tuple[int, str]]:
    """The file cut where bash ends a statement: at a newline outside quotes, comments and escapes.

    (first line number, text with its final newline). An unterminated quote runs to the end of the file.
    """
    found: list[tuple[int, str]] = []
    start, line, i, n = 0, 1, 0, len(text)
    while i < n:
        char = text[i]
        if char == "'":
            close = text.find("'", i + 1)
            i = n if close == -1 else close + 1
        elif char == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif char == "\\":
            i += 2  # an escaped newline continues the statement
        elif char == "#" and (i == start or text[i - 1] in " \t"):
            close = text.find("\n", i)
            i = n if close == -1 else close
        elif char == "\n":
            found.append((line, text[start : i + 1]))
            line += text.count("\n", start, i + 1)
            start = i = i + 1
        else:
            i += 1
    if start < n:
        found.append((line, text[start:]))
    return found


def _lex(statement: str) -> Binding | None:
    """python-dotenv's reading of one statement; None when it reads more than one binding there."""
    bindings = list(parse_stream(io.StringIO(statement)))
    return bindings[0] if len(bindings) == 1 else None


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
        if control := _CONTROL.search(line):
            return Problem(f"{path}:{number}", None, None, f"control character U+{ord(control.group()):04X}: "
                           "bash's own quoting uses such bytes and can change the value; remove it")
    return None


def _statement(text: str, binding: Binding | None, line: int) -> _Statement:
    """Read one binding (`text`, without its final newline) as bash would; refuse what dotenv reads otherwise."""
    first_line = text.split("\n", 1)[0]
    if _OTHER_SPACE.match(text):
        raise _Refused(None, None, f"{first_line!r}: {_whitespace_name(text[0])} at the start of the line: bash reads "
                       "it as part of a command word, python-dotenv skips it; remove it")
    m = _BINDING.match(text)
    if m is None or m["rest"] is None:
        if m is not None and m["export"] and NAME.match(m["key"]) and binding is not None and not binding.error:
            if m["key"] in BASH_MANAGED:
                raise _Refused(m["key"], None, "bash manages this variable itself: exporting it would export "
                               "bash's own value; remove this line")
            return _Statement(m["key"], "", False, line, assign=False)
        raise _Refused(None, None, _not_an_assignment(first_line))
    key: str = m["key"]
    if not NAME.match(key):
        raise _Refused(None, None, f"{first_line!r}: not an assignment: {key!r} is not a variable name, so "
                       "bash would run it as a command")
    if m["gap"]:
        raise _Refused(key, None, "space before '=': bash would run the name as a command")
    if key in BASH_MANAGED:
        raise _Refused(key, binding.value if binding else None,
                       "bash manages this variable itself; choose another name")
    rest: str = m["rest"]
    if m["after"]:
        if rest and not rest.startswith("#"):
            raise _Refused(key, rest.strip(" \t"), "space after '=': bash would assign an empty value and "
                           "run the rest as a command; remove the space or quote the value")
        value, expand = "", False
        # `NAME= # comment`: an empty value, then bash's comment; python-dotenv before 1.2 reads the
        # comment as the value, so it lexes the assignment without it.
        binding = _lex(f"{key}=\n")
    elif rest[:1] == "'":
        value, expand = _single_quoted(rest, key), False
    elif rest[:1] == '"':
        value, expand = _double_quoted(rest, key), True
    else:
        value, expand = _unquoted(rest, key), True
    if binding is None or binding.error or binding.value != value:  # a safety net: every check above passed
        raise _Refused(key, value, "python-dotenv reads this line differently from bash; quote the value")
    return _Statement(key, value, expand, line)


def _not_an_assignment(first_line: str) -> str:
    words = first_line.split(None, 1)
    word = words[0] if words else first_line
    hint = _COMMAND_HINTS.get(word, "not an assignment: bash would run it as a command; "
                                    "only NAME=VALUE lines are supported")
    return f"{first_line.rstrip()!r}: {hint}"


def _whitespace_name(char: str) -> str:
    return f"whitespace character U+{ord(char):04X}"


def _single_quoted(rest: str, key: str) -> str:
    m = _SINGLE.match(rest)
    if m is None:
        raise _Refused(key, None, "unterminated quote")
    body = m.group(1)
    if "\\" in body:
        raise _Refused(key, body, "backslash inside single quotes: bash keeps it, python-dotenv reads "
                       "\\\\ and \\' as escapes; write the value without it")
    _check_end(rest[m.end():], key, body, quoted=True)
    return body


def _double_quoted(rest: str, key: str) -> str:
    m = _DOUBLE.match(rest)
    if m is None:
        raise _Refused(key, None, "unterminated quote")
    body = m.group(1)
    for escape in re.finditer(r"\\(.)", body, re.DOTALL):
        char = escape.group(1)
        if char in "$`\n" or char in "abfnrtv'":
            raise _Refused(key, body, f"escape {escape.group(0)!r} inside double quotes: bash and "
                           "python-dotenv read it differently; use single quotes for literal text")
    _check_no_backticks(body.replace("\\\\", ""), key, body)
    _check_dollars(body, key, body)
    _check_end(rest[m.end():], key, body, quoted=True)
    return re.sub(r'\\([\\"])', r"\1", body)  # the only escapes left: `\\` and `\"`


def _unquoted(rest: str, key: str) -> str:
    word = _WORD.match(rest).group()  # type: ignore[union-attr]  # matches always
    if word.startswith("("):
        raise _Refused(key, rest, "arrays are not supported: use one string")
    if re.search(r"\$[('\"]", word):  # `$(...)`, `$'...'`: say so before any other complaint
        _check_dollars(word, key, word)
    _check_no_backticks(word, key, word)
    if "\\" in word:
        raise _Refused(key, rest.split("\n", 1)[0], "unquoted '\\': bash removes it, python-dotenv keeps it; "
                       "quote the value")
    _check_end(rest[len(word):], key, rest.split("\n", 1)[0], quoted=False)
    _check_dollars(word, key, word)
    if other := _OTHER_SPACE.search(word):
        raise _Refused(key, word, f"unquoted {_whitespace_name(other.group())}: bash keeps it in the value, "
                       "python-dotenv strips it or ends the value there; quote the value or remove it")
    if bad := re.search(r"""[\\'";&|<>()]""", word):
        raise _Refused(key, word, f"unquoted {bad.group()!r}: bash gives it a special meaning; "
                       "quote the value")
    if _TILDE.search(word):
        raise _Refused(key, word, "unquoted '~': bash would expand it to a home directory; quote the value")
    return word


def _check_end(tail: str, key: str, value: str, *, quoted: bool) -> None:
    """After the value only blanks and a comment may follow, as in `A='x'  # comment`."""
    if _END.match(tail):
        return
    following = tail.lstrip(" \t").split("\n", 1)[0]
    if following[:1] and following[0] in ";&|<>()":
        raise _Refused(key, value, f"shell operator {following[0]!r} after the value: bash would read it as "
                       "code; write one NAME=VALUE per line and nothing else")
    if quoted and tail[0] not in " \t":
        raise _Refused(key, value, f"text {(tail.split() or [tail])[0]!r} right after the closing quote: bash would "
                       "join it to the value; put the whole value inside one pair of quotes")
    if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", following):
        raise _Refused(key, value, "several assignments on one line: put each NAME=VALUE on its own line")
    if quoted:
        raise _Refused(key, value, f"text {following!r} after the value: bash would run it as a command "
                       "(with the variable set for that command only); remove it or quote it with the value")
    raise _Refused(key, value, "unquoted whitespace: bash would end the value at the space and run the "
                   "rest as a command; quote the value")


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
        if following and following in "\"'":
            raise _Refused(key, value, f"{'$' + following}...{following} quoting is not supported: use plain "
                           "single or double quotes")
        if following and (following.isdigit() or following in "@*#?$!-["):
            raise _Refused(key, value, f"special parameter or arithmetic '${following}' is not supported")


def _bash_default_needed(text: str, env: MutableMapping[str, str]) -> str | None:
    """The first `${NAME}` in `text` that bash would fill in itself (PATH, SHELL, TERM when unset)."""
    for atom in parse_variables(text):
        if isinstance(atom, Variable) and atom.name in BASH_DEFAULTS and atom.name not in env:
            return str(atom.name)
    return None


def _expanded_length(text: str, env: MutableMapping[str, str]) -> int:
    """The length `_expand` would build, counted without building it."""
    return sum(len(_resolve(atom, env)) for atom in parse_variables(text))


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
