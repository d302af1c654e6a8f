"""Where things live: the per-WORKDIR layout and the per-user cache shared by every WORKDIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from osbuilder import layout
from osbuilder import settings as S


def test_user_cache_follows_xdg_then_home(tmp_path: Path):
    assert layout.default_user_cache({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": "/nowhere"}) == \
        tmp_path / "xdg" / "osbuilder"
    assert layout.default_user_cache({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "osbuilder"


def test_cache_dir_setting_wins_and_is_shared_by_workdirs(tmp_path: Path):
    a = S.load({"WORKDIR": "a", "CACHE_DIR": "shared"}, env={}, cwd=tmp_path)
    b = S.load({"WORKDIR": "b"}, env={"CACHE_DIR": str(tmp_path / "shared")}, cwd=tmp_path)
    assert layout.Workdir.of(a).root != layout.Workdir.of(b).root
    assert layout.UserCache.of(a) == layout.UserCache.of(b) == layout.UserCache(tmp_path / "shared")


def test_boot_log_names_are_safe_directory_names(tmp_path: Path):
    wd = layout.Workdir(tmp_path)
    assert wd.boot_log("test_x[param/../..]") == tmp_path / "boot-logs" / "test_x_param_.._.."
    assert wd.boot_log("///").name == "boot"
    assert wd.boot_log("a" * 300).name == "a" * 100


def test_help_says_where_the_user_cache_is_and_how_to_clear_it(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    out = subprocess.run([sys.executable, "-m", "osbuilder", "help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    cache = tmp_path / "xdg" / "osbuilder"
    line = next(x for x in out.stdout.splitlines() if x.startswith("Per-user cache"))
    assert str(cache) in line and f"rm -rf {cache}" in line
