"""Canonical form of planned rules: load them into a private, empty network namespace and save them back.

One process tree and no second Python: `unshare --net -- sh -c SCRIPT` restores each family's text from a
file of a private temporary directory and saves it again. unshare(1) runs the shell only once it is in its
new namespace (and fails without running anything otherwise), so no iptables command of it ever sees the
host's; the namespace dies with the shell, and iptables itself does the normalising.
"""

from __future__ import annotations

import os
import tempfile

from istio_vm.iptables.backend import binary
from istio_vm.iptables.runner import Completed, Runner

SCRATCH_TIMEOUT = 60.0
MARKER = "#istio-vm scratch family "  # a line no iptables-save prints (rules start with -A, comments "# ")
# Data only as arguments: RESTORE SAVE FILE FAMILY, four per family; the script itself is constant.
SCRIPT = (f'set -e; while [ "$#" -gt 0 ]; do "$1" --wait=10 "$3"; printf \'{MARKER}%s\\n\' "$4"; "$2"; '
          "shift 4; done")


def restore_and_save(runner: Runner, backend: str, texts: dict[int, str]) -> tuple[Completed, dict[int, str]]:
    """Each non-empty text restored in a scratch namespace and saved back: (the run, {family: save})."""
    wanted = {family: text for family, text in texts.items() if text.strip()}
    with tempfile.TemporaryDirectory(prefix="istio-vm-verify-") as directory:  # 0700, ours
        args: list[str] = []
        for family, text in sorted(wanted.items()):
            path = os.path.join(directory, f"v{family}.restore")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            args += [binary(backend, family, "restore"), binary(backend, family, "save"), path, str(family)]
        done = runner.run(["unshare", "--net", "--", "sh", "-c", SCRIPT, "sh", *args],
                          timeout=SCRATCH_TIMEOUT)
    saves = dict.fromkeys(texts, "")
    if done.ok:
        saves.update(split_saves(done.stdout))
    return done, saves


def split_saves(stdout: str) -> dict[int, str]:
    """The script's output, one save per family, each after its marker line."""
    found: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines(keepends=True):
        if line.startswith(MARKER):
            current = found.setdefault(int(line[len(MARKER):]), [])
        elif current is not None:
            current.append(line)
    return {family: "".join(lines) for family, lines in found.items()}
