"""istio-vm's own records: logging is imported at the first record (loggers.py), and logs.configure's
target is installed then, so that a command that logs nothing does not pay for logging; the records
(their caller, their fields, the stderr format) are what logging made of them before.

Each case runs in a fresh interpreter: the first record happens once per process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def run(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_logging_is_imported_at_the_first_record_and_the_target_installed_then() -> None:
    done = run("""
import sys
from istio_vm import loggers, logs
log = loggers.logger("istio_vm.probe")
logs.configure("stderr")
print("logging" in sys.modules)
log.info("hello %s", "there")
log.debug("not shown")
log.warning("careful", extra={"ISTIO_EVENT": "x"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
import logging
print(len(logging.getLogger().handlers), logging.getLogger().level)
""")
    assert done.stdout.splitlines() == ["False", "1 20"]
    lines = done.stderr.splitlines()
    assert lines[:3] == ["istio-vm: hello there", "istio-vm: warning: careful", "istio-vm: error: failed"]
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"


def test_the_last_configure_before_the_first_record_wins_and_a_later_one_applies_at_once() -> None:
    done = run("""
import logging, sys
from istio_vm import loggers, logs
log = loggers.logger("istio_vm.probe")
logs.configure("stderr")
logs.configure("stderr", level=loggers.WARNING)  # `config --check`: warnings only
log.info("hidden")
log.warning("shown")
print(len(logging.getLogger().handlers), logging.getLogger().level)
logs.configure("stderr")
print(len(logging.getLogger().handlers), logging.getLogger().level)
log.info("now shown")
""")
    assert done.stdout.splitlines() == ["1 30", "1 20"]
    assert done.stderr.splitlines() == ["istio-vm: warning: shown", "istio-vm: now shown"]


def test_a_journal_entry_names_the_caller_not_the_lazy_logger() -> None:
    done = run("""
import json
from istio_vm import loggers, logs
entries = []
logs.configure("journal", journal_sender=lambda text, /, **fields: entries.append({**fields, "MESSAGE": text}))
log = loggers.logger("istio_vm.probe")
def caller():
    log.info("ready", extra={"ISTIO_EPOCH": 1})
caller()
print(json.dumps(entries[0], default=str))
""")
    entry = json.loads(done.stdout)
    assert entry["MESSAGE"] == "ready"
    assert entry["LOGGER"] == "istio_vm.probe"
    assert entry["ISTIO_EPOCH"] == 1
    assert (entry["CODE_FILE"], entry["CODE_FUNC"], entry["CODE_LINE"]) == ("<string>", "caller", 8)
    assert entry["SYSLOG_IDENTIFIER"] == "istio-vm"
    assert entry["PRIORITY"] == "6"
