"""Which iptables backend to use (nft or legacy), and the host's state read once with it: the snapshot.

`take()` chooses the backend (override, else the one recorded by the last install, else detection)
and returns one save dump per family: what Istio state is found, and what to restore if anything
fails. Detection spawns nothing in the common case: the nft saves are read anyway, and legacy can
only hold rules if /proc/net/ip_tables_names (ip6_tables_names) lists a table in this network
namespace; only then is `iptables-legacy-save` run. Legacy wins only when it has rules and nft has none.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import NamedTuple

from istio_vm import loggers
from istio_vm.errors import ApplyError
from istio_vm.iptables.found import find, has_rules
from istio_vm.iptables.names import FAMILIES
from istio_vm.iptables.runner import Completed, Runner

log = loggers.logger(__name__)

BACKENDS = ("nft", "legacy")
SAVE_TIMEOUT = 30.0
# iptables-save has no --wait: it only reads (legacy through getsockopt, nft through a netlink dump),
# and neither takes the xtables lock, so reading never blocks on a concurrent writer.
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


class Choice(NamedTuple):
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
            log.warning("Istio rules exist in the legacy backend (IPv%s) but nft has rules too: using nft; "
                        "install removes the legacy ones", "/".join(map(str, istio_in_legacy)))
        return Choice("nft", "rules exist in nft (legacy has some too)")
    if legacy_saves:
        return Choice("nft", "legacy tables exist but hold no rules")
    return Choice("nft", "no legacy table in this network namespace")


class Snapshot(NamedTuple):
    backend: str
    reason: str
    saves: dict[int, str]  # family -> iptables-save output; a skipped family (see take) is absent


def save(runner: Runner, backend: str, family: int) -> Completed:
    return runner.run([binary(backend, family, "save")], timeout=SAVE_TIMEOUT)


def _read(runner: Runner, backend: str, families: Collection[int], optional: Collection[int]) -> dict[int, str]:
    saves: dict[int, str] = {}
    for family in families:
        done = save(runner, backend, family)
        if done.ok:
            saves[family] = done.stdout
        elif family in optional:
            # e.g. a kernel without IPv6: fine as long as there is nothing to install for that family
            log.warning("IPv%d skipped, its rules cannot be read: %s", family, done.describe())
        else:
            raise ApplyError(f"cannot read the IPv{family} rules: {done.describe()}", stderr=done.stderr)
    return saves


def other_saves(runner: Runner, chosen: str, families: Collection[int], proc_net: str = PROC_NET) -> dict[int, str]:
    """The save dumps of the backend not chosen, for Istio rules left there (e.g. 1.9's in legacy): they
    capture traffic too. Legacy is read only where /proc says it has tables (no process otherwise)."""
    other = "legacy" if chosen == "nft" else "nft"
    wanted = [f for f in families if other == "nft" or legacy_tables(f, proc_net)]
    return _read(runner, other, wanted, optional=wanted) if wanted else {}


def take(runner: Runner, *, override: str | None, recorded: str | None, optional: Collection[int] = (),
         proc_net: str = PROC_NET) -> Snapshot:
    """Save both families with the chosen backend; families in `optional` may be unreadable (skipped)."""
    families = FAMILIES
    if override is not None:
        if override not in BACKENDS:
            raise ApplyError(f"unknown iptables backend {override!r}: nft or legacy")
        choice = Choice(override, "set by ISTIO_IPTABLES_BACKEND")
        saves = _read(runner, override, families, optional)
    elif recorded is not None:
        choice = Choice(recorded, "recorded by the last install")
        saves = _read(runner, recorded, families, optional)
    else:
        saves = _read(runner, "nft", families, optional)
        with_legacy = [f for f in saves if legacy_tables(f, proc_net)]
        legacy = _read(runner, "legacy", with_legacy, optional=with_legacy) if with_legacy else {}
        choice = decide(saves, legacy)
        if choice.backend == "legacy":
            # Families without legacy tables have no legacy rules: their empty dump is exact.
            saves = {f: legacy.get(f, "") for f in saves}
    log.info("iptables backend: %s (%s)", choice.backend, choice.reason)
    return Snapshot(choice.backend, choice.reason, saves)
