"""What root may trust: paths only root can change, and files opened without following planted links.

Root reads and writes files under ISTIO_VM_RUN_DIR (the state file lists commands root replays),
appends to the proxy's log files in TPROXY mode and runs the proxy's binaries as root there. Each is
safe only if no other user can replace what the path names: `check_root_dir`, `check_root_path`
and `open_checked` (O_NOFOLLOW, then fstat of what was opened) say so or raise UntrustedPathError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from istio_vm.errors import UntrustedPathError


def _prefixes(path: str) -> Iterator[str]:
    """"/", "/a", "/a/b" for "/a/b"; the path as written (its links lstat'ed) and as resolved."""
    for variant in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        parts = [p for p in variant.split("/") if p]
        yield "/"
        for i in range(1, len(parts) + 1):
            yield "/" + "/".join(parts[:i])


def writable_by_others(st: os.stat_result, *, sticky_ok: bool) -> str | None:
    """Why a user other than root could change this file or directory (None: only root can)."""
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}"
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode means nothing; its owner and its directory do
    sticky = sticky_ok and stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX)
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0 and not sticky:
        return f"writable by group {st.st_gid}"
    if st.st_mode & stat.S_IWOTH and not sticky:
        return "writable by others"
    return None


def root_path_problem(path: str, *, sticky_ok: bool = False) -> str | None:
    """Why another user could change what `path` is (the file, or a directory on the way), or None.

    Sticky world-writable directories (/tmp) are fine on the way: nobody else may rename or delete
    root's entries in them; `path` itself only if `sticky_ok`. Every link on the way and its
    target's directories are checked too.
    """
    seen: set[str] = set()
    for prefix in _prefixes(path):
        if prefix in seen:
            continue
        seen.add(prefix)
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return f"{prefix} does not exist"
        reason = writable_by_others(st, sticky_ok=sticky_ok or prefix != os.path.realpath(path))
        if reason is not None:
            return f"{prefix} is {reason}"
    return None


def check_root_path(path: str, what: str) -> None:
    """Raise UntrustedPathError unless only root can change `path` (when we are root)."""
    if os.geteuid() != 0:
        return
    reason = root_path_problem(path)
    if reason is not None:
        raise UntrustedPathError(f"{what}={path}: {reason}; root must not use it (make it root's, mode 755)")


def check_root_dir(path: str, what: str = "ISTIO_VM_RUN_DIR", *, create: bool = True) -> None:
    """Create `path` (mode 755) if missing, then check that only root can write it or its parents.

    Not root: nothing to protect (the files in it are the caller's own), only created.
    """
    if not create and not os.path.lexists(path):
        return
    if os.geteuid() == 0:
        parent = os.path.dirname(os.path.abspath(path))
        reason = root_path_problem(parent, sticky_ok=True) if os.path.exists(parent) else None
        if reason is not None:
            raise UntrustedPathError(f"{what}={path}: {reason}; root must not use it")
    os.makedirs(path, mode=0o755, exist_ok=True)
    check_root_path(path, what)
    if os.geteuid() == 0 and not os.path.isdir(path):
        raise UntrustedPathError(f"{what}={path}: not a directory")


def open_checked(path: str, flags: int, mode: int = 0o644, *, owners: tuple[int, ...] | None = None) -> int:
    """os.open with O_NOFOLLOW (a planted link fails with ELOOP), then checked on what was opened.

    The file must be a regular file with a single name (a hard link to /etc/shadow has two) and,
    when `owners` is given, owned by one of them and writable by nobody else. Raises
    UntrustedPathError (after closing it) otherwise; OSError as os.open does.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last component is a symbolic link
            raise UntrustedPathError(f"{path}: is a symbolic link; refusing to follow it") from None
        raise
    try:
        st = os.fstat(fd)
        reason = None
        if not stat.S_ISREG(st.st_mode):
            reason = "not a regular file"
        elif st.st_nlink > 1:
            reason = f"has {st.st_nlink} hard links"
        elif owners is not None and st.st_uid not in owners:
            reason = f"owned by uid {st.st_uid}"
        elif owners is not None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            reason = "writable by group or others"
        if reason is not None:
            raise UntrustedPathError(f"{path}: {reason}; refusing to use it")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_atomic(directory: str, name: str, text: str, mode: int = 0o644) -> None:
    """Replace directory/name with `text` atomically, in root's checked directory (check_root_dir), synced
    to disk before the rename (replace_file)."""
    check_root_dir(directory)
    replace_file(os.path.join(directory, name), text, mode, sync=True)


def replace_file(path: str, text: str, mode: int = 0o644, *, sync: bool = False) -> None:
    """`text` at `path` in one rename(2): a reader sees the old file or the new one, whole. The temporary
    beside it (`.NAME.XXXXXXXXXXXX.tmp`, which a `*.prom` collector skips) comes from `create_temporary`,
    an unpredictable name made with O_EXCL, so a link planted at any name is never followed, and the rename
    replaces a link at `path` rather than writing through it. The directory is not checked: write_atomic is
    the one for root's files; this one also serves the proxy user's directories (metrics, reload answers).
    """
    directory, name = os.path.split(path)
    fd, tmp = create_temporary(directory or ".", f".{name}.", ".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_temporary(directory: str, prefix: str, suffix: str = "") -> tuple[int, str]:
    """tempfile.mkstemp's file (fd, path) without tempfile, which loads shutil, bz2, lzma and random (~4 ms of
    every install): a new file of mode 0600 at prefix + 12 random hex digits (os.urandom) + suffix, made with
    O_CREAT|O_EXCL (never an existing file, nor the target of a link: a planted link fails as existing) and
    O_NOFOLLOW; another name is tried while one exists."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}{suffix}")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", os.path.join(directory, f"{prefix}*{suffix}"))
