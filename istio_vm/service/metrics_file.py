"""Writing the metrics file (ISTIO_VM_METRICS_FILE), and the last verify's result that goes into it.

The supervisor rewrites the file whenever its content changes (never by polling): a temporary file in
the same directory, then rename(2), so node_exporter's textfile collector reads the old file or the new
one, whole. `istio-vm iptables verify` (root, the verify timer) records its result in the run dir and
sends SIGUSR2 to the running `istio-vm start`, whose loop reads it back into the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from istio_vm import loggers, trust
from istio_vm.errors import UntrustedPathError
from istio_vm.iptables.parts import Part
from istio_vm.service.metrics import MetricsSnapshot, VerifyOutcome, render_metrics

log = loggers.logger(__name__)

VERIFY_RESULT = "verify-result.json"  # run dir (root's, 0644): the last verify, for the supervisor to read


@dataclass
class MetricsWriter:
    """The loop's end: a MetricsSnapshot of the supervisor after every change, written when the text differs."""

    path: str
    run_dir: str
    version: str
    capture_policy: str
    rules: Callable[[frozenset[Part]], Mapping[int, int]] | None  # rules installed with these parts on; None: none
    wall: Callable[[], float] = time.time
    started: float = field(init=False)
    _text: str | None = field(init=False, default=None)
    _failed: str | None = field(init=False, default=None)  # the last write error, logged once
    _verify: VerifyOutcome | None = field(init=False, default=None)
    _exit_time: float | None = field(init=False, default=None)
    _exits_seen: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.started = self.wall()
        self.read_verify()

    def read_verify(self) -> None:
        """SIGUSR2 (a verify ran), and at start: the last verify recorded in the run dir."""
        self._verify = read_verify(self.run_dir)

    def new_rules(self, counts: Mapping[int, int]) -> None:
        """A reload installed another plan (fail-closed: every part on)."""
        self.rules = lambda on: counts

    def update(self, *, state: str, ready: bool, epoch: int | None, restarts: Mapping[str, int],
               reloads: Mapping[bool, int], last_exit: tuple[str, str] | None, exits_seen: int,
               capture: frozenset[Part] | None, exit_status: int | None) -> None:
        if exits_seen != self._exits_seen:  # a new loss: its time is now
            self._exits_seen, self._exit_time = exits_seen, self.wall()
        snapshot = MetricsSnapshot(
            version=self.version, started=self.started, state=state, ready=ready, epoch=epoch, restarts=restarts,
            reloads=reloads, last_exit=None if last_exit is None else (*last_exit, self._exit_time or self.started),
            capture_policy=self.capture_policy, capture=None if self.rules is None else capture,
            rules={} if self.rules is None or capture is None else self.rules(capture),
            verify=self._verify, exit_status=exit_status)
        text = render_metrics(snapshot)
        if text != self._text:
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            trust.replace_file(self.path, text, 0o644)  # 0644: node_exporter runs as another user
        except OSError as e:  # metrics must never take the supervisor down (a full disk, a removed dir)
            message = f"{self.path}: {e.strerror or e}"
            if message != self._failed:
                log.warning("Cannot write the metrics file: %s (retried at the next change)", message,
                            extra={"ISTIO_EVENT": "metrics"})
            self._failed = message
            return
        if self._failed is not None:
            log.info("Metrics file written again: %s", self.path, extra={"ISTIO_EVENT": "metrics"})
        self._text, self._failed = text, None


# ---- the last verify ---------------------------------------------------------------------------------------
def record_verify(run_dir: str, drift: Mapping[str, int], *, wall: Callable[[], float] = time.time) -> None:
    """As root after `iptables verify`: the result in the run dir, and SIGUSR2 to the running start (if any)
    so its metrics file says it. Best effort: verify's own exit status and journal entry are what counts."""
    from istio_vm.service.start import running_pid

    try:  # root's own run dir: trust's writer (checked directory, no planted link followed)
        trust.write_atomic(run_dir, VERIFY_RESULT, json.dumps({"time": wall(), "drift": dict(drift)}))
    except (OSError, UntrustedPathError) as e:
        log.debug("verify result not recorded in %s: %s", run_dir, e)
        return
    pid = running_pid(run_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR2)


def read_verify(run_dir: str) -> VerifyOutcome | None:
    try:
        with open(os.path.join(run_dir, VERIFY_RESULT), encoding="utf-8") as f:
            data = json.load(f)
        return VerifyOutcome(float(data["time"]), {str(k): int(v) for k, v in dict(data["drift"]).items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("Unreadable verify result %s/%s: %s", run_dir, VERIFY_RESULT, e, extra={"ISTIO_EVENT": "metrics"})
        return None


def forget_verify(run_dir: str) -> None:
    """At start, as root: the previous run's verify says nothing about the rules this start installs."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(run_dir, VERIFY_RESULT))

