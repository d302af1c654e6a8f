"""osbuilder.userns: how tree commands run for root and for an ordinary user, and the subordinate-id
check. (The real rootless build is in tests/test_rootless.py.)"""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

import pytest

from osbuilder import userns
from osbuilder.errors import UsageError


def test_root_runs_tree_commands_directly(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert userns.in_tree_namespace(["mke2fs", "-d", "tree"]) == ["mke2fs", "-d", "tree"]


def test_an_ordinary_user_runs_them_in_mmdebstraps_namespace(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert userns.in_tree_namespace(["mke2fs", "-d", "tree"]) == [
        "mmdebstrap", "--unshare-helper", "mke2fs", "-d", "tree"]


def test_subordinate_ids_found_by_name_or_uid(tmp_path: Path):
    user = getpass.getuser()
    sub = tmp_path / "subuid"
    sub.write_text(f"someone:100000:65536\n{user}:165536:65536\n")
    byuid = tmp_path / "subgid"
    byuid.write_text(f"{os.getuid()}:165536:65536\n")
    userns.check_subordinate_ids(sub, byuid)
    # ... and only an entry of this user counts: others', a longer name, another uid, a broken line
    others = tmp_path / "others"
    others.write_text(f"someone:100000:65536\n{user}x:165536:65536\n{os.getuid() + 1}:231072:65536\n"
                      f"{user}:165536\n")
    for subuid, subgid in ((others, byuid), (sub, others)):
        with pytest.raises(UsageError, match=re.escape(f"{others} has no entry for {user}")):
            userns.check_subordinate_ids(subuid, subgid)


def test_missing_subordinate_ids_name_the_file_and_the_fix(tmp_path: Path):
    user = getpass.getuser()
    sub = tmp_path / "subuid"
    sub.write_text(f"{user}:165536:65536\n")
    with pytest.raises(UsageError) as e:
        userns.check_subordinate_ids(sub, tmp_path / "no-subgid")
    assert e.value.message.startswith(f"rootfs: building as {user} (not root) needs subordinate ids: "
                                      f"{tmp_path / 'no-subgid'} has no entry for {user}")
    assert "usermod --add-subuids" in e.value.message


def test_remove_tree_as_root(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    tree = tmp_path / "tree"
    (tree / "root").mkdir(parents=True)
    (tree / "root" / "secret").write_text("x")
    (tree / "root").chmod(0o700)
    userns.remove_tree(tree)
    assert not tree.exists()
