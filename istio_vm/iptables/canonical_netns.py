"""Canonical form of planned rules: load them into a private, empty network namespace and save them back.

Run by verify.py as `unshare --net -- python -m istio_vm.iptables.canonical_netns BACKEND` with JSON
{"4": text, "6": text} on stdin; prints JSON {"4": save, "6": save}. The namespace dies with the
process, so nothing it loads is ever visible to the host: iptables itself does the normalising.
"""

from __future__ import annotations

import json
import sys

from istio_vm.iptables.backend import binary
from istio_vm.iptables.runner import Runner, SubprocessRunner

TOOL_TIMEOUT = 30.0


class _ToolFailed(Exception):
    pass


def restore_and_save(runner: Runner, backend: str, texts: dict[str, str]) -> dict[str, str]:
    """Restore each non-empty text here (a fresh namespace: no --noflush needed) and save it back."""
    saves: dict[str, str] = {}
    for family, text in texts.items():
        if not text.strip():
            saves[family] = ""
            continue
        _ran(runner, [binary(backend, int(family), "restore"), "--wait=10"], text)
        saves[family] = _ran(runner, [binary(backend, int(family), "save")], None)
    return saves


def _ran(runner: Runner, argv: list[str], given: str | None) -> str:
    """The command's stdout; _ToolFailed with its status and stderr when it failed."""
    done = runner.run(argv, input=given, timeout=TOOL_TIMEOUT)
    if not done.ok:
        raise _ToolFailed(done.describe())
    return done.stdout


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("nft", "legacy"):
        print("usage: unshare --net -- python -m istio_vm.iptables.canonical_netns nft|legacy "
              '< {"4": ..., "6": ...}', file=sys.stderr)
        return 2
    try:
        json.dump(restore_and_save(SubprocessRunner(), argv[1], json.load(sys.stdin)), sys.stdout)
    except _ToolFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
