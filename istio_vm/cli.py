"""The `istio-vm` command line: parse, build the config, call one function, map errors to a status.

The commands read argv, write to stdout and choose their exit status here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from istio_vm import __version__
from istio_vm.defaults import DEFAULT_RESOLV_CONF, FORMATS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms); mypy knows the name
if TYPE_CHECKING:
    import logging
    from typing import Any, NoReturn

    from istio_vm.config.model import Config
    from istio_vm.config.sources import Sources
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import commands
    from istio_vm.iptables.parts import Part
    from istio_vm.iptables.trace import Flow

# Commands import what they use when they run: `--help` loads argparse and nothing else, `iptables
# install` does not pay for Envoy's admin client or the supervisor (start-up time is part of every
# command; tests/unit/test_imports.py keeps these sets, docs/benchmarks.md measures them).


def _log() -> logging.Logger:
    from istio_vm import loggers

    return loggers.logger("istio_vm")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, the width found as `shutil.get_terminal_size()` finds it ($COLUMNS, else
    stdout's terminal, else 80) without importing shutil: argparse imports it for the first argument
    of every command, and it loads bz2, lzma, zlib and fnmatch (~5 ms of each start)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad command line; istio-vm's status for it is EX_USAGE (64), as systemd names it.
    Its help formatter is _HelpFormatter; the commands' parsers are of the same class (add_subparsers)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        from istio_vm.errors import ExitStatus

        self.print_usage(sys.stderr)
        self.exit(ExitStatus.USAGE, f"{self.prog}: error: {message}\n")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line; given `argv`, only the parsers of the command it names (each parser costs ~0.2
    ms to build, most of it gettext looking for translations argparse does not have). `--help`, an
    unknown command or any option _command_path does not know gets every parser: help and errors are the same
    either way (tests/unit/test_cli_parser.py compares them)."""
    path = _command_path(argv)
    parser = _Parser(
        prog="istio-vm",
        description="Run an Istio sidecar on a VM: configuration, iptables capture, proxy supervision.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--sidecar-env", metavar="PATH",
                        help="first env file (default: $ISTIO_SIDECAR_CONFIG or /var/lib/istio/envoy/sidecar.env)")
    parser.add_argument("--cluster-env", metavar="PATH",
                        help="second env file, wins over the first (default: $ISTIO_CLUSTER_CONFIG or "
                             "/var/lib/istio/envoy/cluster.env)")
    parser.add_argument("--traceback", action="store_true", help="show the Python traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in _COMMAND_PARSERS.items():
        if path == _TOP_HELP:
            add(commands, _TOP_HELP)  # each command's line of `istio-vm --help`: its own options are never read
        elif not path or path[0] == name:
            add(commands, path[1:])
    return parser


_VALUE_OPTIONS = ("--sidecar-env", "--cluster-env")  # the global options that take the next word
_TOP_HELP = ("--help",)  # `istio-vm --help`: argparse prints it at once, whatever follows


def _command_path(argv: Sequence[str]) -> tuple[str, ...]:
    """The command words of argv, e.g. ("iptables", "plan"); _TOP_HELP for `istio-vm --help`; () when
    unsure (every parser is built then)."""
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < (2 if words[:1] == ["iptables"] else 1):
        token = argv[i]
        if token in _VALUE_OPTIONS:
            i += 2
        elif token == "--traceback" or token.startswith(tuple(f"{o}=" for o in _VALUE_OPTIONS)):
            i += 1
        elif token in ("-h", "--help") and not words:
            return _TOP_HELP
        elif token.startswith("-"):
            return ()  # --version, an abbreviation argparse would expand, a mistake: the full parser
        else:
            words.append(token)
            i += 1
    if not words or words[0] not in _COMMAND_PARSERS:
        return ()
    if words[0] == "iptables" and words[1:] and words[1] not in _IPTABLES_PARSERS:
        return ("iptables",)
    return tuple(words)


def _config_parser(commands: argparse._SubParsersAction[_Parser], path: tuple[str, ...]) -> None:
    config = commands.add_parser("config", help="print the effective configuration",
                                 description="Print the effective configuration: istio-iptables 1.9's "
                                 "'Environment:' and 'Variables:' dumps, then the supervisor settings.")
    _add_resolv_conf(config)
    config.add_argument("--show-source", action="store_true",
                        help="add where each value came from (FILE:LINE, environment, default, derived)")
    config.add_argument("--json", action="store_true",
                        help='print {"NAME": {"value": ..., "source": ...}} for every setting')
    config.add_argument("--check", action="store_true",
                        help="print nothing; exit 0 when the configuration is valid (warnings on stderr), 78 "
                             "with one line per problem when not (run it before systemctl reload or restart)")


def _iptables_parser(commands: argparse._SubParsersAction[_Parser], path: tuple[str, ...]) -> None:
    iptables = commands.add_parser("iptables", help="the iptables capture rules",
                                   description="The iptables rules of Istio 1.9.4's istio-iptables for this "
                                   "configuration.")
    actions = iptables.add_subparsers(dest="iptables_command", metavar="ACTION", required=True)
    if path == _TOP_HELP:
        return  # the six actions' parsers are a third of the whole; `istio-vm --help` shows none of them
    for name, add in _IPTABLES_PARSERS.items():
        if not path or path[0] == name:
            add(actions)


def _plan_parser(actions: argparse._SubParsersAction[_Parser]) -> None:
    plan = actions.add_parser("plan", help="print the rules without touching the host",
                              description="Print the rules istio-iptables 1.9.4 would install, and the ip "
                              "commands it would run; nothing on the host is changed.")
    _add_resolv_conf(plan)
    plan.add_argument("--format", choices=FORMATS, default="restore",
                      help="restore: the iptables-restore inputs (IPv4, then IPv6); commands: 1.9's "
                           "command lines; json; dot: a Graphviz graph (default: %(default)s)")


def _explain_parser(actions: argparse._SubParsersAction[_Parser]) -> None:
    explain_parser = actions.add_parser("explain", help="print the rules, each explained",
                                        description="Print the rules with what each does to a packet and "
                                        "which setting produced it.")
    _add_resolv_conf(explain_parser)


def _install_parser(actions: argparse._SubParsersAction[_Parser]) -> None:
    install = actions.add_parser("install", help="clean, then install the rules (istio-start.sh init)",
                                 description="Remove the Istio rules found on the host and install this "
                                 "configuration's, atomically per family; on any failure both families are "
                                 "restored as they were.")
    _add_resolv_conf(install)


def _clean_parser(actions: argparse._SubParsersAction[_Parser]) -> None:
    clean = actions.add_parser("clean", help="remove the Istio rules found on the host",
                               description="Remove every Istio rule and chain found on the host (IPv4 and IPv6, "
                               "nat and mangle) and the ip rule/route recorded by install; works even when the "
                               "env files have errors now.")
    clean.add_argument("--unless-restarting", metavar="UNIT",
                       help="keep the rules when systemd is about to start UNIT again (a crash with Restart=, "
                            "systemctl restart) or an `istio-vm start` runs: the units' ExecStopPost= and "
                            "OnFailure= (fail-closed capture)")


def _verify_parser(actions: argparse._SubParsersAction[_Parser]) -> None:
    verify_parser = actions.add_parser("verify", help="compare the live rules with this configuration's",
                                       description="Exit 0 when the Istio rules on the host are exactly "
                                       "this configuration's, 1 with a diff when they drift.")
    _add_resolv_conf(verify_parser)
    verify_parser.add_argument("--json", action="store_true", help="print the comparison as JSON")


def _start_parser(commands: argparse._SubParsersAction[_Parser], path: tuple[str, ...]) -> None:
    commands.add_parser(
        "start", help="what istio-start.sh did: iptables, then run and supervise the proxy",
        usage="istio-vm [--sidecar-env PATH] [--cluster-env PATH] start [init|-p|run|clean] [FLAGS...]",
        description="Without arguments: clean and install the iptables rules, drop privileges to EXEC_USER and "
        "supervise the proxy. `init` or `-p` [istio-iptables FLAGS]: only the iptables, then exit. `run`: "
        "no iptables. `clean`: only remove the iptables rules. The same as the `istio-start` command.")


def _reload_parser(commands: argparse._SubParsersAction[_Parser], path: tuple[str, ...]) -> None:
    reload_parser = commands.add_parser(
        "reload", help="re-read and validate the files, then apply them to the running start (or change nothing)",
        description="What `systemctl reload` runs, as root: read and validate the env files (invalid: exit 78, "
        "nothing changed); install the new iptables rules atomically; hand the proxy's new settings to the "
        "running `istio-vm start` and wait for the outcome: envoy mode hot-restarts Envoy with them, agent mode "
        "restarts pilot-agent only when its arguments or environment changed.")
    reload_parser.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS",
                               help="how long to wait for the proxy (default: %(default)s)")


