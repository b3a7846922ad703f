"""The env-file loader agrees with bash with each python-dotenv a VM may have, not only the venv's.

The package depends on Debian's python3-dotenv: 0.21.0 in Debian 12, 1.0.1 in Debian 13; the venv has
PyPI's newest (what `scripts/setup` installed), which the rest of this tier runs with. Each Debian
version is installed once from PyPI (the same upstream release) into its own `pip --target` directory
under ~/.cache/istio-vm/dotenv (the first run needs PyPI), and the corpus tests run in a subprocess
with that directory first on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

DEBIAN_DOTENV = {"bookworm": "0.21.0", "trixie": "1.0.1"}
CORPUS_TESTS = ("tests/unit/test_envfile_bash.py", "tests/unit/test_envfile_reject.py", "tests/unit/test_envfile.py")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "istio-vm" / "dotenv"


def dotenv_dir(version: str) -> Path:
    """python-dotenv ``version`` alone in a directory of its own (cached; published by a rename)."""
    target = CACHE / version
    if (target / "dotenv").is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=CACHE))
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-compile", "--target", str(building), f"python-dotenv=={version}"],
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        with contextlib.suppress(OSError):  # another run published it first: keep theirs
            os.rename(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


@pytest.mark.parametrize("suite", sorted(DEBIAN_DOTENV))
def test_corpus_agrees_with_bash_with_the_dotenv_of(suite: str) -> None:
    version = DEBIAN_DOTENV[suite]
    env = {**os.environ, "PYTHONPATH": str(dotenv_dir(version)), "PYTHONDONTWRITEBYTECODE": "1"}
    probe = "import dotenv, importlib.metadata as m; print(m.version('python-dotenv'), dotenv.__file__)"
    which = subprocess.run(
        [sys.executable, "-c", probe],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert which.stdout.split()[0] == version
    assert which.stdout.split()[1].startswith(str(CACHE / version))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORPUS_TESTS],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, f"python-dotenv {version} ({suite}):\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
