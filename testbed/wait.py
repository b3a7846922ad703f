"""Waiting for a condition with a deadline (the only way tests, benchmarks and the demo synchronise),
and process conditions that tolerate the process being gone between two looks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.02) -> T:
    """Poll `condition` until it returns something truthy, and return that; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited: reaped already, or a zombie waiting for its parent to reap it.

    One look only (psutil.Process raises NoSuchProcess when the pid vanishes between `pid_exists`
    and `Process`, which a two-look condition turns into a failed test).
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def children_named(pid: int, name: str) -> list[int]:
    """The pids of `pid`'s children called `name`; children that exit while we look are left out."""
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == name:
                found.append(child.pid)
    return found