def _trace_parser(actions: argparse._SubParsersAction[_Parser]) -> None:
    trace = actions.add_parser(
        "trace", help="would this connection be captured, by which rule, and why",
        usage="istio-vm ... iptables trace [--live] [--json] (inbound|outbound) (tcp|udp) DST [--src ADDR[:PORT]] "
              "[--uid N] [--gid N] [--iface NAME]\n       istio-vm ... iptables trace [--live] [--json] --flows FILE",
        description="Follow one connection (or datagram) through the mangle and nat rules as the kernel does, "
        "and say where it lands: every rule evaluated with the reason, then the verdict. DST is ADDR:PORT "
        "([ADDR]:PORT for IPv6). Without --live: this configuration's plan; with --live: the rules on this "
        "host now, whoever wrote them.")
    _add_resolv_conf(trace)
    trace.add_argument("--live", action="store_true", help="trace the rules on this host now, not the plan")
    trace.add_argument("--json", action="store_true", help="one JSON object per flow (a line each)")
    trace.add_argument("--flows", metavar="FILE", help="one flow per line, in the same words; - for stdin")
    trace.add_argument("flow", nargs="*", metavar="WORD", help="inbound|outbound tcp|udp DST")
    for name, what in (("--src", "ADDR[:PORT]"), ("--uid", "N"), ("--gid", "N"), ("--iface", "NAME")):
        trace.add_argument(name, metavar=what)


