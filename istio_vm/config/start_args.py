"""istio-start.sh's command line: its modes, and the istio-iptables flags `init` / `-p` pass on.

`istio-start.sh init|-p [FLAGS]` ran `pilot-agent istio-iptables "$@"`, so these take 1.9's flags
(pflag syntax: `-p 15001`, `-p15001`, `--envoy-port=15001`, `-n`, `--dry-run=false`); they override
the env files, as flags beat the environment in istio-iptables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from istio_vm.errors import ConfigError, Problem

# (short, long, variable, is_bool), from istio-iptables 1.9.4's root.go
FLAGS = (
    ("p", "envoy-port", "ENVOY_PORT", False),
    ("z", "inbound-capture-port", "INBOUND_CAPTURE_PORT", False),
    ("e", "inbound-tunnel-port", "INBOUND_TUNNEL_PORT", False),
    ("u", "proxy-uid", "PROXY_UID", False),
    ("g", "proxy-gid", "PROXY_GID", False),
    ("m", "istio-inbound-interception-mode", "ISTIO_INBOUND_INTERCEPTION_MODE", False),
    ("t", "istio-inbound-tproxy-mark", "ISTIO_INBOUND_TPROXY_MARK", False),
    ("r", "istio-inbound-tproxy-route-table", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", False),
    ("b", "istio-inbound-ports", "ISTIO_INBOUND_PORTS", False),
    ("d", "istio-local-exclude-ports", "ISTIO_LOCAL_EXCLUDE_PORTS", False),
    ("i", "istio-service-cidr", "ISTIO_SERVICE_CIDR", False),
    ("x", "istio-service-exclude-cidr", "ISTIO_SERVICE_EXCLUDE_CIDR", False),
    ("q", "istio-outbound-ports", "ISTIO_OUTBOUND_PORTS", False),
    ("o", "istio-local-outbound-ports-exclude", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", False),
    ("k", "kube-virt-interfaces", "KUBE_VIRT_INTERFACES", False),
    ("n", "dry-run", "DRY_RUN", True),
    ("f", "restore-format", "RESTORE_FORMAT", True),
    (None, "iptables-probe-port", "IPTABLES_PROBE_PORT", False),
    (None, "probe-timeout", "PROBE_TIMEOUT", False),
    (None, "skip-rule-apply", "SKIP_RULE_APPLY", True),
    (None, "run-validation", "RUN_VALIDATION", True),
    (None, "redirect-dns", "REDIRECT_DNS", True),
)
_SHORT = {f[0]: f for f in FLAGS if f[0]}
_LONG = {f[1]: f for f in FLAGS}


class StartArgs(NamedTuple):
    mode: str  # "init" (also for -p), "run", "clean", or "" (install iptables, then supervise)
    overrides: dict[str, tuple[str, str]]  # variable -> (value, "--flag") from istio-iptables flags


def parse_start_args(args: Sequence[str]) -> StartArgs:
    """`istio-start [init|-p|run|clean] [FLAGS]` as istio-start.sh 1.9 read it (by its first word)."""
    first = args[0] if args else ""
    if first in ("init", "-p"):
        return StartArgs("init", parse_iptables_flags(args))
    if first in ("run", "clean"):
        return StartArgs(first, {})
    return StartArgs("", {})


def parse_iptables_flags(args: Sequence[str]) -> dict[str, tuple[str, str]]:
    """istio-iptables flags -> {VARIABLE: (value, "--long-flag")}; positional words are ignored."""
    found: dict[str, tuple[str, str]] = {}
    problems: list[Problem] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            spec = _LONG.get(name)
        elif token.startswith("-") and len(token) > 1:
            name, value = token[1], token[2:]
            eq = "=" if value.startswith("=") else ""
            value = value[1:] if eq else value
            if value and not eq:
                eq = "="  # -p15001
            spec = _SHORT.get(name)
        else:
            continue  # e.g. "init": cobra accepted and ignored extra words
        if spec is None:
            problems.append(Problem("command line", None, None, f"unknown istio-iptables flag {token!r}"))
            continue
        if spec[3]:
            found[spec[2]] = (value if eq else "true", f"--{spec[1]}")
        elif eq:
            found[spec[2]] = (value, f"--{spec[1]}")
        elif i < len(args):
            found[spec[2]] = (args[i], f"--{spec[1]}")
            i += 1
        else:
            problems.append(Problem("command line", None, None, f"flag {token!r} needs a value"))
    if problems:
        raise ConfigError(problems)
    return found
