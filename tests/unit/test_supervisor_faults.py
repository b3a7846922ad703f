"""Faults the supervisor must survive: a full disk under the log files, a notify socket nobody reads."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_vm.service.notify import MAX_PENDING, Notifier, NotifySocket
from istio_vm.service.proxy_output import ProxyOutput
from tests.helpers import alarm_after


@pytest.fixture
def alarm() -> Iterator[None]:
    """A test that would block forever fails after 10 s instead (a blocking send is the bug)."""
    with alarm_after(10, AssertionError("blocked")):
        yield


def test_a_full_disk_drops_lines_counts_them_logs_once_and_recovers(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    output = ProxyOutput("files", name="envoy", log_dir=str(tmp_path))
    try:
        good = output._files["stdout"]
        output._files["stdout"] = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        with caplog.at_level(logging.WARNING):
            for n in range(5):
                output.line(0, 1, "stdout", f"lost {n}")
            assert output.dropped == 5
            assert caplog.text.count("Cannot write the proxy's output") == 1
            assert "No space left on device" in caplog.text
            os.close(output._files["stdout"])
            output._files["stdout"] = good
            output.line(0, 1, "stdout", "kept")
        assert "5 lines were dropped" in caplog.text
        assert (output.dropped, output.dropped_total) == (0, 5)
    finally:
        output.close()
    assert (tmp_path / "istio.log").read_text() == "kept\n"


def test_stderr_and_journal_errors_drop_lines_too(caplog: pytest.LogCaptureFixture) -> None:
    def journal(**fields: str) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    output = ProxyOutput("journal", name="envoy", journal_sender=journal)
    output.line(0, 1, "stderr", "x")
    assert output.dropped == 1


def test_sd_notify_never_blocks_and_what_did_not_fit_is_sent_later(tmp_path: Path, alarm: None) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    receiver.bind(str(path))
    try:
        sender = NotifySocket(str(path))
        notifier = Notifier(sender)
        started = time.monotonic()
        for n in range(2000):  # far more than the receiver's queue holds; nobody reads
            notifier.send(f"STATUS=epoch {n}")
        notifier.send("READY=1")
        assert time.monotonic() - started < 5  # returned: nothing blocked (the alarm guards a hang)
        receiver.setblocking(False)
        received = []
        while True:
            try:
                received.append(receiver.recv(4096).decode())
            except BlockingIOError:
                notifier.flush()  # the loop's turn: what waited goes now
                try:
                    received.append(receiver.recv(4096).decode())
                except BlockingIOError:
                    break
        assert received[-2:] == ["STATUS=epoch 1999", "READY=1"]  # the latest STATUS, and READY, not lost
        sender.close()
    finally:
        receiver.close()


def test_the_pending_queue_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    def full(message: str) -> bool:
        raise BlockingIOError

    notifier = Notifier(full)
    with caplog.at_level(logging.WARNING):
        for n in range(MAX_PENDING * 3):
            notifier.send(f"X{n}=1")
    assert notifier.dropped == MAX_PENDING * 2
    assert caplog.text.count("notify socket is full") == 1


def test_no_notify_socket_sends_nothing() -> None:
    assert NotifySocket("")("READY=1") is False
