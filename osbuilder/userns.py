"""Building as an ordinary user: the rootfs tree lives in mmdebstrap's user namespace.

As root, osbuilder reads, writes and deletes the rootfs tree directly. As an ordinary user (with
/etc/subuid and /etc/subgid entries, which `adduser`/`useradd` make), mmdebstrap's unshare mode
builds the tree in a user namespace where the user's subordinate ids stand for root and the
system users: seen from outside, /root belongs to 100000 and /etc/shadow to 100000:100042. Such a
tree can only be read whole, written into an image with its real owners, re-timestamped or deleted
from inside a namespace with the same mapping, which `mmdebstrap --unshare-helper` provides:
`in_tree_namespace(argv)` prefixes a command with it when osbuilder is not root.

Inside that namespace the user's own files belong to nobody: a file the namespace must write
(the image) is lent to the namespace's root (the user's first subordinate id) while it does, and
taken back afterwards (image.py); it is never writable by other users.
"""

from __future__ import annotations

import getpass
import os
import shutil
from pathlib import Path

from osbuilder.errors import UsageError
from osbuilder.run import run

HELPER = ["mmdebstrap", "--unshare-helper"]


def rootless() -> bool:
    return os.geteuid() != 0


def in_tree_namespace(argv: list[str]) -> list[str]:
    """`argv`, run where the tree's owners are its real ones (the user namespace when not root)."""
    return [*HELPER, *argv] if rootless() else argv


def check_subordinate_ids(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> None:
    """A rootless build needs a range of subordinate user and group ids: say how to get one."""
    user, uid = getpass.getuser(), str(os.getuid())
    for path in (subuid, subgid):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        if not any(line.split(":")[0] in (user, uid) for line in lines if line.count(":") == 2):
            raise UsageError(
                f"rootfs: building as {user} (not root) needs subordinate ids: {path} has no entry for "
                f"{user}; add one, e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "
                f"{user}`, or run as root")


def check_reachable(path: Path, setting: str) -> None:
    """Inside the namespace the user's directories are nobody's: every directory on the way to
    `path` must be searchable by others."""
    for p in [path, *path.parents]:
        if p.exists() and not p.stat().st_mode & 0o001:
            raise UsageError(
                f"{setting}: {p} is not searchable by other users (mode {p.stat().st_mode & 0o777:o}), and a "
                f"rootless build needs it (mmdebstrap's namespace sees your files as nobody's): "
                f"`chmod o+x {p}`, or use a {setting} elsewhere")


def remove_tree(path: Path) -> None:
    """Delete a directory tree, including parts made inside the user namespace when not root.

    The user can delete its own files, and empty directories of others inside its own directories;
    the contents of a directory owned by a subordinate id are deleted from inside the namespace.
    """
    if not rootless():
        shutil.rmtree(path)
        return
    me = os.getuid()
    foreign: list[str] = []
    if os.lstat(path).st_uid != me:
        foreign.append(str(path))
    else:
        for dirpath, dirnames, _ in os.walk(path):
            mine = []
            for name in dirnames:
                full = os.path.join(dirpath, name)
                if os.lstat(full).st_uid == me:
                    mine.append(name)
                else:
                    foreign.append(full)  # emptied from inside, removed from outside
            dirnames[:] = mine  # do not descend into foreign directories
    for top in foreign:
        run(in_tree_namespace(["find", top, "-mindepth", "1", "-delete"]), step="cleanup", capture=True)
    if str(path) in foreign:
        os.rmdir(path)
    else:
        shutil.rmtree(path)
