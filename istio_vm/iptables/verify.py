"""Compare the live Istio rules of the host with the plan: match, or drift with a diff.

Both sides are compared in canonical `iptables-save` form. Rather than re-implement iptables'
normalisation (option order, `-m tcp`, `--to-port` -> `--to-ports`, 1337 -> 0x539, default masks...),
the plan is loaded into a private scratch network namespace (canonical_netns.py) with the same
backend and saved there: iptables normalises it exactly as it normalised the live rules.
"""

from __future__ import annotations

import collections
import difflib
import json
from typing import NamedTuple

from istio_vm.errors import ApplyError
from istio_vm.iptables import canonical_netns, state
from istio_vm.iptables.backend import PROC_NET, other_saves, take
from istio_vm.iptables.found import Owners, everything, find
from istio_vm.iptables.names import FAMILIES
from istio_vm.iptables.rules import Plan
from istio_vm.iptables.runner import CountingRunner, Runner, SubprocessRunner


class FamilyVerdict(NamedTuple):
    family: int
    planned: tuple[str, ...]  # Istio-owned state of the plan, canonical, table by table
    live: tuple[str, ...]  # Istio-owned state found on the host, same form

    @property
    def drift(self) -> bool:
        return self.planned != self.live

    def missing(self) -> list[str]:
        """Planned lines absent from the host (counting duplicates)."""
        return _counted_difference(self.planned, self.live)

    def unexpected(self) -> list[str]:
        """Live lines the plan does not have (counting duplicates), e.g. 1.9's piled-up DNS rules."""
        return _counted_difference(self.live, self.planned)


def _counted_difference(a: tuple[str, ...], b: tuple[str, ...]) -> list[str]:
    extra = collections.Counter(a) - collections.Counter(b)
    out = []
    for line in a:
        if extra[line] > 0:
            out.append(line)
            extra[line] -= 1
    return out


class VerifyResult(NamedTuple):
    backend: str
    families: tuple[FamilyVerdict, ...]
    processes: int
    other_backend: str = ""
    other: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (family, Istio lines) in the backend not chosen

    @property
    def drift(self) -> bool:
        return any(f.drift for f in self.families) or any(lines for _, lines in self.other)

    def counts(self) -> dict[str, int]:
        """What drifted, as numbers to alert on: planned lines missing, live lines unexpected, Istio lines
        in the other backend."""
        return {"missing": sum(len(f.missing()) for f in self.families),
                "unexpected": sum(len(f.unexpected()) for f in self.families),
                "other_backend": sum(len(lines) for _, lines in self.other)}

    def diff(self) -> str:
        """A unified diff, planned -> live, of each drifting family ("" when everything matches)."""
        out: list[str] = []
        for f in self.families:
            if f.drift:
                out += difflib.unified_diff(f.planned, f.live, f"planned IPv{f.family}", f"live IPv{f.family}",
                                            lineterm="", n=2)
        for family, lines in self.other:
            if lines:
                out.append(f"+++ IPv{family} Istio rules in the {self.other_backend} backend, which istio-vm does "
                           f"not use ({self.backend} is): they capture traffic too")
                out += [f"+{line}" for line in lines]
        return "\n".join(out) + ("\n" if out else "")

    def to_json(self) -> str:
        return json.dumps({
            "drift": self.drift,
            "backend": self.backend,
            "processes": self.processes,
            "counts": self.counts(),
            "other_backend": {"backend": self.other_backend,
                              "families": {str(family): list(lines) for family, lines in self.other}},
            "families": {str(f.family): {"drift": f.drift, "missing": f.missing(), "unexpected": f.unexpected(),
                                         "order_differs": f.drift and not f.missing() and not f.unexpected(),
                                         "planned": list(f.planned), "live": list(f.live)}
                         for f in self.families},
        }, indent=2)


def saved_in_scratch_netns(runner: Runner, backend: str, plan: Plan) -> dict[int, str]:
    """The plan as `iptables-save` prints it, per family, from a scratch network namespace (one process tree)."""
    texts = {family: plan.restore(family) for family in FAMILIES}  # rendered here: this is where they are written
    if not any(texts.values()):
        return dict.fromkeys(texts, "")
    done, saves = canonical_netns.restore_and_save(runner, backend, texts)
    if not done.ok:
        raise ApplyError(f"cannot load the planned rules into a scratch namespace: {done.describe()}",
                         stderr=done.stderr)
    return saves


def compare(plan: Plan, *, backend: str | None = None, runner: Runner | None = None,
            run_dir: str | None = None, proc_net: str = PROC_NET, owners: Owners | None = None) -> VerifyResult:
    """Compare the host's Istio rules (both families) with the plan; nothing is changed.

    backend: as for install (None: the one recorded in run_dir, else detected). Processes: the two
    saves (plus a legacy look when detection needs it) and one scratch-namespace run.
    """
    counting = CountingRunner(runner or SubprocessRunner())
    previous = state.read(run_dir) if run_dir else state.RunState()
    recorded = previous.backend
    owners = None if owners is None else owners | previous.owners
    snap = take(counting, override=backend, recorded=recorded, optional=set() if plan.v6 else {6},
                proc_net=proc_net)
    other = other_saves(counting, snap.backend, FAMILIES, proc_net)
    planned = saved_in_scratch_netns(counting, snap.backend, plan)
    verdicts = tuple(
        FamilyVerdict(family, tuple(everything(planned.get(family, "")).view()),
                      tuple(find(snap.saves.get(family, ""), owners).view()))
        for family in FAMILIES)
    found_other = tuple((family, tuple(find(text, owners).view())) for family, text in sorted(other.items()))
    return VerifyResult(snap.backend, verdicts, len(counting.calls), "legacy" if snap.backend == "nft" else "nft",
                        found_other)
