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
taken back afterwards (`lend_to_tree_namespace`); it is never writable by other users. A copy of a
tree (`copy_tree`), or one whose files are hard links to the tree's (`share_tree`), is made in the
namespace too, so it keeps the tree's owners.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
from pathlib import Path

from osbuilder.errors import UsageError
from osbuilder.run import run

HELPER = ["mmdebstrap", "--unshare-helper"]
log = logging.getLogger("osbuilder")


def rootless() -> bool:
    return os.geteuid() != 0


def in_tree_namespace(argv: list[str]) -> list[str]:
    """`argv`, run where the tree's owners are its real ones (the user namespace when not root)."""
    return [*HELPER, *argv] if rootless() else argv


def owners() -> str:
    """Who the files of a tree built by this user belong to on the host, for cache keys: `root`, or the
    user's subordinate id ranges (a tree made in one mapping cannot be used in another)."""
    if not rootless():
        return "root"
    user, uid = getpass.getuser(), str(os.getuid())
    ranges = []
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        ranges.append(",".join(line.split(":", 1)[1] for line in lines
                               if line.count(":") == 2 and line.split(":")[0] in (user, uid)) or "none")
    return f"uid {uid}, subordinate uids {ranges[0]}, gids {ranges[1]}"


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


def unreachable(path: Path) -> Path | None:
    """The first directory on the way to `path` that others cannot search (the namespace cannot pass it)."""
    for p in [path, *path.parents]:
        if p.exists() and not p.stat().st_mode & 0o001:
            return p
    return None


def check_reachable(path: Path, setting: str) -> None:
    """Inside the namespace the user's directories are nobody's: every directory on the way to
    `path` must be searchable by others."""
    p = unreachable(path)
    if p is not None:
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


def copy_tree(source: Path, dest: Path, logfile: Path, step: str = "rootfs") -> None:
    """Copy a tree with its owners, modes, times and links (`cp -a`, sharing blocks where the filesystem
    can: reflinks), where its owners are the real ones: a rootless tree's belong to subordinate ids, so
    the copy is made in its namespace, into a directory lent to it. `dest` must not exist."""
    _cp(["--reflink=auto"], source, dest, logfile, step)


def share_tree(source: Path, dest: Path, logfile: Path, step: str = "rootfs") -> bool:
    """`dest` (which must not exist) becomes `source`'s tree as `copy_tree` makes it, but its files are
    hard links to `source`'s (`cp -a --link`): only directories are written, no file's data. Only for a
    `source` nothing writes any more (a cache entry) and a `dest` whose files are replaced or removed,
    never written in place: a file written in place would change in both trees. Where a link cannot
    be made (a file with too many links, another mount), a copy. Returns whether the files are shared."""
    if _cp(["--link"], source, dest, logfile, step, check=False):
        return True
    log.info("%s: %s could not be linked, copying it instead (see %s)", step, source, logfile)
    remove_tree(dest)
    copy_tree(source, dest, logfile, step)
    return False


def _cp(options: list[str], source: Path, dest: Path, logfile: Path, step: str, check: bool = True) -> bool:
    """`cp -a <options>` of the tree `source` as the new directory `dest`, in the tree's namespace, and
    `dest` given `source`'s mode and owner; whether cp succeeded (with `check`, it must)."""
    dest.mkdir(mode=0o700)
    lend_to_tree_namespace(dest, logfile, step)
    done = run(in_tree_namespace(["cp", "-a", *options, "--", f"{source}/.", str(dest)]), step=step,
               logfile=logfile, check=check)
    if done.returncode != 0:
        return False
    run(in_tree_namespace(["chmod", f"--reference={source}", "--", str(dest)]), step=step, logfile=logfile)
    if not rootless():
        run(["chown", f"--reference={source}", "--", str(dest)], step=step, logfile=logfile)
    return True


def lend_to_tree_namespace(path: Path, logfile: Path, step: str = "image") -> None:
    """Let the tree's namespace write the user's file `path` (mode 0600) without letting anyone else:
    as an ordinary user, give it to that namespace's root (the user's first subordinate ids, so still
    the user's); as root there is nothing to do."""
    if rootless():
        _chown_to_tree_ids(path, "1:1", logfile, step)


def take_back_from_tree_namespace(path: Path, logfile: Path, step: str = "image") -> None:
    """Give `path` back to the user (undoing lend_to_tree_namespace) and make it readable, mode 0644."""
    if rootless() and path.stat().st_uid != os.getuid():
        _chown_to_tree_ids(path, "0:0", logfile, step)
    path.chmod(0o644)


def _chown_to_tree_ids(path: Path, owner: str, logfile: Path, step: str) -> None:
    """chown `path` to `owner` in a user namespace where 0:0 is the user and 1:1 is the tree namespace's
    root (as mmdebstrap hands its target directory over): newuidmap lets a user map both."""
    maps = run(in_tree_namespace(["grep", "-H", "", "/proc/self/uid_map", "/proc/self/gid_map"]),
               step=step, capture=True, logfile=logfile).stdout.decode()
    root = dict(re.findall(r"^/proc/self/(\w)id_map:\s*0\s+(\d+)\s", maps, re.M))  # inside 0 -> outside
    uid, gid = root["u"], root["g"]
    run(["unshare", "--map-user=0", "--map-group=0", f"--map-users={uid},1,1", f"--map-groups={gid},1,1",
         "chown", owner, str(path)], step=step, logfile=logfile)