def _add_resolv_conf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolv-conf", metavar="PATH", default=DEFAULT_RESOLV_CONF,
                        help="where DNS capture finds the nameservers (default: %(default)s)")


# The parsers in the order `--help` lists them.
_COMMAND_PARSERS: dict[str, Callable[[argparse._SubParsersAction[_Parser], tuple[str, ...]], None]] = {
    "config": _config_parser, "iptables": _iptables_parser, "start": _start_parser, "reload": _reload_parser}
_IPTABLES_PARSERS: dict[str, Callable[[argparse._SubParsersAction[_Parser]], None]] = {
    "plan": _plan_parser, "explain": _explain_parser, "install": _install_parser, "clean": _clean_parser,
    "verify": _verify_parser, "trace": _trace_parser}


def sources(args: argparse.Namespace) -> Sources:
    """Where the configuration is read from: the global flags, and --resolv-conf where a command has it."""
    from istio_vm.config.sources import Sources

    return Sources(sidecar_env=args.sidecar_env, cluster_env=args.cluster_env,
                   resolv_conf=getattr(args, "resolv_conf", DEFAULT_RESOLV_CONF))


def load_config(args: argparse.Namespace, overrides: Mapping[str, tuple[str, str]] | None = None, *,
                log_to_config_target: bool = False, environ: Mapping[str, str] | None = None,
                check_writes: bool = False) -> Config:
    """The Config of the env files (plus `overrides`), its warnings logged (after choosing the log
    target ISTIO_LOG_TARGET names, for `start`); `environ` is the process environment by default;
    `check_writes` for the commands that run or check the service (config.load.load)."""
    from istio_vm import logs
    from istio_vm.config.load import load

    config = load(sources(args), os.environ if environ is None else environ, overrides=overrides,
                  check_writes=check_writes)
    if log_to_config_target:
        logs.configure(logs.choose_target(config.supervision.log_target))
    for warning in config.warnings:
        _log().warning("%s", warning)
    return config


