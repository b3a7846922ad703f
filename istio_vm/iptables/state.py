"""What istio-vm applied, remembered under the run dir (JSON, written atomically), and its lock.

The state file records the backend and the `ip` commands of the last install, so `clean` can delete
exactly the TPROXY rule/route and `::6/128` it added, whatever the configuration says by then. The
lock keeps two istio-vm runs from interleaving their save and restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from typing import NamedTuple

from istio_vm import loggers, trust
from istio_vm.errors import ApplyError, UntrustedPathError
from istio_vm.iptables.found import Owners

log = loggers.logger(__name__)

STATE_FILE = "iptables-state.json"
IPTABLES_LOCK = "iptables.lock"  # not the run lock of `istio-vm start` (service/start.py)
VERSION = 1
MAX_STATE = 1 << 20  # bytes read at most: a real state file is a few hundred


class RunState(NamedTuple):
    backend: str | None = None
    ip_commands: tuple[tuple[str, ...], ...] = ()
    owners: Owners = Owners()  # values of the 1.9-shaped built-in rules it wrote

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "backend": self.backend,
                           "ip_commands": [list(c) for c in self.ip_commands],
                           "owners": self.owners.to_json()}, indent=2) + "\n"


def read(run_dir: str) -> RunState:
    """The recorded state; an absent file means nothing recorded. An unreadable one is logged and ignored."""
    path = os.path.join(run_dir, STATE_FILE)
    trust.check_root_dir(run_dir, create=False)
    try:
        # Root replays the ip commands it lists: only a file root wrote may be believed.
        fd = trust.open_checked(path, os.O_RDONLY, owners=(os.geteuid(),))
        with open(fd, encoding="utf-8") as f:
            return _from_json(json.loads(f.read(MAX_STATE)))
    except FileNotFoundError:
        return RunState()
    except UntrustedPathError as e:
        log.warning("%s; treating as no recorded state", e)
        return RunState()
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("%s: unreadable (%s); treating as no recorded state", path, e)
        return RunState()


def _from_json(data: object) -> RunState:
    """The state of a parsed state file, its shape checked (ValueError naming what is wrong)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    backend = data.get("backend")
    if backend not in (None, "nft", "legacy"):
        raise ValueError(f"unknown backend {backend!r}")
    commands = data.get("ip_commands", [])
    if not isinstance(commands, list) or not all(
            isinstance(c, list) and all(isinstance(w, str) for w in c) for c in commands):
        raise ValueError("ip_commands is not a list of argv lists")
    owners = data.get("owners", {})
    if not isinstance(owners, dict) or not all(
            isinstance(v, list) and all(isinstance(w, str) for w in v) for v in owners.values()):
        raise ValueError("owners is not an object of string lists")
    recorded = Owners.of(**{k: ",".join(owners.get(k, [])) for k in ("uids", "gids", "marks", "interfaces")})
    return RunState(backend, tuple(tuple(c) for c in commands), recorded)


def write(run_dir: str, state: RunState) -> None:
    """Write the state file atomically (trust.write_atomic: a planted link is never followed)."""
    trust.write_atomic(run_dir, STATE_FILE, state.to_json())


def remove(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, STATE_FILE))


@contextlib.contextmanager
def locked(run_dir: str, timeout: float = 30.0) -> Iterator[None]:
    """Hold an exclusive flock on RUN_DIR/iptables.lock, waiting at most `timeout` seconds."""
    trust.check_root_dir(run_dir)
    path = os.path.join(run_dir, IPTABLES_LOCK)
    fd = trust.open_checked(path, os.O_RDWR | os.O_CREAT, 0o600, owners=(os.geteuid(),))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ApplyError(f"{path}: another istio-vm holds the lock (waited {timeout:g}s)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
