"""A fingerprint of the host's own network state, taken before and after the test session.

Every test that runs iptables or ip works inside a network namespace it created; this guard proves
it: the session fails if the host's rules, policy routing or routes differ at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

# (label, argv): both iptables backends, both families, policy routing and routes.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("iptables-nft-save", ("iptables-nft-save",)),
    ("ip6tables-nft-save", ("ip6tables-nft-save",)),
    ("iptables-legacy-save", ("iptables-legacy-save",)),
    ("ip6tables-legacy-save", ("ip6tables-legacy-save",)),
    ("ip rule", ("ip", "rule")),
    ("ip -6 rule", ("ip", "-6", "rule")),
    ("ip route show table all", ("ip", "route", "show", "table", "all")),
    ("ip -br addr", ("ip", "-br", "addr")),
)
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def normalise(label: str, text: str) -> str:
    """Drop what changes by itself: save-tool comment lines (timestamps) and packet counters."""
    if "save" not in label:
        return text
    lines = [_COUNTERS.sub("[0:0]", line) for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(lines)


def fingerprint() -> dict[str, str]:
    """The host's network state, one normalised text per command (commands not installed are skipped)."""
    state: dict[str, str] = {}
    if os.geteuid() != 0:
        return state
    for label, argv in COMMANDS:
        if shutil.which(argv[0]) is None:
            continue
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        state[label] = f"rc={done.returncode}\n{normalise(label, done.stdout)}"
    return state


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [label for label in before.keys() | after.keys() if before.get(label) != after.get(label)]
