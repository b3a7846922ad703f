"""Faults the supervisor must survive: a full disk under the log files, a notify socket nobody reads, a journal
that does not read."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd.journal import JournalHandler

from istio_vm.errors import ExitStatus
from istio_vm.journal import MAX_PENDING_ENTRIES, JournalSocket, encode_entry
from istio_vm.service.notify import MAX_PENDING, Notifier, NotifySocket
from istio_vm.service.proxy_output import ProxyOutput
from tests.helpers import alarm_after
from tests.sim import AGENT, EXIT_0, FakeChild, Sim


class Blocked(BaseException):
    """Not an Exception: logging's handlers swallow those (JournalHandler.emit), and the test would go on blocking."""


@pytest.fixture
def alarm() -> Iterator[None]:
    """A test that would block forever fails after 10 s instead (a blocking send is the bug)."""
    with alarm_after(10, Blocked("blocked for 10 s")):
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


# ---- the journal ------------------------------------------------------------------------------------------------


def parse_entry(datagram: bytes) -> dict[str, str]:
    """journald's reading of one native-protocol datagram (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    fields, i = {}, 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name, (size,) = line, struct.unpack("<Q", datagram[end + 1:end + 9])
            value = datagram[end + 9:end + 9 + size]
            assert datagram[end + 9 + size:end + 10 + size] == b"\n"
            i = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


def receive_all(receiver: socket.socket, memfds: list[int] | None = None) -> list[dict[str, str]]:
    """Every entry waiting at ``receiver``, a datagram or a memfd passed with SCM_RIGHTS (its seals appended to
    ``memfds``), as journald reads them."""
    entries: list[dict[str, str]] = []
    receiver.setblocking(False)
    while True:
        try:
            data, ancillary, _, _ = receiver.recvmsg(1 << 24, socket.CMSG_SPACE(4))
        except BlockingIOError:
            return entries
        for level, kind, payload in ancillary:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fd = array.array("i", payload)[0]
            if memfds is not None:
                memfds.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
            os.lseek(fd, 0, os.SEEK_SET)  # the sender's description: at the end of what it wrote (journald mmaps)
            with os.fdopen(fd, "rb") as memfd:
                data = memfd.read()
        entries.append(parse_entry(data))


@pytest.fixture
def stalled_journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A journal socket at a test path whose reader (a stalled journald) reads only when the test says."""
    path = tmp_path / "journal.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        yield path, receiver
    finally:
        receiver.close()


def test_entries_are_the_native_protocol_and_a_big_one_goes_in_a_sealed_memfd(
        stalled_journal: tuple[Path, socket.socket]) -> None:
    path, receiver = stalled_journal
    journal = JournalSocket(str(path))
    journal.send("two\nlines", PRIORITY=4, ISTIO_EPOCH="1", levelname="INFO", _PID="1", EMPTY="")
    journal.send("x" * (9 << 20) + "\nend")  # bigger than a datagram may be (SO_SNDBUF is at most 8 MiB)
    assert journal.flush()
    memfds: list[int] = []
    first, big = receive_all(receiver, memfds)
    assert memfds == [fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL]
    # Names journald ignores (JournalHandler passes logging's record attributes along) are left out.
    assert first == {"MESSAGE": "two\nlines", "PRIORITY": "4", "ISTIO_EPOCH": "1", "EMPTY": ""}
    assert big == {"MESSAGE": "x" * (9 << 20) + "\nend"}
    assert encode_entry({"A": "b"}) == b"A=b\n"
    journal.close()


def test_a_journal_that_does_not_read_never_blocks_what_waited_goes_later_and_the_loss_is_told(
        stalled_journal: tuple[Path, socket.socket], alarm: None) -> None:
    path, receiver = stalled_journal
    journal = JournalSocket(str(path))
    started = time.monotonic()
    for n in range(5000):  # far more than the receiver's queue holds; nobody reads
        journal.send(f"line {n}", ISTIO_N=n)
    assert time.monotonic() - started < 5  # returned: nothing blocked (the alarm guards a hang)
    # The receiver really is stalled: a blocking send (libsystemd's) would wait.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    probe.settimeout(0.2)
    probe.connect(str(path))
    with pytest.raises(TimeoutError):
        probe.send(b"MESSAGE=blocked\n")
    probe.close()
    assert journal.pending == MAX_PENDING_ENTRIES
    queued = receive_all(receiver)  # journald reads again
    while not journal.flush():
        queued += receive_all(receiver)
    queued += receive_all(receiver)
    numbers = [int(e["ISTIO_N"]) for e in queued if "ISTIO_N" in e]
    assert numbers == sorted(numbers)  # in order
    assert numbers[-MAX_PENDING_ENTRIES:] == list(range(5000 - MAX_PENDING_ENTRIES, 5000))  # the latest kept
    [notice] = [e for e in queued if e.get("ISTIO_EVENT") == "journal"]
    assert int(notice["ISTIO_DROPPED"]) == 5000 - len(numbers) == journal.dropped_total
    lost = 5000 - len(numbers)
    assert notice["MESSAGE"] == f"istio-vm: {lost} journal entries were dropped: journald did not take them"
    assert journal.dropped == 0
    journal.close()


def test_a_stalled_journal_does_not_stall_the_loop(stalled_journal: tuple[Path, socket.socket]) -> None:
    """ISTIO_LOG_TARGET=journal with journald not reading: the proxy floods its output, the loop's own records go
    to the same journal, and SIGTERM is still forwarded, the exit reaped and the status returned."""
    path, receiver = stalled_journal
    journal = JournalSocket(str(path))
    handler = JournalHandler(SYSLOG_IDENTIFIER="istio-vm", sender_function=journal.send)
    logging.getLogger("istio_vm").addHandler(handler)

    def blocked(signum: int, frame: object) -> None:
        receiver.close()  # a send blocked on it fails now (ECONNREFUSED), so what follows cannot block again
        raise Blocked("the loop blocked on the journal for 10 s")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    try:
        sim = Sim(AGENT, journal=journal)

        def exit_on_sigterm(child: FakeChild, signum: int) -> None:
            if signum == signal.SIGTERM:
                sim.exit(child.pid, EXIT_0)

        sim.on_signal = exit_on_sigterm
        burst = b"".join(b"info\tline %d\n" % n for n in range(3000))  # under the pipe's 64 KiB
        for n in range(10):
            sim.at(0.1 * (n + 1), lambda: sim.write(1000, burst))
        sim.signal_at(2.0, signal.SIGTERM)
        started = time.monotonic()
        assert sim.run() == ExitStatus.OK
        assert time.monotonic() - started < 5  # including close(): a second for what waits
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        logging.getLogger("istio_vm").removeHandler(handler)
    assert sim.children[1000].signals == [signal.SIGTERM]
    assert journal.dropped_total > 0
    entries = receive_all(receiver)
    while not journal.flush():
        entries += receive_all(receiver)
    entries += receive_all(receiver)
    messages = [e["MESSAGE"] for e in entries]
    assert "State stopping -> stopped" in messages[-3:]  # the loop's last record waited, and went
    assert messages[-1] == f"istio-vm: {journal.dropped_total} journal entries were dropped: journald did not take them"
    journal.close()
