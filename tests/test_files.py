"""Atomic writes: the old file survives any failure, and no temporary file is left behind."""
import os

import pytest

from l2vsd_core import files


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.glb"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.glb"]


def test_interrupted_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")

    def writer(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, writer)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["model.json"]


def test_writes_and_creates_the_folder(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    assert files.atomic_write_text(target, "héllo") == target
    assert target.read_text(encoding="utf-8") == "héllo"
    assert sorted(os.listdir(target.parent)) == ["c.txt"]


def test_result_gets_the_usual_permissions_not_mkstemps_0600(tmp_path):
    target = files.atomic_write_text(tmp_path / "model.glb", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
