"""Where the configuration comes from: the env files, read in istio-start.sh's order as `set -a; . FILE`.

`read_shell()` is the only code that reads env files: it checks what they are (a regular file of bounded
size: never a FIFO, device or directory), who may have written them (they configure a root process), and
hands their text to envfile.evaluate, which assigns what bash would have assigned.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import NamedTuple

from istio_vm import loggers, trust
from istio_vm.config.envfile import evaluate
from istio_vm.config.model import Shell
from istio_vm.defaults import DEFAULT_CLUSTER_ENV, DEFAULT_RESOLV_CONF, DEFAULT_SIDECAR_ENV
from istio_vm.errors import Problem

log = loggers.logger(__name__)

MAX_FILE_BYTES = 384 * 1024  # an env file or resolv.conf: real ones are a few kilobytes (and python-dotenv
# needs about 170 bytes of memory per character of a quoted value: this keeps a CLI run under 100 MB)
MAX_ENV_LINES = 10_000  # python-dotenv takes about 14 us a line: 10,000 lines stay well inside 2 s under load
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink"))


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message: "a FIFO", "a symlink" (of lstat)..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


_DEV_NULL = os.makedev(1, 3)


class Unreadable(Exception):
    """A configuration file that exists but must not or cannot be read; the message says why, in one line."""


def read_regular_file(path: str, limit: int = MAX_FILE_BYTES) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most `limit` bytes (or of /dev/null: none), and its stat;
    FileNotFoundError when absent.

    Nothing is read before it is checked: stat first (a FIFO, device, socket or directory is never
    opened: opening a FIFO blocks until a writer comes, /dev/zero never ends), then open with O_NONBLOCK
    (a FIFO swapped in after the stat cannot block) and fstat the open file, which must be the regular
    file stat saw; at most limit + 1 bytes are read, whatever the size said.
    """
    try:
        before = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Unreadable(f"a symlink to {os.readlink(path)!r}, which does not exist") from None
        raise
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror}") from None
    if stat.S_ISCHR(before.st_mode) and before.st_rdev == _DEV_NULL:
        return b"", before  # `. /dev/null` assigns nothing: a way to say "no such file"
    if not stat.S_ISREG(before.st_mode):
        raise Unreadable(f"not a regular file ({file_kind(before.st_mode)}): not read")
    _check_size(before.st_size, limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise Unreadable("replaced while being opened: not read")
        _check_size(info.st_size, limit)
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    _check_size(len(data), limit)
    return data, info


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise Unreadable(f"larger than {limit // 1024} KiB ({size} bytes or more): not a configuration file")


class Sources(NamedTuple):
    """Where the configuration is read from (the CLI's flags, or their defaults)."""

    sidecar_env: str | None = None  # --sidecar-env
    cluster_env: str | None = None  # --cluster-env
    resolv_conf: str = DEFAULT_RESOLV_CONF


def read_shell(sources: Sources, environ: Mapping[str, str], euid: int,
               overrides: Mapping[str, tuple[str, str]] | None = None) -> Shell:
    """Read sidecar.env then cluster.env as `set -a; . FILE` would (the only env-file reads).

    `overrides` ({VARIABLE: (value, origin)}, e.g. istio-iptables flags) win over files and environment.
    """
    shell = dict(environ)
    origins = dict.fromkeys(environ, "environment")
    problems: list[Problem] = []
    files: list[str] = []
    for variable, flag, flag_name, default in (
        ("ISTIO_SIDECAR_CONFIG", sources.sidecar_env, "--sidecar-env", DEFAULT_SIDECAR_ENV),
        ("ISTIO_CLUSTER_CONFIG", sources.cluster_env, "--cluster-env", DEFAULT_CLUSTER_ENV),
    ):
        # `VAR=${VAR:-default}` under `set -a`: the path is exported, and sidecar.env may set the second.
        if flag is not None:
            path, origins[variable] = flag, flag_name
        elif shell.get(variable):
            path = shell[variable]
        else:
            path, origins[variable] = default, "default"
        shell[variable] = path
        text = _read_env_file(path, euid, problems)
        if text is None:
            continue
        files.append(path)
        assignments, file_problems = evaluate(text, path, shell)
        problems.extend(file_problems if _others_may_read(path) else [_withheld(p, path) for p in file_problems])
        origins.update((a.name, a.where) for a in assignments)
    for variable, (value, origin) in (overrides or {}).items():
        shell[variable], origins[variable] = value, origin
    return Shell(shell, origins, tuple(files), tuple(problems))


def _read_env_file(path: str, euid: int, problems: list[Problem]) -> str | None:
    try:
        data, info = read_regular_file(path)
    except FileNotFoundError:
        log.info("%s: not found, skipped", path)
        return None
    except Unreadable as e:
        problems.append(Problem(path, None, None, str(e)))
        return None
    if not stat.S_ISREG(info.st_mode):
        return ""  # /dev/null: nothing to trust or decode
    if (lines := data.count(b"\n")) > MAX_ENV_LINES:
        problems.append(Problem(path, None, None, f"{lines} lines: more than the {MAX_ENV_LINES} an env file may "
                                "have (each costs the lexer time; real ones have a few dozen)"))
        return None
    if euid == 0 and info.st_uid != 0:
        problems.append(Problem(path, None, None, f"owned by uid {info.st_uid}, not root: it configures a "
                                "root process; chown root it"))
    if euid == 0 and (reason := _directory_problem(path)) is not None:
        problems.append(Problem(path, None, None, f"{reason}: another user could put a file of their choice "
                                "here, and it configures a root process; make every directory on its way root's, "
                                "not writable by group or others"))
        return None
    if euid == 0 and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(Problem(path, None, None, f"mode {stat.filemode(info.st_mode)} lets others write "
                                "it: it configures a root process; chmod go-w it"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(Problem(f"{path}:{line}", None, None, "not valid UTF-8"))
        return None


def _directory_problem(path: str) -> str | None:
    """Why another user could change which file `path` names, or None: every directory on the way to it, to
    each link it is or leads through, and to the file it resolves to, must be root's and not writable by group
    or others (sticky ones such as /tmp are fine: nobody else may rename root's entries there).

    Checked after the read: if only root can change those directories now, nobody else could before.
    """
    directories, link = [os.path.dirname(os.path.abspath(path))], os.path.abspath(path)
    for _ in range(40):  # the kernel's limit of links on one path
        if not os.path.islink(link):
            break
        link = os.path.join(os.path.dirname(link), os.readlink(link))
        directories.append(os.path.dirname(os.path.abspath(link)))
    directories.append(os.path.dirname(os.path.realpath(path)))
    for directory in dict.fromkeys(directories):
        if (reason := trust.root_path_problem(directory, sticky_ok=True)) is not None:
            return reason
    return None


def _others_may_read(path: str) -> bool:
    """Whether every user may read the file: only then do its problems quote its text."""
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def _withheld(problem: Problem, path: str) -> Problem:
    """A problem of a file others may not read, without its text: the errors go to the journal, which
    other users may read, and such a file may be a secret (a symlink to /etc/shadow, say)."""
    return Problem(problem.where, problem.variable, None, f"refused (the text is not shown: {path} is not "
                   "readable by others, so istio-vm never echoes it)")
