"""The package as pip installs it (a wheel, not this checkout) carries every file osbuilder needs
at run time: the agent's source, the kernel fragments and the rootfs overlay. A file git tracks but
the wheel drops (a dangling symlink, a pattern missing from package-data) would make images that
differ from the ones the tests here build."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_carries_every_package_file(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "osbuilder", src / "osbuilder", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("osbuilder-*.whl")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("osbuilder/")}
    in_repo = {str(p.relative_to(src)) for p in (src / "osbuilder").rglob("*") if not p.is_dir()}
    assert in_repo - in_wheel == set()
    assert not [p for p in (src / "osbuilder").rglob("*") if p.is_symlink()], "a wheel drops dangling symlinks"
