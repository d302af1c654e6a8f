"""Content-addressed artifact cache (Manifest, Cache), with atomic publish and cross-process locks.

An artifact's key is the sha256 of its manifest: a flat mapping of every input that shapes it
(settings, package list, source hashes, tool versions). Entries live in
`<cache root>/<kind>/<key>/` (WORKDIR/cache, or the per-user cache for artifacts that do not
depend on a WORKDIR) next to their `manifest.json`. A build runs in a temporary directory
beside the entry and is renamed into place only when it completed, under a file lock, so parallel
pytest-xdist workers build each artifact once. When a lookup misses, `explain_miss` names the
inputs that differ from the closest readable entry of the same kind.

The manifest also records the entry's content: every file's mode, owner, size, mtime and sha256, every
directory's mode and owner, every link's target. The filesystem is synced before the rename that publishes
an entry, and a hit is checked against the record: a walk of the tree comparing types, modes, owners, sizes
and link targets, reading a file only when its mtime moved, so an entry torn by a power loss, a full disk or
a stray edit or chmod is rebuilt, with one line saying why (kept in `<cache root>/torn.log` too). Bytes
changed in place under the same size and mtime are not seen by a hit: `full` checks (`osbuilder cache
verify`, cache_admin.py) hash every file. A build that copies a recorded tree (the rootfs copies the base
tree) hands that record back (`Copied`): a copied file whose size and mtime are the recorded ones keeps its
hash unread, the same trust a hit gives it.
Whoever removes an entry takes its lock (`Cache.lock`) and renames it away (`evict`), so a lookup finds the
whole entry or none.
With `rebuild` and a `session` (pytest's `--osbuilder-rebuild`: the test run's id, shared by its xdist
workers), an entry is rebuilt once per session: the ones this session made are hits.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from filelock import FileLock

from osbuilder import errors, fs
from osbuilder.fs import discard, publish, sha256_file, temp_beside, write_atomically

log = logging.getLogger("osbuilder")

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    kind: str
    inputs: dict[str, str]

    @property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


TORN_LOG = "torn.log"  # <cache root>/torn.log: a line per entry found torn and rebuilt (Cache._note_torn)


class Cache:
    """`root` holds the entries; `setting` names where it comes from in errors (WORKDIR, CACHE_DIR)."""

    def __init__(self, root: Path, setting: str = "WORKDIR") -> None:
        self.root = root
        self.setting = setting

    def entry(self, manifest: Manifest) -> Path:
        return self.root / manifest.kind / manifest.key

    @staticmethod
    def lock(entry: Path, timeout: float = -1) -> FileLock:
        """The lock every lookup, build and removal of `entry` holds (timeout 0: fail at once if held)."""
        return FileLock(str(entry) + ".lock", timeout=timeout)

    def get_or_build(self, manifest: Manifest, build: Callable[[Path], object], rebuild: bool = False,
                     session: str | None = None) -> Path:
        """Return the entry directory for `manifest`, calling `build(tmpdir)` to fill it on a miss (it may
        return `Copied`, the record of what it copied, so that those files are not read again).

        `rebuild`: build again, except (with `session`) an entry this session built already.
        A full disk is an InfrastructureError naming `setting`; nothing half-written is left."""
        with self.held(manifest, build, rebuild, session) as entry:
            return entry

    @contextmanager
    def held(self, manifest: Manifest, build: Callable[[Path], object], rebuild: bool = False,
             session: str | None = None) -> Iterator[Path]:
        """get_or_build, the entry's lock held inside the `with` block: no other process rebuilds or
        replaces the entry while the block reads it (a copy of a base tree)."""
        entry = self.entry(manifest)
        with self._room(manifest):
            entry.parent.mkdir(parents=True, exist_ok=True)
            lock = self.lock(entry)
            lock.acquire()
        try:
            with self._room(manifest):
                if not self._usable(entry, manifest, rebuild, session):
                    self._fill(entry, manifest, build, session)
            yield entry
        finally:
            lock.release()

    @contextmanager
    def _room(self, manifest: Manifest) -> Iterator[None]:
        """An OSError for a full disk becomes the one-line InfrastructureError naming `setting`."""
        try:
            yield
        except OSError as e:
            if not errors.out_of_space(e):
                raise
            raise errors.full_disk(self.setting, f"in {self.root} while caching {manifest.kind} {manifest.key}",
                                   e) from None

    def _usable(self, entry: Path, manifest: Manifest, rebuild: bool, session: str | None) -> bool:
        """Whether `entry` is a hit (under the entry's lock); logs why not."""
        record, problem = inspect_entry(entry, manifest)
        what = f"{manifest.kind} {manifest.key}"
        if problem is not None:
            log.warning("cache: %s is torn (%s); rebuilding", what, problem)
            self._note_torn(what, problem)
        elif record is None:
            for reason in self.explain_miss(manifest):
                log.info("cache miss: %s: %s", manifest.kind, reason)
        elif rebuild and (session is None or record.get("session") != session):
            log.info("cache: %s: rebuilding (asked to: --force, or pytest's --osbuilder-rebuild)", what)
        else:
            log.info("cache hit: %s", what)
            if record.pop("refreshed", False):  # mtimes moved, content the same: remember the new ones
                write_atomically(entry / MANIFEST, _dump(record))
            os.utime(entry / MANIFEST)  # most recently used
            return True
        return False

    def _note_torn(self, what: str, problem: str) -> None:
        """Append to <root>/torn.log when and why an entry was rebuilt: the warning scrolls by, or a test run
        captures it, and a rebuild of the same inputs is otherwise not told from a first build."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with (self.root / TORN_LOG).open("a") as f:
                f.write(f"{stamp} pid {os.getpid()}: {what} is torn ({problem}); rebuilt\n")
        except OSError:
            pass  # the warning said it; a cache that cannot take a line fails where it matters, in the build

    def _fill(self, entry: Path, manifest: Manifest, build: Callable[[Path], object], session: str | None) -> None:
        tmp = temp_beside(entry)
        tmp.mkdir()
        try:
            copied = build(tmp)
            like = copied.contents if isinstance(copied, Copied) else None
            record = {"kind": manifest.kind, "key": manifest.key, "inputs": manifest.inputs, "created": time.time(),
                      "session": session or "", "record": RECORD_FORMAT, "contents": describe_tree(tmp, like)}
            (tmp / MANIFEST).write_text(_dump(record))
            _sync_filesystem(tmp)  # every file and directory of the entry is on disk before it is published
            publish(tmp, entry)
            fs.fsync_dir(entry.parent)
        finally:
            discard(tmp)

    def explain_miss(self, manifest: Manifest) -> list[str]:
        """Which inputs differ from the closest cached entry of the same kind (temporaries of other
        builds, which may vanish at any moment, and unreadable manifests are skipped)."""
        kind_dir = self.root / manifest.kind
        try:
            names = sorted(os.listdir(kind_dir))
        except OSError:
            names = []
        best: list[str] | None = None
        for name in names:
            if name.startswith(".") or name.endswith(".lock"):
                continue
            previous = _read_record(kind_dir / name)
            inputs = previous.get("inputs") if previous else None
            if not isinstance(inputs, dict):
                continue
            reasons = [f"{k} changed: {_short(inputs.get(k))} -> {_short(manifest.inputs.get(k))}"
                       for k in sorted(set(inputs) | set(manifest.inputs))
                       if inputs.get(k) != manifest.inputs.get(k)]
            if best is None or len(reasons) < len(best):
                best = reasons
        if best is None:
            return ["no earlier build"]
        return best or ["entry missing"]


# -- the content record -----------------------------------------------------------------------
# One string per path below the entry, <attrs> being "<mode, 4 octal digits>:<uid>:<gid>":
# "d:<attrs>" a directory, "l:<target>" a symlink, "f:<attrs>:<size>:<mtime_ns>:<sha256>" a regular file
# ("?" for a file this user cannot read: a rootless rootfs keeps some of those), "o:<file type>:<attrs>"
# anything else. A file's mode is part of what the tree is: the files of a rootfs entry are hard links to
# the base tree's, so a chmod of one changes every tree that shares it, and a hit must notice.
RECORD_FORMAT = 2  # the manifest's "record": 1 (absent) had no modes or owners, and cannot vouch for them


def describe_path(path: Path) -> str:
    """The content record of one file, link or directory itself (not what is below a directory)."""
    return _describe(str(path), os.lstat(path))


def path_matches(path: Path, record: str) -> bool:
    """Whether `path` still is what `record` (describe_path) says: type, size, link target, and the
    content's hash when its mtime moved."""
    try:
        problem, _ = _compare(str(path), os.lstat(path), record)
    except (OSError, ValueError):
        return False
    return problem is None


@dataclass(frozen=True)
class Copied:
    """What a build may hand back to `get_or_build`: the content record (keyed as in the entry) of files it
    copied from another recorded tree, with their sizes and mtimes. The entry's record takes a file's hash
    from it where the size and mtime are still the recorded ones (the trust a hit's check gives them)
    instead of reading the file again."""

    contents: dict[str, str]

    @classmethod
    def under(cls, prefix: str, contents: dict[str, str]) -> Copied:
        """`contents` (relative to a tree) for a tree at `prefix` in the entry."""
        return cls({f"{prefix}/{rel}": record for rel, record in contents.items()})


def describe_tree(root: Path, like: dict[str, str] | None = None) -> dict[str, str]:
    """The content record of everything below `root` (but its manifest). `like`: the record of a tree
    this one was copied from: a file whose size and mtime are the same there keeps that hash unread."""
    like = like or {}
    return {rel: _describe(path, st, like.get(rel)) for rel, path, st in _walk(root)}


def tree_record(entry: Path, below: str) -> dict[str, str]:
    """The content record of the tree `below` in `entry`, from its manifest, keyed relative to that tree
    (a hint for describe_tree; {} when the manifest cannot be read or is of an older format)."""
    record = _read_record(entry) or {}
    contents = record.get("contents")
    if not isinstance(contents, dict) or record.get("record") != RECORD_FORMAT:
        return {}
    prefix = below.rstrip("/") + "/"
    return {rel[len(prefix):]: want for rel, want in contents.items()
            if isinstance(want, str) and rel.startswith(prefix)}


def check_tree(root: Path, contents: dict[str, str], full: bool = False) -> tuple[str | None, bool]:
    """(what is wrong with `root` against its record or None, whether `contents` was updated).

    Sizes, types and link targets are compared for every path; a file is read only when its mtime
    moved (`full`: every file is read and hashed), and a file whose mtime moved gets its new mtime in
    `contents` if its content is still the recorded one."""
    seen: set[str] = set()
    refreshed = False
    for rel, path, st in _walk(root):
        seen.add(rel)
        want = contents.get(rel)
        if want is None:
            return f"{rel}: not in its content record", False
        problem, updated = _compare(path, st, want, full)
        if problem:
            return f"{rel}: {problem}", False
        if updated:
            contents[rel] = updated
            refreshed = True
    missing = sorted(set(contents) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{missing[0]}: missing{more}", False
    return None, refreshed


def _walk(root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, path, lstat) of everything below `root` but its manifest, never following
    links; a directory this user cannot list is walked as empty (the same at publish and at every
    check). Each directory's entries come sorted, directories after the one holding them."""
    pending = [(str(root), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as it:
                found = sorted(it, key=lambda e: e.name)
        except PermissionError:
            continue
        for e in found:
            if not prefix and (e.name == MANIFEST or e.name.startswith(f".{MANIFEST}.")):
                continue
            rel = prefix + e.name
            st = e.stat(follow_symlinks=False)
            yield rel, e.path, st
            if stat.S_ISDIR(st.st_mode):
                pending.append((e.path, rel + "/"))


def _attrs(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}:{st.st_uid}:{st.st_gid}"


class RecordedFile(NamedTuple):
    """A regular file's record, parsed."""

    attrs: str  # "<mode>:<uid>:<gid>"
    size: int
    mtime_ns: int
    digest: str  # sha256, or "?" for a file its builder could not read


def recorded_file(record: str) -> RecordedFile | None:
    """A regular file's record parsed; None for anything else. ValueError for a malformed one."""
    if not record.startswith("f:"):
        return None
    mode, uid, gid, size, mtime, digest = record[2:].split(":", 5)
    return RecordedFile(f"{mode}:{uid}:{gid}", int(size), int(mtime), digest)


def _describe(path: str, st: os.stat_result, like: str | None = None) -> str:
    if stat.S_ISDIR(st.st_mode):
        return f"d:{_attrs(st)}"
    if stat.S_ISLNK(st.st_mode):
        return "l:" + os.readlink(path)
    if stat.S_ISREG(st.st_mode):
        known = recorded_file(like) if like is not None else None
        unmoved = known is not None and (known.size, known.mtime_ns) == (st.st_size, st.st_mtime_ns)
        digest = known.digest if known is not None and unmoved else _hash(path)
        return f"f:{_attrs(st)}:{st.st_size}:{st.st_mtime_ns}:{digest}"
    return f"o:{stat.S_IFMT(st.st_mode):o}:{_attrs(st)}"


def _hash(path: str) -> str:
    try:
        return sha256_file(Path(path))
    except PermissionError:
        return "?"


def _compare(path: str, st: os.stat_result, want: str, full: bool = False) -> tuple[str | None, str | None]:
    """(problem, updated record) of one path against its record (`full`: a file's content is hashed even
    when its mtime did not move)."""
    kind, _, rest = want.partition(":")
    have = _describe_type(st)
    if have != kind:
        return f"is a {_NAMES[have]}, recorded as a {_NAMES.get(kind, kind)}", None
    if kind == "l":
        return ("link target changed" if os.readlink(path) != rest else None), None
    if kind == "o":
        file_type, _, attrs = rest.partition(":")
        if file_type != f"{stat.S_IFMT(st.st_mode):o}":
            return "file type changed", None
        return _attrs_changed(st, attrs), None
    recorded = recorded_file(want)
    if recorded is None:  # a directory: "d:<attrs>"
        return _attrs_changed(st, rest), None
    problem = _attrs_changed(st, recorded.attrs)
    if problem:
        return problem, None
    if st.st_size != recorded.size:
        return f"{st.st_size} bytes, recorded {recorded.size}", None
    moved = st.st_mtime_ns != recorded.mtime_ns
    if not moved and not full:
        return None, None
    if recorded.digest != "?" and _hash(path) != recorded.digest:
        return "content changed" if moved else "content changed (same size and mtime)", None
    return None, (f"f:{recorded.attrs}:{recorded.size}:{st.st_mtime_ns}:{recorded.digest}" if moved else None)


def _attrs_changed(st: os.stat_result, recorded: str) -> str | None:
    """What differs between `st`'s mode and owner and the recorded ones ("<mode>:<uid>:<gid>"), or None."""
    have = _attrs(st)
    if have == recorded:
        return None
    (mode, owner), (was_mode, was_owner) = (a.split(":", 1) for a in (have, recorded))
    return f"mode {mode}, recorded {was_mode}" if mode != was_mode else f"owner {owner}, recorded {was_owner}"


_NAMES = {"d": "directory", "l": "symlink", "f": "file", "o": "special file"}


def _describe_type(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISLNK(st.st_mode):
        return "l"
    return "f" if stat.S_ISREG(st.st_mode) else "o"


# -- reading entries ---------------------------------------------------------------------------


def _read_record(entry: Path) -> dict[str, Any] | None:
    """An entry's manifest, or None when it is missing, unreadable or not a manifest."""
    try:
        record = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def inspect_entry(entry: Path, manifest: Manifest,
                  full: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(the entry's manifest, what is wrong with the entry): (None, None) when there is no entry.
    A manifest whose content record was refreshed carries "refreshed": True. `full`: check_tree's."""
    if not entry.is_dir():
        return None, None
    record = _read_record(entry)
    if record is None:
        return None, f"{MANIFEST} is missing or unreadable"
    if record.get("key") != manifest.key or record.get("inputs") != manifest.inputs:
        return record, f"{MANIFEST} describes other inputs"
    contents = record.get("contents")
    if not isinstance(contents, dict):
        return record, "no content record (made by an older osbuilder)"
    if record.get("record") != RECORD_FORMAT:
        return record, "its content record has no file modes or owners (made by an older osbuilder)"
    try:
        problem, refreshed = check_tree(entry, contents, full)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return record, f"cannot check it: {e}"
    if refreshed:
        record["refreshed"] = True
    return record, problem


def check_entry(entry: Path, full: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """inspect_entry for an entry found on disk rather than looked up: checked against the manifest it
    holds, which must name the entry's kind and key (its directory)."""
    if not entry.is_dir():
        return None, None
    record = _read_record(entry)
    if record is None:
        return None, f"{MANIFEST} is missing or unreadable"
    kind, inputs = record.get("kind"), record.get("inputs")
    if not isinstance(kind, str) or not isinstance(inputs, dict):
        return record, f"{MANIFEST} names no kind or inputs"
    manifest = Manifest(kind, inputs)
    if kind != entry.parent.name or manifest.key != entry.name:
        return record, f"{MANIFEST} describes another entry ({kind} {manifest.key})"
    return inspect_entry(entry, manifest, full)


def evict(entry: Path) -> Path:
    """Rename `entry` away (the caller holds `Cache.lock(entry)`): a lookup then finds no entry, never a
    part of one. Returns the new name, a hidden directory beside it for the caller to delete (after the
    lock is released: deleting a rootfs takes a while)."""
    trash = entry.with_name(f".{entry.name}.{EVICTED}{os.getpid()}-{os.urandom(4).hex()}")
    os.rename(entry, trash)
    fs.fsync_dir(entry.parent)
    return trash


EVICTED = "removed-"  # evict's names: .<key>.removed-<pid>-<random>


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def _sync_filesystem(path: Path) -> None:
    """Flush the filesystem holding `path` (syncfs: one call, where an fsync per file of a rootfs
    takes seconds; os.sync where syncfs is missing)."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _short(value: str | None) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= 60 else value[:57] + "..."
