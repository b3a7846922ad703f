"""Reading the host's iptables state once: one save per family, which is also the rollback snapshot.

`take()` chooses the backend (override, else the one recorded by the last install, else detection,
see backend.py) and returns the save dump of each family. These dumps are everything the rest needs:
what Istio state is found, and what to restore if anything fails.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from istio_vm.errors import ApplyError
from istio_vm.iptables import backend as backends
from istio_vm.iptables.runner import Completed, Runner

log = logging.getLogger(__name__)

SAVE_TIMEOUT = 30.0
# iptables-save has no --wait: it only reads (legacy through getsockopt, nft through a netlink dump),
# and neither takes the xtables lock, so reading never blocks on a concurrent writer.


@dataclass(frozen=True, slots=True)
class Snapshot:
    backend: str
    reason: str
    saves: dict[int, str]  # family -> iptables-save output; a skipped family (see take) is absent


def save(runner: Runner, backend: str, family: int) -> Completed:
    return runner.run([backends.binary(backend, family, "save")], timeout=SAVE_TIMEOUT)


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


def take(runner: Runner, *, override: str | None, recorded: str | None, optional: Collection[int] = (),
         proc_net: str = backends.PROC_NET) -> Snapshot:
    """Save both families with the chosen backend; families in `optional` may be unreadable (skipped)."""
    families = backends.FAMILIES
    if override is not None:
        if override not in backends.BACKENDS:
            raise ApplyError(f"unknown iptables backend {override!r}: nft or legacy")
        choice = backends.Choice(override, "set by ISTIO_IPTABLES_BACKEND")
        saves = _read(runner, override, families, optional)
    elif recorded is not None:
        choice = backends.Choice(recorded, "recorded by the last install")
        saves = _read(runner, recorded, families, optional)
    else:
        saves = _read(runner, "nft", families, optional)
        with_legacy = [f for f in saves if backends.legacy_tables(f, proc_net)]
        legacy = _read(runner, "legacy", with_legacy, optional=with_legacy) if with_legacy else {}
        choice = backends.decide(saves, legacy)
        if choice.backend == "legacy":
            # Families without legacy tables have no legacy rules: their empty dump is exact.
            saves = {f: legacy.get(f, "") for f in saves}
    log.info("iptables backend: %s (%s)", choice.backend, choice.reason)
    return Snapshot(choice.backend, choice.reason, saves)
