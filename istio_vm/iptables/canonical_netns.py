"""Canonical form of planned rules: load them into a private, empty network namespace and save them.

Run as `unshare --net -- python -m istio_vm.iptables.canonical_netns BACKEND` with JSON {"4": text, "6": text} on
stdin; prints JSON {"4": save, "6": save}. The namespace dies with the process, so nothing it loads
is ever visible to the host. Used by verify.py: iptables itself does the normalising.
"""

from __future__ import annotations

import json
import subprocess
import sys

from istio_vm.iptables.backend import binary

TIMEOUT = 30.0


def canonical(backend: str, texts: dict[str, str]) -> dict[str, str]:
    """Restore each non-empty text here (a fresh namespace: no --noflush needed) and save it back."""
    saves: dict[str, str] = {}
    for family, text in texts.items():
        if not text.strip():
            saves[family] = ""
            continue
        fam = int(family)
        subprocess.run([binary(backend, fam, "restore"), "--wait=10"], input=text, text=True, check=True,
                       capture_output=True, timeout=TIMEOUT)
        saves[family] = subprocess.run([binary(backend, fam, "save")], text=True, check=True,
                                       capture_output=True, timeout=TIMEOUT).stdout
    return saves


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: unshare --net -- python -m istio_vm.iptables.canonical_netns nft|legacy "
              '< {"4": ..., "6": ...}', file=sys.stderr)
        return 2
    try:
        json.dump(canonical(argv[1], json.load(sys.stdin)), sys.stdout)
    except subprocess.CalledProcessError as e:
        print(f"{' '.join(e.cmd)}: {e.stderr.strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
