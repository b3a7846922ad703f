"""The edge of the config wing: read the env files, resolv.conf and the machine, then build the Config.

`load()` is the only entry point that touches the host for configuration: sources.read_shell for the
env files, resolv.conf as text, and `read_host()` for the interface addresses (getifaddrs(3)), the
host name, the euid and the accounts the env files name. Everything it read goes to resolve.build.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import overload

from istio_vm.config.host import Address, Host, User
from istio_vm.config.model import Config, ResolvConf
from istio_vm.config.resolve import build, user_names
from istio_vm.config.sources import Sources, Unreadable, file_kind, read_regular_file, read_shell
from istio_vm.errors import ConfigError, Problem


def load(sources: Sources, environ: Mapping[str, str], host: Host | None = None,
         overrides: Mapping[str, tuple[str, str]] | None = None, *, check_writes: bool = True) -> Config:
    """Read sidecar.env then cluster.env as `set -a; . FILE` would, and build the Config.

    `host` None reads the real machine (or network namespace); tests pass their own. `check_writes`: also
    check the directories the service writes (ISTIO_LOG_DIR, ISTIO_VM_METRICS_FILE's), which `start` and
    `config` do; commands that only read (verify, in a unit whose file system is read-only) do not.
    """
    shell = read_shell(sources, environ, os.geteuid() if host is None else host.euid, overrides)
    if host is None:
        host = read_host(user_names(shell.variables))
    config = build(shell, host, read_resolv_conf(sources.resolv_conf))
    if check_writes and config.supervision.log_target == "files":
        check_log_dir(config)
    if check_writes and config.supervision.metrics_file:
        check_metrics_dir(config)
    return config


LOG_FILES = ("istio.log", "istio.err.log")  # service/proxy_output.py's names, 1.9's


def check_log_dir(config: Config) -> None:
    """ISTIO_LOG_TARGET=files: the proxy's user must be able to append to both log files, which it opens
    after the rules are in and privileges are dropped; found here, it is a config error (exit 78) that
    changes nothing, rather than a failure after install."""
    value = config.values["ISTIO_LOG_DIR"]
    reason = log_dir_problem(value.value, config.agent.exec_user)
    if reason is not None:
        raise ConfigError([Problem(value.source, "ISTIO_LOG_DIR", value.value, f"{reason} (ISTIO_LOG_TARGET=files)")])


def check_metrics_dir(config: Config) -> None:
    """ISTIO_VM_METRICS_FILE: the supervisor (EXEC_USER, after the drop) writes it by rename(2) in its
    directory, so it must be able to create files there: found now, before anything runs (exit 78)."""
    value = config.values["ISTIO_VM_METRICS_FILE"]
    directory = os.path.dirname(value.value)
    reason = dir_problem(directory, config.agent.exec_user)
    if reason is not None:
        reason = f"directory {directory}: {reason}"
    else:
        try:
            found = os.lstat(value.value)
        except FileNotFoundError:
            return
        except OSError as e:
            reason = f"cannot be used: {e.strerror}"
        else:
            if not stat.S_ISREG(found.st_mode):
                reason = f"is {file_kind(found.st_mode)}, not a regular file: move it away"
    if reason is not None:
        raise ConfigError([Problem(value.source, "ISTIO_VM_METRICS_FILE", value.value, reason)])


def dir_problem(path: str, user: User) -> str | None:
    """Why `user` could not create files in directory `path`, or None."""
    groups = {user.gid, *os.getgrouplist(user.name, user.gid)}
    try:
        info = os.stat(path)
        if not stat.S_ISDIR(info.st_mode):
            return "not a directory"
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "on a read-only file system (the unit allows writes only under ReadWritePaths=)"
        if not _may_write(info, user.uid, groups, search=True):
            return f"{user.name} (uid {user.uid}) may not create files in it"
    except OSError as e:
        return f"cannot be used: {e.strerror}"
    return None


def log_dir_problem(path: str, user: User) -> str | None:
    """Why `user` could not append to LOG_FILES in directory `path`, or None."""
    reason = dir_problem(path, user)
    if reason is not None:
        return reason
    groups = {user.gid, *os.getgrouplist(user.name, user.gid)}
    try:
        for name in LOG_FILES:
            try:
                found = os.lstat(os.path.join(path, name))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(found.st_mode):
                return f"{name} in it is {file_kind(found.st_mode)}, not a regular file: move it away"
            if not _may_write(found, user.uid, groups, search=False):
                return f"{user.name} (uid {user.uid}) may not write {name} in it"
    except OSError as e:
        return f"cannot be used: {e.strerror}"
    return None


def _may_write(info: os.stat_result, uid: int, groups: set[int], *, search: bool) -> bool:
    """The permission bits as the kernel checks them for uid (root: CAP_DAC_OVERRIDE, in the unit's set)."""
    if uid == 0:
        return True
    need = stat.S_IWOTH | (stat.S_IXOTH if search else 0)
    if info.st_uid == uid:
        shift = 6
    elif info.st_gid in groups:
        shift = 3
    else:
        shift = 0
    return (info.st_mode >> shift) & need == need


def read_resolv_conf(path: str) -> ResolvConf:
    """The nameservers' file, or why it cannot be read (only an error when DNS capture needs it)."""
    try:
        return ResolvConf(path, read_regular_file(path)[0].decode("utf-8"))
    except UnicodeDecodeError:
        return ResolvConf(path, error="not valid UTF-8")
    except FileNotFoundError:
        return ResolvConf(path, error="not found")
    except Unreadable as e:
        return ResolvConf(path, error=str(e))


def read_host(users: Iterable[str] = ()) -> Host:
    """The real machine (or the network namespace this process runs in), with the accounts `users`."""
    found = {name: user for name in users if (user := lookup_user(name)) is not None}
    # gethostname(2) is uname(2)'s nodename on Linux: no socket module needed.
    return Host(addresses=InterfaceAddresses(), hostname=os.uname().nodename, euid=os.geteuid(), users=found)


class InterfaceAddresses(Sequence[Address]):
    """The machine's addresses, read (getifaddrs(3), through ctypes) only when a setting is derived from
    them: a configuration that sets ISTIO_SVC_IP and ENABLE_INBOUND_IPV6 never loads ctypes."""

    @cached_property
    def _read(self) -> tuple[Address, ...]:
        return tuple(interface_addresses())

    @overload
    def __getitem__(self, index: int) -> Address: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Address]: ...
    def __getitem__(self, index: int | slice) -> Address | Sequence[Address]:
        return self._read[index]

    def __len__(self) -> int:
        return len(self._read)

    def __iter__(self) -> Iterator[Address]:
        return iter(self._read)

    def __repr__(self) -> str:
        return repr(self._read)


def lookup_user(name: str) -> User | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


IFF_UP, IFF_LOOPBACK = 0x1, 0x8
# Linux's socket.AF_INET and AF_INET6, and where each sockaddr keeps its address: the socket module is not
# loaded for them (~1.3 ms); libc's own inet_ntop, which socket.inet_ntop calls, writes the text.
FAMILY_OFFSETS = {2: 4, 10: 8}
INET6_ADDRSTRLEN = 46


def interface_addresses() -> list[Address]:
    """Every IPv4 and IPv6 address in getifaddrs(3) order, which is what hostname(1) and Go's
    InterfaceAddrs walk: netlink dumps all IPv4 addresses, then all IPv6 ones."""
    import ctypes  # here, not at the top: most configurations never need the interfaces

    class Ifaddrs(ctypes.Structure):  # struct ifaddrs, getifaddrs(3)
        pass

    Ifaddrs._fields_ = [
        ("ifa_next", ctypes.POINTER(Ifaddrs)), ("ifa_name", ctypes.c_char_p), ("ifa_flags", ctypes.c_uint),
        ("ifa_addr", ctypes.c_void_p), ("ifa_netmask", ctypes.c_void_p), ("ifa_ifu", ctypes.c_void_p),
        ("ifa_data", ctypes.c_void_p),
    ]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inet_ntop.restype = ctypes.c_char_p
    text = ctypes.create_string_buffer(INET6_ADDRSTRLEN)
    head = ctypes.POINTER(Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs")
    found = []
    try:
        entry = head
        while entry:
            ifa = entry.contents
            if ifa.ifa_addr:
                family = ctypes.c_ushort.from_address(ifa.ifa_addr).value  # sa_family, host order
                offset = FAMILY_OFFSETS.get(family)
                if offset is not None:
                    ip = libc.inet_ntop(family, ctypes.c_void_p(ifa.ifa_addr + offset), text, INET6_ADDRSTRLEN).decode()
                    name = (ifa.ifa_name or b"").decode(errors="replace")
                    found.append(Address(name, ip, bool(ifa.ifa_flags & IFF_LOOPBACK), bool(ifa.ifa_flags & IFF_UP)))
            entry = ifa.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found
