"""Become the user the proxy runs as: supplementary groups, then group, then user.

No `su` or `sudo` (1.9 built an `su -c` string from env-file values): the supervisor drops its own
privileges in-process after the root-only work (iptables), and its children inherit the result; epoch
0, spawned while the rules are installed, switches itself the same way before its exec (processes.py).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import NamedTuple

from istio_vm import loggers
from istio_vm.config.host import User
from istio_vm.errors import PrivilegeError

log = loggers.logger(__name__)
PR_SET_NO_NEW_PRIVS = 38


class Identity(NamedTuple):
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, as initgroups(3) would set them
    home: str

    def credentials(self) -> tuple[int, int, tuple[int, ...]]:
        """(uid, gid, groups): what a child spawned while we are still root switches to (processes.py)."""
        return self.uid, self.gid, self.groups

    def environment(self) -> dict[str, str]:
        """What `su -s /bin/bash ... USER` set for pilot-agent in istio-start.sh 1.9."""
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "SHELL": "/bin/bash"}


def resolve(user: User, *, grouplist: Callable[[str, int], list[int]] = os.getgrouplist) -> Identity:
    """The identity to drop to: the user found when the config was built, with its groups (initgroups(3))."""
    return Identity(user.name, user.uid, user.gid, tuple(grouplist(user.name, user.gid)), user.home)


def drop_to(identity: Identity) -> None:
    """Switch this process to `identity` for good, or raise PrivilegeError."""
    if os.geteuid() != 0:
        if os.geteuid() == identity.uid:
            return  # already that user (istio-start.sh ran pilot-agent directly then)
        raise PrivilegeError(f"cannot switch to user {identity.user!r}: not running as root")
    if identity.uid == 0:
        return  # TPROXY mode: the proxy runs as root, as in 1.9
    # Order matters: setgroups and setgid need root, which setuid gives up for good.
    os.setgroups(list(identity.groups))
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if os.getuid() != identity.uid or os.geteuid() != identity.uid or os.getegid() != identity.gid:
        raise PrivilegeError(f"switching to {identity.user!r} did not take effect")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be broken
        raise PrivilegeError("could regain root after dropping privileges")
    # Nothing started from here on (setuid/setgid binaries, file capabilities) gains privileges.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        log.warning("cannot set no_new_privs: %s", os.strerror(ctypes.get_errno()))
    log.info("Running as %s (uid %s, gid %s, groups %s)", identity.user, identity.uid, identity.gid,
             ",".join(map(str, identity.groups)))
