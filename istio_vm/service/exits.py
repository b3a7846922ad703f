"""Wait statuses in words: why a child process ended.

Pure: `describe_exit` turns an os.waitpid status into the sentence operators read in the journal,
in the manner of supervisor's decode_wait_status and gunicorn's "Perhaps out of memory?".
"""

from __future__ import annotations

import os
import signal


def describe_exit(status: int) -> str:
    """>>> describe_exit(256)
    'exited with status 1'
    >>> describe_exit(9)
    'killed by SIGKILL (perhaps out of memory?)'
    """
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        text = f"killed by {name}"
        if os.WCOREDUMP(status):
            text += " (core dumped)"
        elif number == signal.SIGKILL:
            text += " (perhaps out of memory?)"
        return text
    return f"ended with wait status {status:#x}"


def exited_cleanly(status: int) -> bool:
    """Exit status 0, or the SIGTERM we sent: a proxy that stopped as asked."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status) == 0
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
