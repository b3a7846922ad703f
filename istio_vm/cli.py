"""The `istio-vm` command line: parse, build the config, call one function, map errors to a status.

This is the only module that reads argv, writes to stdout and chooses the exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from istio_vm import __version__, dump, explain
from istio_vm.config import DEFAULT_RESOLV_CONF, Config, Sources, load
from istio_vm.errors import ConfigError, ExitStatus, IstioVmError
from istio_vm.host import read_host
from istio_vm.plan import build_plan

log = logging.getLogger("istio_vm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    config = commands.add_parser("config", help="print the effective configuration",
                                 description="Print the effective configuration: istio-iptables 1.9's "
                                 "'Environment:' and 'Variables:' dumps, then the supervisor settings.")
    _add_resolv_conf(config)
    config.add_argument("--show-source", action="store_true",
                        help="add where each value came from (FILE:LINE, environment, default, derived)")
    config.add_argument("--json", action="store_true",
                        help='print {"NAME": {"value": ..., "source": ...}} for every setting')

    iptables = commands.add_parser("iptables", help="the iptables capture rules",
                                   description="The iptables rules of Istio 1.9.4's istio-iptables for this "
                                   "configuration.")
    actions = iptables.add_subparsers(dest="iptables_command", metavar="ACTION", required=True)
    plan = actions.add_parser("plan", help="print the rules without touching the host",
                              description="Print the rules istio-iptables 1.9.4 would install, and the ip "
                              "commands it would run; nothing on the host is changed.")
    _add_resolv_conf(plan)
    plan.add_argument("--format", choices=explain.FORMATS, default="restore",
                      help="restore: the iptables-restore inputs (IPv4, then IPv6); commands: 1.9's "
                           "command lines; json; dot: a Graphviz graph (default: %(default)s)")
    explain_parser = actions.add_parser("explain", help="print the rules, each explained",
                                        description="Print the rules with what each does to a packet and "
                                        "which setting produced it.")
    _add_resolv_conf(explain_parser)
    return parser


def _add_resolv_conf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolv-conf", metavar="PATH", default=DEFAULT_RESOLV_CONF,
                        help="where DNS capture finds the nameservers (default: %(default)s)")


def load_config(args: argparse.Namespace) -> Config:
    sources = Sources(sidecar_env=args.sidecar_env, cluster_env=args.cluster_env,
                      resolv_conf=args.resolv_conf)
    config = load(sources, os.environ, read_host())
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


def cmd_config(args: argparse.Namespace) -> ExitStatus:
    config = load_config(args)
    text = dump.render_json(config) if args.json else dump.render_text(config, show_source=args.show_source)
    sys.stdout.write(text)
    return ExitStatus.OK


def cmd_iptables_plan(args: argparse.Namespace) -> ExitStatus:
    config = load_config(args)
    sys.stdout.write(explain.render(build_plan(config.capture), args.format))
    return ExitStatus.OK


def cmd_iptables_explain(args: argparse.Namespace) -> ExitStatus:
    config = load_config(args)
    sys.stdout.write(explain.explain(build_plan(config.capture), config))
    return ExitStatus.OK


IPTABLES_COMMANDS = {"plan": cmd_iptables_plan, "explain": cmd_iptables_explain}


def cmd_iptables(args: argparse.Namespace) -> ExitStatus:
    return IPTABLES_COMMANDS[args.iptables_command](args)


COMMANDS = {"config": cmd_config, "iptables": cmd_iptables}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="istio-vm: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        if args.traceback:
            raise
        for problem in e.problems:
            print(f"istio-vm: config error: {problem}", file=sys.stderr)
        return e.status
    except IstioVmError as e:
        if args.traceback:
            raise
        print(f"istio-vm: error: {e}", file=sys.stderr)
        return e.status
