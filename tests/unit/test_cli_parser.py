"""The command line built for one command (cli.build_parser(argv)) parses, helps and refuses exactly as the
whole parser does: only the parsers of other commands are left out, which `--help` never needs."""

from __future__ import annotations

import contextlib
import io

import pytest

from istio_vm import cli

ARGVS = [
    [], ["--help"], ["-h"], ["-h", "iptables", "plan"], ["--traceback", "--help", "config"],
    ["--sidecar-env", "--help"], ["--sidecar-env", "/a", "-h"], ["--version"], ["bogus"], ["--traceback"],
    ["--sidecar"],
    ["config"], ["config", "--help"], ["config", "--json", "--show-source"], ["config", "--bogus"],
    ["--sidecar-env", "/a", "--cluster-env=/b", "config", "--check"], ["--sidecar-env", "config", "config"],
    ["--sidecar", "/a", "config"], ["--cluster-env"], ["--traceback", "config", "extra"],
    ["iptables"], ["iptables", "--help"], ["iptables", "bogus"], ["iptables", "plan"], ["iptables", "plan", "-h"],
    ["iptables", "plan", "--format", "json"], ["iptables", "plan", "--format", "bogus"],
    ["iptables", "--traceback", "plan"], ["iptables", "explain"], ["iptables", "install", "--resolv-conf", "/r"],
    ["iptables", "clean", "--unless-restarting", "istio-sidecar.service"], ["iptables", "clean", "--help"],
    ["iptables", "verify", "--json"], ["iptables", "trace", "inbound", "tcp", "10.0.0.1:80", "--uid", "0"],
    ["iptables", "trace", "--help"], ["start"], ["start", "--help"], ["reload", "--timeout", "5"],
    ["reload", "--timeout", "x"], ["reload", "-h"],
]


def outcome(parser_argv: list[str] | None, argv: list[str]) -> tuple[object, str, str]:
    parser = cli.build_parser() if parser_argv is None else cli.build_parser(parser_argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as e:
            result = ("exit", e.code)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", ARGVS, ids=lambda a: " ".join(a) or "(none)")
def test_the_parser_of_one_command_behaves_as_the_whole_one(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert outcome(argv, argv) == outcome(None, argv)


@pytest.mark.parametrize(("argv", "path"), [
    (["iptables", "plan"], ("iptables", "plan")), (["--sidecar-env", "/a", "config"], ("config",)),
    (["--cluster-env=/b", "--traceback", "iptables", "verify", "--json"], ("iptables", "verify")),
    (["iptables", "--help"], ()), (["iptables", "bogus"], ("iptables",)), (["iptables"], ("iptables",)),
    (["start", "-p", "15001"], ("start",)), (["--sidecar", "/a", "config"], ()), (["bogus"], ()), (["-h"], ("--help",)),
    (["--cluster-env", "/b", "--help", "iptables"], ("--help",)), (["config", "-h"], ("config",)),
    (["--sidecar-env", "--help"], ()),
])
def test_the_command_path_is_taken_only_where_it_is_certain(argv: list[str], path: tuple[str, ...]) -> None:
    assert cli._command_path(argv) == path
