"""Helpers for kernel tests: test data, 1.9's way of applying rules, and comparable host state.

Everything runs inside a namespace given by the caller (testbed/netns.py); nothing here touches the
host's own network state.
"""

from __future__ import annotations

import re

from istio_vm.iptables.backend import binary
from istio_vm.iptables.names import BUILTIN_CHAINS, COMMAND
from istio_vm.iptables.saved import parse_save
from testbed.netns import Netns
from tests.helpers import text

_COUNTERS = re.compile(r"\[\d+:\d+\]")

# Rules that are not Istio's but look like it; every clean must leave them alone.
FOREIGN_V4 = """*nat
:MY_CHAIN - [0:0]
-A PREROUTING -i eth1 -p tcp -j RETURN
-A OUTPUT -p udp --dport 53 -j RETURN
-A OUTPUT -p udp --dport 53 -m owner --uid-owner 997 -j ACCEPT
-A OUTPUT -j MY_CHAIN
-A MY_CHAIN -d 192.0.2.10/32 -j RETURN
COMMIT
*filter
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
"""


def tool(backend: str, family: int, what: str = "") -> str:
    """iptables-nft, ip6tables-legacy-save...: the product's own names (backend.binary) for save and restore."""
    return binary(backend, family, what) if what else f"{COMMAND[family]}-{backend}"


def restore(ns: Netns, backend: str, family: int, rules: str, *, noflush: bool = True) -> None:
    argv = [tool(backend, family, "restore"), "--wait=10", *(["--noflush"] if noflush else [])]
    ns.run(*argv, input=rules)


def save(ns: Netns, backend: str, family: int) -> str:
    """The family's rules, comparable: no comments, counters zeroed, empty built-in tables left out."""
    dump = ns.run(tool(backend, family, "save")).stdout
    kept: list[str] = []
    for name, table in parse_save(dump).items():
        policies_default = all(p == "ACCEPT" for c, p in table.chains if c in BUILTIN_CHAINS)
        if table.has_content() or not policies_default:
            section = [line for line in dump.splitlines() if line and not line.startswith("#")]
            start = section.index(f"*{name}")
            end = section.index("COMMIT", start)
            kept += [_COUNTERS.sub("[0:0]", line) for line in section[start:end + 1]]
    return "\n".join(kept) + ("\n" if kept else "")


def state(ns: Netns, backend: str) -> dict[str, str]:
    """Everything install may change: both families' rules, policy routing, routes, lo's addresses."""
    return {
        "v4": save(ns, backend, 4),
        "v6": save(ns, backend, 6),
        "ip rule": ns.ip("rule").stdout,
        "ip -6 rule": ns.ip("-6", "rule").stdout,
        "routes": ns.ip("route", "show", "table", "all").stdout,
        "routes6": ns.ip("-6", "route", "show", "table", "all").stdout,
        "lo": ns.ip("-6", "addr", "show", "dev", "lo").stdout,
    }


def clean_19(ns: Netns, backend: str) -> None:
    """istio-clean-iptables 1.9: its 34 commands, every error ignored."""
    for line in text("reference-vm/clean-commands-1.9.txt").splitlines():
        command, *args = line.split()
        ns.run(f"{command}-{backend}", *args, check=False)


def install_19(ns: Netns, backend: str, rules: str) -> bool:
    """istio-start.sh 1.9: clean, then `iptables-restore --noflush` (no -w); True if the restore worked."""
    clean_19(ns, backend)
    done = ns.run(tool(backend, 4, "restore"), "--noflush", input=rules, check=False)
    return done.returncode == 0


def leftovers_19(ns: Netns, backend: str) -> None:
    """What restarts of Istio 1.9 leave: duplicated DNS and CONNMARK rules, kubevirt rules, a stuck chain."""
    for name in ("reference-vm/expected-v4.restore", "reference-vm/expected-v4.restore",
                 "tproxy/v4.restore", "tproxy/v4.restore", "kubevirt-1.9/v4.restore"):
        assert install_19(ns, backend, text(name)), name
    # The second kubevirt start fails, as in 1.9: clean cannot delete the still-referenced ISTIO_REDIRECT.
    assert not install_19(ns, backend, text("kubevirt-1.9/v4.restore"))
