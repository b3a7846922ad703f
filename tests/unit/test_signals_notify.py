"""Signals become queue entries and wake a select; sd_notify messages and the watchdog interval."""

from __future__ import annotations

import os
import select
import signal

from istio_vm.service.notify import Notifier, watchdog_interval
from istio_vm.service.signals import captured


def test_signals_are_queued_in_order_wake_select_and_the_old_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    with captured([signal.SIGUSR2, signal.SIGHUP]) as queue:
        os.kill(os.getpid(), signal.SIGUSR2)  # delivered to this thread before os.kill returns
        os.kill(os.getpid(), signal.SIGHUP)
        readable, _, _ = select.select([queue.wakeup], [], [], 5)
        assert readable == [queue.wakeup]  # the wakeup fd: no polling, no lost race before select
        assert queue.drain() == [signal.SIGUSR2, signal.SIGHUP]
        assert queue.drain() == []
        assert select.select([queue.wakeup], [], [], 0)[0] == []  # drained: select sleeps again
    assert signal.getsignal(signal.SIGUSR2) == before
    assert signal.set_wakeup_fd(-1) == -1  # and the wakeup fd was given back too


def test_status_is_sent_only_when_it_changes_and_send_errors_do_not_stop_the_supervisor() -> None:
    sent: list[str] = []

    def sender(message: str) -> bool:
        if message == "WATCHDOG=1":
            raise ConnectionRefusedError("systemd went away")
        sent.append(message)
        return True

    notifier = Notifier(sender)
    for message in ("READY=1", "STATUS=a", "STATUS=a", "WATCHDOG=1", "STATUS=b", "STATUS=a"):
        notifier.send(message)
    assert sent == ["READY=1", "STATUS=a", "STATUS=b", "STATUS=a"]


def test_the_watchdog_interval_is_half_of_watchdog_usec_and_only_for_the_watched_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None  # for another process
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
