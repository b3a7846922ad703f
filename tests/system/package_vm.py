"""The package tests' VM: istio-vm's .deb built on the host (any version), installed with apt in a container.

Used by test_package.py. `build_deb(version)` runs packaging/build-deb on a copy of the tree whose
__version__ is `version` (cached by the hash of the sources); the container roots come with the package's
dependencies from Debian already installed (sc.DEB_DEPENDENCIES), since a booted container has no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from testbed import systemd_container as sc
from tests.system.container_vm import Vm

PARTS = ("pyproject.toml", "README.md", "LICENSE", "istio_vm", "docs", "packaging")  # what build-deb copies
VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)
INBOX = PurePosixPath("/var/tmp")
BIN = "/usr/bin/istio-vm"
# Where the files of a container may change for reasons of their own (apt's and dpkg's books, logs, caches,
# systemd's state): left out of the file lists compared before and after.
NOISE = ("var/lib/dpkg/", "var/lib/apt/", "var/cache/", "var/log/", "var/lib/systemd/", "etc/ld.so.cache",
         "var/lib/python/", "etc/systemd/system/multi-user.target.wants/", "etc/systemd/system/timers.target.wants/")


def current_version() -> str:
    found = VERSION_LINE.search((sc.PROJECT_DIR / "istio_vm" / "__init__.py").read_text())
    assert found is not None
    return found.group(1)


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for part in PARTS:
        top = sc.PROJECT_DIR / part
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if "__pycache__" in path.parts or path.is_dir():
                continue
            data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            digest.update(str(path.relative_to(sc.PROJECT_DIR)).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16]


def build_deb(version: str | None = None, cache_dir: Path = sc.CACHE_DIR) -> Path:
    """dist/istio-vm_VERSION_all.deb of the current sources with __version__ = ``version`` (default: as is),
    and lintian.txt, what lintian said of it, in the same directory."""
    version = version or current_version()
    out = cache_dir / "istio-vm-debs" / f"{_sources_hash()}-{version}"
    deb = out / f"istio-vm_{version}_all.deb"
    if deb.is_file():
        return deb
    with tempfile.TemporaryDirectory(prefix="istio-vm-deb-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for part in PARTS:
            source = sc.PROJECT_DIR / part
            if source.is_dir():
                shutil.copytree(source, tree / part, symlinks=True)
            else:
                shutil.copy2(source, tree / part)
        init = tree / "istio_vm" / "__init__.py"
        init.write_text(VERSION_LINE.sub(f'__version__ = "{version}"', init.read_text()))
        # --lintian: lintian's tags on stderr (errors fail the build), kept next to the package.
        done = subprocess.run([str(tree / "packaging" / "build-deb"), "--lintian"], capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        out.mkdir(parents=True, exist_ok=True)
        # Another checkout's suite may build the same sources at the same moment: private temporary names, and
        # renames, so neither ever reads a half-written file of the other.
        lintian = out / f".lintian.txt.{os.getpid()}.tmp"
        lintian.write_text(done.stderr)
        os.rename(lintian, out / "lintian.txt")
        partial = out / f".{deb.name}.{os.getpid()}.tmp"
        shutil.copy2(tree / "dist" / deb.name, partial)
        os.rename(partial, deb)
    return deb


def apt(vm: Vm, *args: str) -> str:
    """`apt-get -y ARGS` in the container (no network: local .debs and what is installed only)."""
    done = vm.c.run(["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", *args], timeout=300,
                    env={"DEBIAN_FRONTEND": "noninteractive"})
    return done.stdout + done.stderr


def install(vm: Vm, deb: Path) -> str:
    """`apt-get install ./istio-vm_*.deb`, as an operator does; apt's output."""
    shutil.copy2(deb, vm.c.path(INBOX / deb.name))
    return apt(vm, "install", f"{INBOX / deb.name}")


def files(c: sc.Container) -> dict[str, str]:
    """Every file, directory and link of the container's root (not /run, /tmp, /proc...), with its kind,
    owner and mode (and a link's target), but NOISE."""
    listing = {}
    root = c.root
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir in ("proc", "sys", "dev", "run", "tmp"):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel.startswith(NOISE) or f"{rel}/".startswith(NOISE):
                continue
            st = os.lstat(path)
            kind = "l -> " + os.readlink(path) if os.path.islink(path) else oct(st.st_mode)
            listing[rel] = f"{kind} {st.st_uid}:{st.st_gid}"
    return listing


def unit_state(vm: Vm, unit: str) -> dict[str, str]:
    out = vm.c.systemctl("show", "--property=ActiveState,UnitFileState,LoadState,InvocationID", unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_lines(vm: Vm, *args: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in vm.c.journalctl("--output=json", *args).stdout.splitlines() if line]
