"""The privileged capture helper of the fail-open policies: root with only CAP_NET_ADMIN and CAP_NET_RAW.

Forked by `istio-vm start` before the privilege drop, with the plan already computed from the validated
config. It accepts exactly "on PART" / "off PART" (iptables/parts.py, or `all`) over a socketpair, installs the
plan with those parts through the apply engine (one atomic restore per family) and answers "ok" or
"error: ...". It never receives rules. It exits when the supervisor goes away: EOF on the socket, or
PR_SET_PDEATHSIG (SIGKILL) when the supervisor is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from dataclasses import dataclass

from istio_vm import loggers
from istio_vm.errors import ApplyError
from istio_vm.iptables.apply import install_plan
from istio_vm.iptables.capture_state import write_expected
from istio_vm.iptables.found import Owners
from istio_vm.iptables.parts import ALL_PARTS, Part, plan_with
from istio_vm.iptables.rules import Plan

log = loggers.logger(__name__)

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
KEEP = (CAP_NET_ADMIN, CAP_NET_RAW)  # iptables-restore/-save (netlink, and libiptc's raw socket for legacy)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MAX_MESSAGE = 64
REPLY_TIMEOUT = 90.0  # longer than one install (apply's restore timeouts), shorter than forever


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def limit_capabilities(keep: tuple[int, ...] = KEEP) -> None:
    """Stay root, but with only `keep` in the bounding, permitted and effective sets (nothing inheritable
    or ambient), and no_new_privs: what iptables-restore, exec'd as root, can have at most.

    ctypes rather than python-prctl: Debian's python3-prctl is not visible from istio-vm's venv, and
    the PyPI wheel is a C extension that needs libcap's headers to build the wheelhouse; these are three
    system calls. Order matters: PR_CAPBSET_DROP needs CAP_SETPCAP, which capset() then gives up.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"PR_CAPBSET_DROP {cap}")
    check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit words per set
    for cap in keep:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    check(libc.capset(ctypes.byref(header), data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


ALL = "all"  # both parts in one request: one restore per family for fail-open's lift and reinstall


def parse_request(message: bytes) -> tuple[bool, frozenset[Part]] | None:
    """"on PART" or "off PART" (PART: inbound, outbound or all), exactly; None for anything else."""
    words = message.decode("ascii", "replace").split(" ")
    if len(words) != 2 or words[0] not in ("on", "off") or words[1] not in {ALL, *(p.value for p in Part)}:
        return None
    return words[0] == "on", ALL_PARTS if words[1] == ALL else frozenset({Part(words[1])})


def _serve(sock: socket.socket, plan: Plan, policy: str, run_dir: str, backend: str | None,
           on: frozenset[Part], owners: Owners | None) -> None:
    while True:
        try:
            message = sock.recv(MAX_MESSAGE)
        except InterruptedError:  # pragma: no cover - retried by Python (PEP 475)
            continue
        if not message:
            return  # the supervisor closed its end or exited
        request = parse_request(message)
        if request is None:
            sock.send(b"error: not on/off PART")
            continue
        switch, parts = request
        wanted = on | parts if switch else on - parts
        try:
            if wanted != on:
                install_plan(plan_with(plan, wanted), run_dir=run_dir, backend=backend, owners=owners)
                on = wanted
            write_expected(run_dir, policy, on)
        except (ApplyError, OSError) as e:
            sock.send(f"error: {e}".encode(errors="replace")[:4096])
            continue
        sock.send(b"ok")


@dataclass
class CaptureHelper:
    """The supervisor's end: one request at a time, answered before the next."""

    pid: int
    sock: socket.socket
    on: frozenset[Part] = ALL_PARTS  # what was in place when it started (install's parts)

    def switch(self, parts: frozenset[Part], on: bool) -> None:
        """Switch `parts` on or off in one change; OSError (with the helper's words) when it could not."""
        name = ALL if parts >= ALL_PARTS else "".join(parts)
        self.sock.send(f"{'on' if on else 'off'} {name}".encode())
        reply = self.sock.recv(4096).decode(errors="replace")
        if reply != "ok":
            raise OSError(f"capture helper: {reply or 'gone'}")

    def close(self) -> None:
        """EOF for the helper, which exits; the supervisor's loop reaps it."""
        with contextlib.suppress(OSError):
            self.sock.close()


def start_helper(plan: Plan, *, policy: str, run_dir: str, backend: str | None,
                 on: frozenset[Part] = ALL_PARTS, owners: Owners | None = None) -> CaptureHelper:
    """Fork the helper (as root, before the privilege drop); `on` is what install put in place."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; the kernel tests cover it
        status = 1
        try:
            parent_end.close()
            libc = ctypes.CDLL(None, use_errno=True)
            # SIGKILL when the supervisor dies, however it dies; and if it died before this line, now.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(0)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)  # the supervisor's enqueueing handlers are not ours
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal: the supervisor decides
            os.setsid()  # out of the supervisor's process group, so a Ctrl-C or killpg of it spares us
            limit_capabilities()
            _serve(child_end, plan, policy, run_dir, backend, on, owners)
            status = 0
        except BaseException:
            log.exception("capture helper failed")
        finally:
            os._exit(status)
    child_end.close()
    parent_end.settimeout(REPLY_TIMEOUT)
    log.info("Capture helper started, pid %s (root with CAP_NET_ADMIN, CAP_NET_RAW only)", pid,
             extra={"ISTIO_EVENT": "capture", "ISTIO_CHILD_PID": pid})
    return CaptureHelper(pid, parent_end, on)
