"""Atomic writes: readers see the old content or all of the new, never a part, and a failure keeps the old."""

import os

import pytest

from bbsmall_jax.atomic import atomic_directory, atomic_file, write_atomic


def test_write_atomic_text_and_bytes(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "first")
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_directory_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
            raise RuntimeError("killed")
    assert os.listdir(target) == ["old.txt"]
    with atomic_directory(target) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert os.listdir(target) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_directory_moved_aside_by_a_killed_run_comes_back(tmp_path):
    target = tmp_path / "final"
    (tmp_path / "final.old").mkdir()
    (tmp_path / "final.old" / "kept.txt").write_text("kept")
    (tmp_path / "final.tmp").mkdir()  # the new copy was not yet renamed into place
    with pytest.raises(RuntimeError):
        with atomic_directory(target):
            raise RuntimeError("killed again")
    assert (target / "kept.txt").read_text() == "kept"
