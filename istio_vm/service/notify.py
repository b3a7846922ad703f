"""Tell systemd what happens: READY=1, STATUS=, RELOADING=1, STOPPING=1, WATCHDOG=1.

A thin wrapper over systemd-python's `systemd.daemon.notify`, with the sender injectable so tests
record the messages; outside systemd (no NOTIFY_SOCKET) sending does nothing. `watchdog_interval`
reads WatchdogSec= from the environment systemd gives the service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _sd_notify(message: str) -> bool:
    from systemd import daemon  # the C extension is only needed when something is sent

    return bool(daemon.notify(message))


class Notifier:
    def __init__(self, sender: Callable[[str], bool] = _sd_notify) -> None:
        self._send = sender
        self._last_status: str | None = None

    def send(self, message: str) -> None:
        if message.startswith("STATUS="):
            if message == self._last_status:
                return  # nothing changed: no datagram
            self._last_status = message
        try:
            self._send(message)
        except OSError as e:
            log.debug("sd_notify(%r) failed: %s", message, e)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send WATCHDOG=1: half of WATCHDOG_USEC, if it is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    watched = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (watched and watched != str(pid)):
        return None
    return int(usec) / 2e6
