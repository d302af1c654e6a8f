"""File helpers every step shares: hashing, and the one way to publish a file or tree atomically.

A step writes into `temp_beside(dest)` (same directory, so a rename publishes it) and calls
`publish(tmp, dest)` when the result is complete; `discard(tmp)` in a `finally` removes what a failed
or interrupted step left. `write_atomically` and `copy_atomically` do all three for small files.
Leftover temporaries of processes that no longer exist are swept the next time a step writes there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from osbuilder import procs, userns

log = logging.getLogger("osbuilder")


def sha256_file(path: Path) -> str:
    """sha256 of one file, read in 1 MiB blocks (images are hundreds of MiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}


def not_a_file(path: Path) -> str | None:
    """Why `path` is not a regular file to read, in words for an error line ("does not exist", "is a
    directory", "is a character device", ...); None when it is one (symlinks followed)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return f"is {KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a file"


def file_hash(*paths: Path) -> str:
    """sha256 over files (and, recursively, directories) in a stable order."""
    h = hashlib.sha256()
    for path in paths:
        entries = sorted(p for p in path.rglob("*") if p.is_symlink() or p.is_file()) if path.is_dir() else [path]
        for f in entries:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
            # a symlink counts by its target text (the target may not exist on the host)
            h.update(b"->" + os.readlink(f).encode() if f.is_symlink() else f.read_bytes())
    return h.hexdigest()


MAX_SYMLINK_HOPS = 40  # as Linux's path walk


def resolve_in(root: Path, rel: str) -> Path | None:
    """Resolve `rel` inside `root` as the guest would see it: every symlink (absolute or relative) and
    every `..` is followed within the tree, never out of it and never through the host's own files.
    The path of the entry it leads to (no symlink left in it below `root`), or None when there is none
    (or the links loop)."""
    pending = [p for p in rel.split("/") if p not in ("", ".")]
    done: list[str] = []  # real (non-symlink) entries, from the top of the tree
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()  # a real directory's parent; at the top, `..` stays at the top
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        if not os.path.lexists(candidate) or (pending and not candidate.is_dir()):
            return None
        done.append(part)
    return root.joinpath(*done)


def remove(path: Path) -> None:
    """Remove a file, link or tree (a rootfs built by an ordinary user is removed in its namespace)."""
    if path.is_dir() and not path.is_symlink():
        userns.remove_tree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard(path: Path) -> None:
    """Remove a temporary path after a step, whether it worked or not: a failure here is logged, not
    raised, so it never hides the step's own error (the next run removes leftovers, see temp_beside)."""
    try:
        remove(path)
    except Exception as e:  # noqa: BLE001 - cleanup must not mask the real outcome
        log.warning("could not remove %s: %s", path, getattr(e, "message", e))


def temp_beside(dest: Path) -> Path:
    """A fresh temporary path next to `dest` (same filesystem, so a rename publishes it).

    Leftovers of interrupted runs (same prefix, a process that no longer exists) are removed, unless
    a live process still names them on its command line (an orphan of a killed run, still writing).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    for old in dest.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and not procs.in_use(old):
            remove(old)
    tmp = dest.with_name(f"{prefix}{os.getpid()}")
    remove(tmp)
    return tmp


def can_link(source: Path, directory: Path) -> bool:
    """Whether a hard link to the file `source` can be made in `directory` (the same filesystem and mount,
    one with hard links): a link is made and removed."""
    probe = temp_beside(directory / f".link-probe-{source.name}")
    try:
        os.link(source, probe)
    except OSError:
        return False
    probe.unlink()
    return True


def pid_tempdir(prefix: str, parent: Path) -> Path:
    """A fresh private (0700) directory `<prefix><pid>-XXXX` in `parent`, after removing those of
    processes that are gone (a SIGKILLed osbuilder cannot remove its own) unless a live process still
    names them (an orphan QEMU serving its sockets)."""
    for old in parent.glob(f"{prefix}*-*"):
        pid = old.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and not procs.in_use(old):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def publish(tmp: Path, dest: Path) -> None:
    """Move a completed `tmp` (file or directory) to `dest`, replacing what was there."""
    if tmp.is_dir() and not tmp.is_symlink() and dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        remove(old)
        os.rename(dest, old)
        os.rename(tmp, dest)
        remove(old)
    else:
        os.replace(tmp, dest)


def write_via_temp(dest: Path, fill: Callable[[Path], object], mode: int | None = None) -> Path:
    """`fill(tmp)` a temporary path beside `dest`, set its mode, then publish it as `dest`; nothing
    is left behind when `fill` fails."""
    tmp = temp_beside(dest)
    try:
        fill(tmp)
        if mode is not None:
            tmp.chmod(mode)
        publish(tmp, dest)
    finally:
        discard(tmp)
    return dest


def write_atomically(dest: Path, data: str | bytes, mode: int | None = None) -> Path:
    """Write `data` to `dest` so that readers see the old content or the new, never a part."""
    if isinstance(data, str):
        return write_via_temp(dest, lambda tmp: tmp.write_text(data), mode)
    return write_via_temp(dest, lambda tmp: tmp.write_bytes(data), mode)


def copy_atomically(source: Path, dest: Path, mode: int | None = None) -> Path:
    """Copy `source` to `dest` through a temporary name beside it."""
    return write_via_temp(dest, lambda tmp: shutil.copyfile(source, tmp), mode)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_atomically(target: str, link: Path) -> Path:
    """Point the symlink `link` at `target`, replacing what was there in one rename."""
    tmp = temp_beside(link)
    try:
        tmp.symlink_to(target)
        os.replace(tmp, link)
    finally:
        discard(tmp)
    return link
