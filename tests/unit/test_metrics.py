"""istio_vm.service.metrics and metrics_file: the metrics file's text, as Prometheus' parser reads it, and
its atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_vm.iptables.parts import ALL_PARTS, Part
from istio_vm.service.metrics import MetricsSnapshot, VerifyOutcome, render_metrics
from istio_vm.service.metrics_file import MetricsWriter, read_verify
from istio_vm.trust import replace_file
from tests.metrics_text import parse_metrics

RUNNING = MetricsSnapshot(version="0.1.0", started=1764633600.5, state="running", ready=True, epoch=2,
                          restarts={"exit": 1, "hot_restart": 1}, reloads={True: 1},
                          last_exit=("exit", "1", 1764633700.0), capture_policy="outbound-fail-open",
                          capture=ALL_PARTS, rules={4: 29, 6: 0},
                          verify=VerifyOutcome(1764633800.0, {"missing": 2, "unexpected": 0, "other_backend": 3}))


def test_a_running_supervisor_in_prometheus_text_format() -> None:
    m = parse_metrics(render_metrics(RUNNING))
    assert m['istio_vm_build_info{version="0.1.0"}'] == 1
    assert (m["istio_vm_up"], m["istio_vm_proxy_ready"], m["istio_vm_epoch"]) == (1, 1, 2)
    assert m["istio_vm_start_time_seconds"] == 1764633600.5
    assert {k: v for k, v in m.items() if k.startswith("istio_vm_state{")} == {
        f'istio_vm_state{{state="{s}"}}': float(s == "running") for s in
        ("new", "starting", "running", "reloading", "backoff", "draining", "stopping", "stopped")}
    # Every reason from 0, so `increase(...) > 0` works from the first scrape.
    assert {k: v for k, v in m.items() if k.startswith("istio_vm_proxy_restarts_total")} == {
        'istio_vm_proxy_restarts_total{reason="exit"}': 1, 'istio_vm_proxy_restarts_total{reason="signal"}': 0,
        'istio_vm_proxy_restarts_total{reason="spawn_failed"}': 0,
        'istio_vm_proxy_restarts_total{reason="hot_restart"}': 1, 'istio_vm_proxy_restarts_total{reason="reload"}': 0}
    assert (m['istio_vm_reloads_total{result="ok"}'], m['istio_vm_reloads_total{result="failed"}']) == (1, 0)
    assert m['istio_vm_proxy_last_exit_info{detail="1",kind="exit"}'] == 1
    assert m["istio_vm_proxy_last_exit_timestamp_seconds"] == 1764633700.0
    assert m['istio_vm_capture_policy_info{policy="outbound-fail-open"}'] == 1
    assert (m['istio_vm_capture_part{part="inbound"}'], m['istio_vm_capture_part{part="outbound"}']) == (1, 1)
    assert (m['istio_vm_iptables_rules{family="ipv4"}'], m['istio_vm_iptables_rules{family="ipv6"}']) == (29, 0)
    assert (m["istio_vm_verify_ok"], m["istio_vm_verify_timestamp_seconds"]) == (0, 1764633800.0)
    assert m['istio_vm_verify_drift_lines{kind="other_backend"}'] == 3
    assert "istio_vm_exit_status" not in m


def test_once_stopped_the_file_says_so_and_drops_what_no_longer_runs() -> None:
    stopped = MetricsSnapshot(version="0.1.0", started=1.0, state="stopped", ready=True, epoch=2, restarts={},
                              reloads={}, capture=frozenset({Part.INBOUND}), rules={4: 10}, exit_status=69)
    m = parse_metrics(render_metrics(stopped))
    assert (m["istio_vm_up"], m["istio_vm_proxy_ready"], m["istio_vm_exit_status"]) == (0, 0, 69)
    assert m['istio_vm_state{state="stopped"}'] == 1
    assert not [k for k in m if k.startswith(("istio_vm_epoch", "istio_vm_capture_part", "istio_vm_iptables_rules"))]


def test_before_any_exit_verify_or_install_those_series_are_absent_not_zero() -> None:
    fresh = MetricsSnapshot(version="0.1.0", started=1.0, state="starting", ready=False, epoch=0, restarts={},
                            reloads={})
    m = parse_metrics(render_metrics(fresh))
    assert m["istio_vm_proxy_ready"] == 0
    assert not [k for k in m if k.startswith(("istio_vm_proxy_last_exit", "istio_vm_verify", "istio_vm_capture_part",
                                              "istio_vm_iptables_rules"))]


def test_label_values_are_escaped() -> None:
    odd = MetricsSnapshot(version='1"\\\n', started=1.0, state="backoff", ready=False, epoch=None, restarts={},
                          reloads={}, last_exit=("spawn_failed", '/usr/bin/x: "No such file"', 2.0))
    text = render_metrics(odd)
    assert 'version="1\\"\\\\\\n"' in text
    m = parse_metrics(text)
    assert m['istio_vm_build_info{version="1"\\\n"}'] == 1
    assert m['istio_vm_proxy_last_exit_info{detail="/usr/bin/x: "No such file"",kind="spawn_failed"}'] == 1


def test_written_atomically_with_a_name_the_collector_skips_and_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "istio-sidecar.prom"
    seen: list[list[str]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        seen.append(sorted(os.listdir(tmp_path)))
        assert Path(src).name.startswith(".")
        assert src.endswith(".tmp")
        assert Path(src).read_text() == "b 1\n"
        real_replace(src, dst)

    replace_file(str(path), "a 1\n")
    os.replace, saved = replace, os.replace  # type: ignore[assignment]
    try:
        replace_file(str(path), "b 1\n")
    finally:
        os.replace = saved
    assert path.read_text() == "b 1\n"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert os.listdir(tmp_path) == ["istio-sidecar.prom"]
    assert len(seen) == 1
    assert "istio-sidecar.prom" in seen[0]  # the old file stayed whole until the rename


def test_the_writer_writes_only_changes_and_survives_a_directory_it_cannot_write(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m" / "x.prom"
    path.parent.mkdir()
    writer = MetricsWriter(str(path), str(tmp_path), "0.1.0", "fail-closed", lambda on: {4: len(on), 6: 0},
                           wall=lambda: 100.0)
    state = dict(state="running", ready=True, epoch=0, restarts={}, reloads={}, last_exit=None, exits_seen=0,
                 capture=ALL_PARTS, exit_status=None)
    writer.update(**state)  # type: ignore[arg-type]
    first = path.stat().st_mtime_ns, path.stat().st_ino
    writer.update(**state)  # type: ignore[arg-type]
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == first  # nothing changed: not rewritten
    assert parse_metrics(path.read_text())['istio_vm_iptables_rules{family="ipv4"}'] == 2
    os.rename(path.parent, tmp_path / "gone")  # e.g. an operator removed node_exporter's directory
    writer.update(**{**state, "epoch": 1})  # type: ignore[arg-type]
    writer.update(**{**state, "epoch": 2})  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records if "metrics file" in r.getMessage()] == [
        f"Cannot write the metrics file: {path}: No such file or directory (retried at the next change)"]
    path.parent.mkdir()
    writer.update(**{**state, "epoch": 3})  # type: ignore[arg-type]
    assert parse_metrics(path.read_text())["istio_vm_epoch"] == 3


def test_a_verify_result_unreadable_or_absent_is_no_verify(tmp_path: Path) -> None:
    assert read_verify(str(tmp_path)) is None
    (tmp_path / "verify-result.json").write_text("{")
    assert read_verify(str(tmp_path)) is None
    (tmp_path / "verify-result.json").write_text('{"time": 5, "drift": {"missing": 1}}')
    assert read_verify(str(tmp_path)) == VerifyOutcome(5.0, {"missing": 1})
