"""File helpers: atomic publish of files, trees and links; leftovers swept; stable hashes."""

import os
from pathlib import Path

import pytest

from osbuilder import fs
from osbuilder.fs import file_hash, publish, temp_beside


def test_publish_replaces_a_directory_whole(tmp_path: Path):
    dest = tmp_path / "rootfs"
    dest.mkdir()
    (dest / "old").write_text("old")
    tmp = temp_beside(dest)
    tmp.mkdir()
    (tmp / "new").write_text("new")
    publish(tmp, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs"]


def test_temp_beside_removes_leftovers_of_dead_processes(tmp_path: Path):
    dest = tmp_path / "container.img"
    stale = tmp_path / ".container.img.tmp-999999999"
    stale.write_text("interrupted")
    live = tmp_path / f".container.img.tmp-{os.getppid()}"  # another process still writing its image
    live.write_text("in progress")
    tmp = temp_beside(dest)
    assert not stale.exists()
    assert live.read_text() == "in progress"
    assert tmp.parent == tmp_path and not tmp.exists() and tmp.name.startswith(".container.img.tmp-")


def test_file_hash_sees_symlinks_whose_targets_do_not_exist_here(tmp_path: Path):
    tree = tmp_path / "overlay"
    tree.mkdir()
    (tree / "unit.service").write_text("[Unit]\n")
    before = file_hash(tree)
    (tree / "enabled.service").symlink_to("/usr/lib/systemd/system/unit.service")
    assert file_hash(tree) != before


def test_write_atomically_leaves_the_old_content_when_writing_fails(tmp_path: Path, monkeypatch):
    dest = tmp_path / "boot-record.json"
    fs.write_atomically(dest, "old\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        fs.write_atomically(dest, "new\n")
    monkeypatch.undo()
    assert dest.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]  # no temporary left behind


def test_copy_atomically_sets_the_mode_and_replaces(tmp_path: Path):
    src = tmp_path / "src"
    src.write_bytes(b"\x00kernel")
    src.chmod(0o600)
    dest = tmp_path / "out" / "vmlinuz"
    dest.parent.mkdir()
    dest.write_text("previous")
    dest.chmod(0o600)
    # 0o640 is neither the source's mode, nor the earlier file's, nor what a new file gets under the umask
    fs.copy_atomically(src, dest, mode=0o640)
    assert dest.read_bytes() == b"\x00kernel" and dest.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in dest.parent.iterdir()) == ["vmlinuz"]


def test_link_atomically_repoints_an_existing_link(tmp_path: Path):
    link = tmp_path / "container.img"
    fs.link_atomically("osbuilder-aaaa.img", link)
    fs.link_atomically("osbuilder-bbbb.img", link)
    assert os.readlink(link) == "osbuilder-bbbb.img"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["container.img"]