def cmd_config(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.config import render
    from istio_vm.errors import ExitStatus

    if args.check:  # quiet: only warnings (e.g. a misspelt name) and errors, as `nginx -t -q`
        from istio_vm import loggers, logs

        logs.configure(logs.choose_target(None), level=loggers.WARNING)
        load_config(args, check_writes=True)
        return ExitStatus.OK
    config = load_config(args, check_writes=True)
    text = render.render_json(config) if args.json else render.render_text(config, show_source=args.show_source)
    sys.stdout.write(text)
    return ExitStatus.OK


def cmd_iptables_plan(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import explain
    from istio_vm.iptables.plan import build_plan

    config = load_config(args)
    sys.stdout.write(explain.render(build_plan(config.capture), args.format))
    return ExitStatus.OK


def cmd_iptables_explain(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import explain
    from istio_vm.iptables.plan import build_plan

    config = load_config(args)
    sys.stdout.write(explain.explain(build_plan(config.capture), config))
    return ExitStatus.OK


def cmd_iptables_install(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import commands

    commands.install(load_config(args))
    return ExitStatus.OK


def cmd_iptables_clean(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import commands

    settings = clean_settings(args)
    if args.unless_restarting:
        from istio_vm.service.unit_restart import clean_unless_restarting

        clean_unless_restarting(args.unless_restarting, os.environ, lambda: commands.clean(settings),
                                run_dir=settings.run_dir, lift=lambda: commands.lift(load_config(args)))
        return ExitStatus.OK
    commands.clean(settings)
    return ExitStatus.OK


def clean_settings(args: argparse.Namespace) -> commands.CleanSettings:
    from istio_vm.config.sources import read_shell
    from istio_vm.iptables import commands

    return commands.CleanSettings.from_shell(read_shell(sources(args), os.environ, os.geteuid()))


def cmd_iptables_verify(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import commands

    config = load_config(args)
    result = commands.verify(config)
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    elif result.drift:
        sys.stdout.write(result.diff())
    counts = result.counts()
    fields = {f"ISTIO_DRIFT_{name.upper()}": count for name, count in counts.items()}
    if result.drift:  # one entry to alert on: ISTIO_EVENT=drift, with the counts as fields
        _log().warning("the iptables rules drifted from the configuration (- planned, + live): %s planned lines "
                       "missing, %s unexpected, %s Istio lines in the %s backend; repair: istio-vm iptables install",
                       counts["missing"], counts["unexpected"], counts["other_backend"], result.other_backend,
                       extra={"ISTIO_EVENT": "drift", **fields})
    else:
        _log().info("the iptables rules match the configuration (backend %s)", result.backend,
                    extra={"ISTIO_EVENT": "verify", **fields})
    if config.supervision.metrics_file:
        from istio_vm.service.metrics_file import record_verify

        record_verify(config.supervision.run_dir, counts)
    return ExitStatus.FAILURE if result.drift else ExitStatus.OK


def cmd_iptables_trace(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import commands, trace

    try:
        flows = _trace_flows(args)
    except trace.FlowError as e:
        print(f"istio-vm: error: {e}", file=sys.stderr)
        return ExitStatus.USAGE
    tracer = commands.tracer(load_config(args), live=args.live)
    for flow in flows:
        result = tracer.trace(flow)
        sys.stdout.write(result.to_json() + "\n" if args.json else result.text())
    return ExitStatus.OK


def _trace_flows(args: argparse.Namespace) -> list[Flow]:
    """The flows of the command line or of --flows (FILE:LINE: named in the error)."""
    from istio_vm.iptables import trace

    if args.flows is None:
        if len(args.flow) != 3:
            raise trace.FlowError(f"expected DIRECTION PROTOCOL DST, got {' '.join(args.flow) or 'nothing'!r}")
        return [trace.make_flow(*args.flow, src=args.src, uid=args.uid, gid=args.gid, iface=args.iface)]
    if args.flow:
        raise trace.FlowError(f"{args.flow[0]!r}: --flows takes the flows from its file, not the command line")
    name = "stdin" if args.flows == "-" else args.flows
    lines = sys.stdin.read().splitlines() if args.flows == "-" else _read_lines(args.flows)
    flows = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                flows.append(trace.parse_flow_line(line))
            except trace.FlowError as e:
                raise trace.FlowError(f"{name}:{number}: {e}") from None
    return flows


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


IPTABLES_COMMANDS = {"plan": cmd_iptables_plan, "explain": cmd_iptables_explain, "install": cmd_iptables_install,
                     "clean": cmd_iptables_clean, "verify": cmd_iptables_verify, "trace": cmd_iptables_trace}


def cmd_iptables(args: argparse.Namespace) -> ExitStatus:
    return IPTABLES_COMMANDS[args.iptables_command](args)


def cmd_start(args: argparse.Namespace) -> int:
    from istio_vm.config.start_args import parse_start_args
    from istio_vm.errors import ExitStatus
    from istio_vm.service import start

    start_args = parse_start_args(args.start_args)
    if start_args.mode == "clean":
        from istio_vm.iptables import commands

        commands.clean(clean_settings(args))
        return ExitStatus.OK
    config = load_config(args, start_args.overrides, log_to_config_target=True, check_writes=True)
    return start.start(config, start_args.mode, install_iptables=_install)


def _install(config: Config, on: frozenset[Part]) -> object:
    """`iptables install`, its wing imported when it runs: `start` spawns the proxy first (service/start.py)."""
    from istio_vm.iptables import commands

    return commands.install(config, on)


def cmd_reload(args: argparse.Namespace) -> ExitStatus:
    from istio_vm.config.load import load
    from istio_vm.errors import ExitStatus
    from istio_vm.iptables import commands
    from istio_vm.service import reload

    # The files as the running start would read them: with its process environment, not ExecReload's.
    running = reload.start_environment(load(sources(args), os.environ, check_writes=False).supervision.run_dir)
    config = load_config(args, environ=running)  # invalid files: ConfigError, 78, and nothing is changed
    _log().info("Reloaded: %s", reload.reload(config, install_iptables=commands.install, timeout=args.timeout))
    return ExitStatus.OK


COMMANDS = {"config": cmd_config, "iptables": cmd_iptables, "start": cmd_start, "reload": cmd_reload}


def _split_start(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Everything after `start` belongs to istio-start.sh's syntax (`-p 15001` is not an istio-vm option)."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("--sidecar-env", "--cluster-env"):
            i += 2
            continue
        if token.startswith("-"):
            i += 1
            continue
        if token == "start" and argv[i + 1 : i + 2] not in (["-h"], ["--help"]):
            return argv[: i + 1], argv[i + 1 :]
        return argv, None
    return argv, None


def istio_start() -> int:
    """The `istio-start` command: a drop-in for /usr/local/bin/istio-start.sh (`istio-vm start ARGS`)."""
    return main(["start", *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    argv, start_args = _split_start(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(argv).parse_args(argv)
    args.start_args = start_args or []
    from istio_vm import logs
    from istio_vm.errors import ConfigError, ExitStatus, IstioVmError, capped

    logs.configure(logs.choose_target(None))  # structured journal entries under systemd (e.g. ExecStopPost)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        if args.traceback:
            raise
        for line in capped(e.problems):
            print(f"istio-vm: config error: {line}", file=sys.stderr)
        return e.status
    except IstioVmError as e:
        if args.traceback:
            raise
        print(f"istio-vm: error: {e}", file=sys.stderr)
        return e.status
    except OSError as e:  # the machine refused something (a file, a socket, a process): say what, no traceback
        if args.traceback:
            raise
        print(f"istio-vm: error: {e}", file=sys.stderr)
        return ExitStatus.FAILURE
