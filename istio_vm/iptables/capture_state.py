"""The capture parts the running service says should be on now, recorded in the run dir for `verify`.

Written by `istio-vm start`'s install and by the capture helper (fail-open policies) after each change;
absent means every part (the fail-closed policy, or no service). `clean` removes it with the rules. Root
writes and believes it only through istio_vm/trust.py: no link planted at its name is ever followed.
"""

from __future__ import annotations

import contextlib
import json
import os

from istio_vm import loggers, trust
from istio_vm.errors import UntrustedPathError
from istio_vm.iptables.parts import Part

log = loggers.logger(__name__)
CAPTURE_FILE = "capture.json"
MAX_CAPTURE = 4096  # bytes read at most: a real one is about 50


def write_expected(run_dir: str, policy: str, on: frozenset[Part]) -> None:
    """Record the parts that should be on now, atomically (trust.write_atomic)."""
    trust.write_atomic(run_dir, CAPTURE_FILE, json.dumps({"policy": policy, "on": sorted(on)}) + "\n")


def read_expected(run_dir: str) -> tuple[str, frozenset[Part]] | None:
    """(policy, parts on) as the running service recorded them; None when nothing is recorded."""
    path = os.path.join(run_dir, CAPTURE_FILE)
    trust.check_root_dir(run_dir, create=False)  # an untrusted run dir is an error (78), as for the state file
    try:
        fd = trust.open_checked(path, os.O_RDONLY, owners=(os.geteuid(),))  # only what we wrote is believed
        with open(fd, encoding="utf-8") as f:
            data = json.loads(f.read(MAX_CAPTURE))
        return str(data["policy"]), frozenset(Part(p) for p in data["on"])
    except FileNotFoundError:
        return None
    except UntrustedPathError as e:
        log.warning("%s; expecting every part", e)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); expecting every part", path, e)
        return None


def remove_expected(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, CAPTURE_FILE))
