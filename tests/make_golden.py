"""Regenerate tests/data/golden/*.save from real iptables-save runs in a scratch namespace (root).

    .venv/bin/python -m tests.make_golden

Each file is one scenario's IPv4 dump (comments and counters dropped), per backend. The unit tests
read them; tests/kernel/test_apply_kernel.py checks that this machine's iptables still prints exactly them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from istio_vm.iptables.backend import BACKENDS
from testbed.netns import Netns
from tests import netns_iptables
from tests.helpers import DATA, text

GOLDEN = DATA / "golden"


def _reference(ns: Netns, backend: str) -> None:
    netns_iptables.restore(ns, backend, 4, text("reference-vm/expected-v4.restore"))


def _tproxy(ns: Netns, backend: str) -> None:
    netns_iptables.restore(ns, backend, 4, text("tproxy/v4.restore"))


def _leftovers(ns: Netns, backend: str) -> None:
    netns_iptables.restore(ns, backend, 4, netns_iptables.FOREIGN_V4)
    netns_iptables.leftovers_19(ns, backend)


SCENARIOS: dict[str, Callable[[Netns, str], None]] = {
    "reference": _reference,
    "tproxy": _tproxy,
    "leftovers-1.9": _leftovers,
}


def generate(scenario: str, backend: str) -> str:
    with Netns.temporary("golden") as ns:
        SCENARIOS[scenario](ns, backend)
        return netns_iptables.save(ns, backend, 4)


def main() -> int:
    GOLDEN.mkdir(exist_ok=True)
    for scenario in SCENARIOS:
        for backend in BACKENDS:
            (GOLDEN / f"{scenario}.{backend}.save").write_text(generate(scenario, backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
