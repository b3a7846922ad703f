"""trust.create_temporary: mkstemp's guarantees (a new file, mode 0600, never through a planted link)
without importing tempfile; trust.write_atomic on top of it. Root's side: tests/kernel/test_root_trust.py."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest

from istio_vm import trust


def test_a_temporary_is_a_new_private_file_at_an_unpredictable_name(tmp_path: Path) -> None:
    fd, path = trust.create_temporary(str(tmp_path), ".state.json.", ".tmp")
    try:
        os.write(fd, b"x")
        info = os.fstat(fd)
    finally:
        os.close(fd)
    name = Path(path).name
    assert Path(path).parent == tmp_path
    assert name.startswith(".state.json.")
    assert name.endswith(".tmp")
    assert len(name) == len(".state.json.") + 12 + len(".tmp")
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert Path(path).read_bytes() == b"x"
    other = trust.create_temporary(str(tmp_path), ".state.json.", ".tmp")
    os.close(other[0])
    assert other[1] != path


def test_a_taken_name_or_a_planted_link_is_skipped_never_followed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "secret"
    target.write_text("root only\n")
    draws = itertools.chain([b"\x00" * 6, b"\x01" * 6], itertools.repeat(b"\x02" * 6))
    monkeypatch.setattr(os, "urandom", lambda n: next(draws)[:n])
    (tmp_path / f".f.{'00' * 6}").symlink_to(target)  # a link planted at the first name
    (tmp_path / f".f.{'01' * 6}").write_text("someone's")  # a file at the second
    fd, path = trust.create_temporary(str(tmp_path), ".f.")
    os.close(fd)
    assert Path(path).name == f".f.{'02' * 6}"
    assert target.read_text() == "root only\n"
    assert (tmp_path / f".f.{'01' * 6}").read_text() == "someone's"
    with pytest.raises(FileExistsError):  # every name it draws is taken: it gives up, creating nothing
        trust.create_temporary(str(tmp_path), ".f.")


def test_write_atomic_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "state.json").symlink_to(tmp_path / "elsewhere")  # replaced, not written through
    trust.write_atomic(str(tmp_path), "state.json", "new\n", 0o640)
    path = tmp_path / "state.json"
    assert not path.is_symlink()
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
