"""The metrics file's content (ISTIO_VM_METRICS_FILE): a snapshot of the supervisor, in Prometheus' text format.

Pure: the loop builds a `MetricsSnapshot` after every change and writes `render_metrics(snapshot)`
with metrics_file.py (node_exporter's textfile collector convention: written whole, then renamed into
place). Every series a fleet alerts on is always present while istio-vm runs (counters from 0), so an
alert never waits for a first occurrence; the per-run series go once istio-vm has stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from istio_vm.iptables.parts import ALL_PARTS, Part

# Why an epoch was replaced: a crash (exit or signal), a spawn that failed, an envoy hot restart, or a
# reload that restarted pilot-agent with new settings.
RESTART_REASONS = ("exit", "signal", "spawn_failed", "hot_restart", "reload")
STATES = ("new", "starting", "running", "reloading", "backoff", "draining", "stopping", "stopped")
DRIFT_KINDS = ("missing", "unexpected", "other_backend")  # iptables.verify.VerifyResult.counts()


@dataclass(frozen=True, slots=True)
class VerifyOutcome:
    """The last `istio-vm iptables verify`: when (Unix time), and what drifted (lines by kind)."""

    time: float
    drift: Mapping[str, int]

    @property
    def ok(self) -> bool:
        return not any(self.drift.values())


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    version: str
    started: float  # Unix time of this istio-vm start
    state: str  # machine.State
    ready: bool  # an epoch answers its readiness check
    epoch: int | None  # the current epoch (None: none yet, or between two)
    restarts: Mapping[str, int]  # by RESTART_REASONS
    reloads: Mapping[bool, int]  # by outcome
    last_exit: tuple[str, str, float] | None = None  # (kind "exit"/"signal"/"spawn_failed", detail, Unix time)
    capture_policy: str = "fail-closed"
    capture: frozenset[Part] | None = None  # None: istio-vm did not install the rules (init mode, custom)
    rules: Mapping[int, int] = field(default_factory=dict)  # family -> rules installed now
    verify: VerifyOutcome | None = None
    exit_status: int | None = None  # once stopped


def render_metrics(s: MetricsSnapshot) -> str:
    return "".join(f"{line}\n" for line in _lines(s))


def _lines(s: MetricsSnapshot) -> Iterator[str]:
    up = s.state != "stopped"
    yield from _metric("build_info", "gauge", "istio-vm's version (always 1).", [({"version": s.version}, 1)])
    yield from _metric("up", "gauge", "1 while istio-vm supervises the proxy, 0 once it has stopped.", [({}, int(up))])
    yield from _metric("start_time_seconds", "gauge", "When this istio-vm started (Unix time).", [({}, s.started)])
    if not up:
        yield from _metric("exit_status", "gauge", "istio-vm's exit status (docs/operations.md: Exit statuses).",
                           [({}, s.exit_status if s.exit_status is not None else 1)])
    yield from _metric("state", "gauge", "The supervisor's state (1 for the current one).",
                       [({"state": state}, int(state == s.state)) for state in STATES])
    yield from _metric("proxy_ready", "gauge", "1 while an epoch of the proxy answers its readiness check.",
                       [({}, int(s.ready and up))])
    if s.epoch is not None and up:
        yield from _metric("epoch", "gauge", "The current epoch of the proxy (0 for the first, +1 per restart).",
                           [({}, s.epoch)])
    yield from _metric("proxy_restarts_total", "counter", "Epochs started to replace another, by reason.",
                       [({"reason": reason}, s.restarts.get(reason, 0)) for reason in RESTART_REASONS])
    yield from _metric("reloads_total", "counter", "Reloads (SIGHUP, istio-vm reload) by outcome.",
                       [({"result": "ok"}, s.reloads.get(True, 0)), ({"result": "failed"}, s.reloads.get(False, 0))])
    if s.last_exit is not None:
        kind, detail, when = s.last_exit
        yield from _metric("proxy_last_exit_info", "gauge", "How the proxy's last epoch that was lost ended.",
                           [({"kind": kind, "detail": detail}, 1)])
        yield from _metric("proxy_last_exit_timestamp_seconds", "gauge", "When that epoch ended (Unix time).",
                           [({}, when)])
    yield from _metric("capture_policy_info", "gauge", "ISTIO_VM_CAPTURE (always 1).",
                       [({"policy": s.capture_policy}, 1)])
    if s.capture is not None and up:
        yield from _metric("capture_part", "gauge", "1 for each part of the capture that is on now.",
                           [({"part": str(part)}, int(part in s.capture)) for part in sorted(ALL_PARTS)])
        yield from _metric("iptables_rules", "gauge", "Capture rules istio-vm has installed now, by family.",
                           [({"family": f"ipv{family}"}, s.rules.get(family, 0)) for family in (4, 6)])
    if s.verify is not None:
        v = s.verify
        yield from _metric("verify_ok", "gauge", "1 when the last iptables verify found the rules as planned.",
                           [({}, int(v.ok))])
        yield from _metric("verify_timestamp_seconds", "gauge", "When the last iptables verify ran (Unix time).",
                           [({}, v.time)])
        yield from _metric("verify_drift_lines", "gauge", "Lines the last iptables verify found drifted, by kind.",
                           [({"kind": kind}, v.drift.get(kind, 0)) for kind in DRIFT_KINDS])


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> Iterator[str]:
    full = f"istio_vm_{name}"
    yield f"# HELP {full} {help_text}"
    yield f"# TYPE {full} {kind}"
    for labels, value in samples:
        inner = ",".join(f'{key}="{_label_value(val)}"' for key, val in labels.items())
        yield f"{full}{{{inner}}} {_sample_value(value)}" if inner else f"{full} {_sample_value(value)}"


def _label_value(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
