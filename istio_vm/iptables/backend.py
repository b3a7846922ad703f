"""Which iptables backend to use (nft or legacy), and the backend-specific binaries.

Detection spawns nothing in the common case: the nft saves are read anyway, and legacy can only
hold rules if /proc/net/ip_tables_names (ip6_tables_names) lists a table in this network namespace;
only then is `iptables-legacy-save` run. Legacy wins only when it has rules and nft has none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from istio_vm.iptables.found import find, has_rules

log = logging.getLogger(__name__)

BACKENDS = ("nft", "legacy")
FAMILIES = (4, 6)
# /proc/net is the namespace of the process's main thread; thread-self follows setns(2) of this thread.
PROC_NET = "/proc/thread-self/net"


def binary(backend: str, family: int, tool: str) -> str:
    """E.g. iptables-nft-restore, ip6tables-legacy-save: never the alternatives symlink `iptables`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown iptables backend {backend!r} (nft or legacy)")
    return f"{'ip6' if family == 6 else 'ip'}tables-{backend}-{tool}"


def legacy_tables(family: int, proc_net: str = PROC_NET) -> list[str]:
    """Tables the legacy (x_tables) backend has instantiated in this network namespace."""
    name = "ip6_tables_names" if family == 6 else "ip_tables_names"
    try:
        with open(os.path.join(proc_net, name), encoding="ascii") as f:
            return f.read().split()
    except OSError:  # module not loaded: no legacy table can exist
        return []


@dataclass(frozen=True, slots=True)
class Choice:
    backend: str
    reason: str


def decide(nft_saves: Mapping[int, str], legacy_saves: Mapping[int, str]) -> Choice:
    """Pure: nft, unless legacy has rules and nft has none. Warns when Istio state stays in legacy."""
    nft_has = any(has_rules(text) for text in nft_saves.values())
    legacy_has = any(has_rules(text) for text in legacy_saves.values())
    if legacy_has and not nft_has:
        return Choice("legacy", "rules exist only in the legacy backend")
    if legacy_has:
        istio_in_legacy = [f for f, text in legacy_saves.items() if not find(text).empty]
        if istio_in_legacy:
            log.warning("Istio rules exist in the legacy backend (IPv%s) but nft has rules too: using nft "
                        "and leaving legacy alone; remove them with ISTIO_IPTABLES_BACKEND=legacy clean",
                        "/".join(map(str, istio_in_legacy)))
        return Choice("nft", "rules exist in nft (legacy has some too)")
    if legacy_saves:
        return Choice("nft", "legacy tables exist but hold no rules")
    return Choice("nft", "no legacy table in this network namespace")
