"""Whole-tree comparisons the build tests share: every path with its type and mode, owner, symlink target,
device number or content hash (not times: the image step sets those), dpkg's package versions, and
every inode's metadata, to show that a step only read a tree."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def listing(root: Path) -> dict[str, tuple]:
    """Path (from the tree's /) -> (mode as `ls` shows it, uid, gid, what it holds): a symlink's target, a
    device's major,minor, a file's sha256; directories included, none followed."""
    out = {}
    for directory, dirs, files in os.walk(root):
        paths = [directory] if directory == str(root) else []
        paths += [os.path.join(directory, name) for name in (*dirs, *files)]
        for path in paths:
            st = os.lstat(path)
            key = "/" if path == str(root) else "/" + os.path.relpath(path, root)
            out[key] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, _content(path, st))
    return out


def _content(path: str, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "-> " + os.readlink(path)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"dev {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return ""


def package_versions(dpkg_status: str) -> dict[str, str]:
    """Installed package -> version, from /var/lib/dpkg/status."""
    versions = {}
    for block in dpkg_status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status") == "install ok installed":
            versions[fields["Package"]] = fields["Version"]
    return versions


def inodes(root: Path) -> dict[str, tuple]:
    """Path -> (inode, mode, uid, gid, mtime, ctime) of everything under `root`, itself included: a
    change of mode, owner or times shows (ctime moves with each), reading does not. Not the ctime of a
    file with other hard links: another tree linking it (a rootfs build beside this one linking the
    same base tree, userns.share_tree) moves that without writing the file. A directory is never linked."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, name) for name in (*dirs, *files))]:
            st = os.lstat(path)
            ctime = None if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else st.st_ctime_ns
            out[path] = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, ctime)
    return out


def record_attrs(st: os.stat_result) -> str:
    """A path's mode and owner as the cache's content record writes them: "<mode, 4 octal digits>:<uid>:<gid>"."""
    return f"{stat.S_IMODE(st.st_mode):04o}:{st.st_uid}:{st.st_gid}"
