"""The package's loggers, with `logging` imported when one is first used: a command that logs nothing
(`iptables plan`, `config` without warnings) does not load it (with traceback, threading, string and
weakref, ~6 ms of each start). logs.py says where the records go; its choice is installed before the
first record.
"""

from __future__ import annotations

import _thread
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40  # logging's levels, for callers that do not import it

_setup: list[Callable[[], None]] = []  # logs.configure's handler, installed at the first use of a logger
_used = False
_lock = _thread.allocate_lock()  # two threads' first records install one handler


class _Logger:
    """logging.getLogger(name), fetched at its first use. `log.info` is the real Logger's bound method,
    so the records, their caller (the journal's CODE_FILE and CODE_LINE) and the handlers others add are
    as for a logger made at import time."""

    __slots__ = ("_name", "_real")

    def __init__(self, name: str) -> None:
        self._name = name
        self._real: logging.Logger | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._real is None:
            _first_use()
            import logging

            self._real = logging.getLogger(self._name)
        return getattr(self._real, attribute)


def logger(name: str) -> logging.Logger:
    """The logger `name` (a module's `__name__`), without importing logging until it is used."""
    return _Logger(name)  # type: ignore[return-value]  # it answers as the Logger it stands for


def before_first_record(setup: Callable[[], None]) -> None:
    """Run `setup` (which must not log) before any logger is used, replacing an earlier one not run yet;
    at once when one was used already."""
    with _lock:
        if not _used:
            _setup[:] = [setup]
            return
    setup()


def _first_use() -> None:
    global _used
    if _used:
        return
    with _lock:
        if not _used:
            for setup in _setup:
                setup()
            _setup.clear()
            _used = True
