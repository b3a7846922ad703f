"""The capture parts the running service says should be on now, recorded in the run dir for `verify`.

Written by the capture helper (fail-open policies) after each change; absent means every part (the
fail-closed policy, or no service). `clean` removes it with the rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from istio_vm.iptables.parts import Part

log = logging.getLogger(__name__)
CAPTURE_FILE = "capture.json"


def write_expected(run_dir: str, policy: str, on: frozenset[Part]) -> None:
    """Record the parts that should be on now, atomically (a temporary file, then rename)."""
    path = os.path.join(run_dir, CAPTURE_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"policy": policy, "on": sorted(on)}, f)
        f.write("\n")
    os.replace(tmp, path)


def read_expected(run_dir: str) -> tuple[str, frozenset[Part]] | None:
    """(policy, parts on) as the running service recorded them; None when nothing is recorded."""
    path = os.path.join(run_dir, CAPTURE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return str(data["policy"]), frozenset(Part(p) for p in data["on"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); expecting every part", path, e)
        return None


def remove_expected(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, CAPTURE_FILE))
