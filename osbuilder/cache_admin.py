"""`osbuilder cache list|verify|prune`: see, check and bound what osbuilder keeps.

Two artifact caches (cache.py): WORKDIR/cache (the steps' and the fixtures' artifacts) and
CACHE_DIR/artifacts (Debian's boot kernel, shared by every WORKDIR). The per-user cache also holds
ccache, unpacked kernel sources, private apt lists, apt's downloads and logs; the container engine holds the USE_DOCKER
tools images, one per set of inputs.

- `list`: every entry: its size, when it was made and last used (its manifest's mtime: a hit touches
  it), whether WORKDIR publishes it, and temporaries and torn entries as such; then the other parts
  of the per-user cache and the tools images (when an engine is installed; nothing is probed).
- `verify`: every file of every entry hashed against its content record (a hit hashes only the files
  whose mtime moved). A problem is checked again under the entry's lock before it is reported, so a
  build replacing the entry meanwhile is not one; `--remove` renames a corrupt entry away under that
  lock, so the next use rebuilds it.
- `prune`: entries not used for DAYS (or all of them), never one WORKDIR publishes, one whose lock
  another process holds or one a running process names (a QEMU booting its image); each is renamed
  away under its lock (a lookup finds the whole entry or none), then deleted. Also the leftovers of
  builds whose process is gone, and the tools images other than the current settings' one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from osbuilder import artifacts, fs, procs
from osbuilder.cache import EVICTED, MANIFEST, Cache, check_entry, evict, recorded_file
from osbuilder.container import engine as engine_mod
from osbuilder.container import tools_image
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.layout import UserCache, Workdir
from osbuilder.settings import Settings
from osbuilder.terminal import printable

log = logging.getLogger("osbuilder")

DAY = 86400.0
DEFAULT_DAYS = 30.0

# Hidden names beside the entries, each with the process that made it: a build's temporary (fs.temp_beside),
# an entry being replaced (fs.publish), one being removed (cache.evict).
_DOING = {"tmp": "being built", "old": "being replaced", EVICTED.rstrip("-"): "being removed"}
_TEMPORARY = re.compile(rf"^\.(?P<key>.+)\.(?P<what>{'|'.join(_DOING)})-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


# -- what is there ------------------------------------------------------------------------------------------


@dataclass
class Usage:
    """The space a tree takes."""

    bytes: int = 0  # the sizes of its regular files
    disk_bytes: int = 0  # the blocks allocated to it (a sparse image counts what it holds), each inode once
    shared_bytes: int = 0  # disk_bytes of files with hard links outside the tree: removing it frees the rest
    workdir_bytes: int = 0  # of those, the files WORKDIR publishes (its image, initrd, kernel files)
    files: int = 0

    @property
    def frees(self) -> int:
        return self.disk_bytes - self.shared_bytes


def usage(root: Path, workdir_inodes: frozenset[tuple[int, int]] = frozenset(),
          seen: dict[tuple[int, int], int] | None = None) -> Usage:
    """What the directory `root` takes (nothing when it is missing; links are not followed, and a directory
    this user cannot list counts as empty). `seen`: every inode of the tree is added to it with its blocks'
    bytes, so that trees sharing files (a rootfs entry and its base tree) can be totalled once."""
    found = Usage()
    files: dict[tuple[int, int], list[int]] = {}  # inode -> [its links, its names here, its blocks]
    seen = {} if seen is None else seen
    try:
        top = os.lstat(root)
    except (FileNotFoundError, NotADirectoryError):
        return found
    if not stat.S_ISDIR(top.st_mode):
        return found
    found.disk_bytes += top.st_blocks * 512
    seen[(top.st_dev, top.st_ino)] = top.st_blocks * 512
    pending = [str(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as it:
                found_here = [(e.path, e.stat(follow_symlinks=False)) for e in it]
        except (PermissionError, FileNotFoundError):
            continue
        for path, st in found_here:
            if stat.S_ISDIR(st.st_mode):
                found.disk_bytes += st.st_blocks * 512
                seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
                pending.append(path)
                continue
            if stat.S_ISREG(st.st_mode):
                found.bytes += st.st_size
                found.files += 1
            inode = (st.st_dev, st.st_ino)
            if inode in files:
                files[inode][1] += 1
            else:
                files[inode] = [st.st_nlink, 1, st.st_blocks * 512]
    for inode, (links, names, blocks) in files.items():
        found.disk_bytes += blocks
        seen[inode] = blocks
        if links > names:
            found.shared_bytes += blocks
            if inode in workdir_inodes:
                found.workdir_bytes += blocks
    return found


@dataclass
class Entry:
    """One directory of an artifact cache: an entry, or a temporary beside the entries."""

    cache: str  # the setting the cache's root comes from: WORKDIR or CACHE_DIR
    path: Path
    kind: str
    key: str  # the entry's key; a temporary's whole name
    state: str  # intact, torn, being built/replaced/removed (pid N), leftover (pid N is gone)
    problem: str | None = None  # what is wrong with a torn entry
    created: float | None = None
    last_used: float | None = None  # the manifest's mtime (a hit touches it); a temporary's mtime
    published: list[str] = field(default_factory=list)  # WORKDIR's artifacts that are this entry
    usage: Usage = field(default_factory=Usage)

    @property
    def temporary(self) -> bool:
        return self.key.startswith(".")

    @property
    def leftover(self) -> bool:
        return self.state.startswith("leftover")

    def name(self) -> str:
        return f"{self.cache} cache {self.kind} {self.key}"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(path=str(self.path), temporary=self.temporary)
        return data


def caches(settings: Settings) -> list[Cache]:
    """The artifact caches these settings use: WORKDIR's, then the per-user one."""
    return [Cache(Workdir.of(settings).cache, "WORKDIR"), Cache(UserCache.of(settings).artifacts, "CACHE_DIR")]


def entry_dirs(cache: Cache) -> Iterator[Path]:
    """Every directory of `cache` (entries and temporaries), by kind then name; lock files left out."""
    for kind in _listdir(cache.root):
        if kind.startswith(".") or not (cache.root / kind).is_dir():
            continue
        for name in _listdir(cache.root / kind):
            path = cache.root / kind / name
            if path.is_dir() and not path.is_symlink():
                yield path


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def describe(cache: Cache, path: Path, published: dict[tuple[str, str], list[str]],
             workdir_inodes: frozenset[tuple[int, int]], check: bool = True,
             seen: dict[tuple[int, int], int] | None = None) -> Entry:
    """An entry or temporary as `list` shows it. `check`: look at an entry as a hit would (a walk, hashing
    only the files whose mtime moved) to tell intact from torn. `seen`: usage's."""
    kind, key = path.parent.name, path.name
    entry = Entry(cache.setting, path, kind, key, "intact", usage=usage(path, workdir_inodes, seen))
    temporary = _TEMPORARY.match(key)
    if key.startswith("."):
        entry.last_used = _mtime(path)
        if temporary is None:
            entry.state = "unknown temporary"
        else:
            pid = int(temporary["pid"])
            alive = Path(f"/proc/{pid}").exists() or procs.in_use(path)
            entry.state = f"{_DOING[temporary['what']]} (pid {pid})" if alive else f"leftover (pid {pid} is gone)"
        return entry
    record, problem = check_entry(path) if check else (None, None)
    if check and record is None and problem is None:  # gone meanwhile
        entry.state = "gone"
        return entry
    if problem is not None:
        entry.state, entry.problem = "torn", problem
    created = (record or {}).get("created")
    entry.created = float(created) if isinstance(created, (int, float)) else None
    entry.last_used = _mtime(path / MANIFEST) or _mtime(path)
    entry.published = published.get((kind, key), []) if cache.setting == "WORKDIR" else []
    return entry


def _mtime(path: Path) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return None


def workdir_inodes(wd: Workdir) -> frozenset[tuple[int, int]]:
    """The inodes of the files WORKDIR publishes as hard links to cache entries."""
    found = set()
    for path in artifacts.published_files(wd):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.add((st.st_dev, st.st_ino))
    return frozenset(found)


def scan(settings: Settings, check: bool = True,
         seen: dict[tuple[int, int], int] | None = None) -> list[tuple[Cache, list[Entry]]]:
    """Each artifact cache with its entries and temporaries (`check`, `seen`: describe's)."""
    wd = Workdir.of(settings)
    published, inodes = artifacts.published_entries(wd), workdir_inodes(wd)
    found = [(cache, [describe(cache, path, published, inodes, check, seen) for path in entry_dirs(cache)])
             for cache in caches(settings)]
    return [(cache, [e for e in entries if e.state != "gone"]) for cache, entries in found]


def other_parts(settings: Settings) -> dict[str, Path]:
    """The per-user cache's parts besides its artifact cache."""
    user = UserCache.of(settings)
    return {"ccache": user.ccache, "kernel-src": user.kernel_sources, "apt": user.apt_states,
            "apt-archives": user.apt_archives, "logs": user.logs}


@dataclass(frozen=True)
class EngineImages:
    """The tools images of one installed engine, or why they are unknown."""

    engine: engine_mod.Engine
    images: list[tools_image.LocalImage]
    current: str | None  # the current settings' tag, when it can be told
    error: str | None = None


def engine_images(settings: Settings) -> list[EngineImages]:
    """The tools images of every installed engine CONTAINER_ENGINE names (none installed: none)."""
    found = []
    for name, path in engine_mod.installed(settings):
        engine = engine_mod.Engine(name, path)
        try:
            images = tools_image.local_images(engine)
        except OsbuilderError as e:
            said = next((line.strip() for line in reversed(e.detail.splitlines()) if line.strip()), e.message)
            found.append(EngineImages(engine, [], None, printable(said[:200], lines=False)))
            continue
        found.append(EngineImages(engine, images, tools_image.current_tag(engine, settings) if images else None))
    return found


# -- list ---------------------------------------------------------------------------------------------------


def list_cache(settings: Settings, as_json: bool = False) -> None:
    now = time.time()
    seen: dict[tuple[int, int], int] = {}  # the entries' inodes: a file two entries share is one file on disk
    scanned = scan(settings, seen=seen)
    parts = {name: usage(path) for name, path in other_parts(settings).items()}
    engines = engine_images(settings)
    entries = [e for _, found in scanned for e in found]
    totals = {"entries": sum(not e.temporary for e in entries), "temporaries": sum(e.temporary for e in entries),
              "entries_disk_bytes": sum(seen.values()),
              "other_parts_disk_bytes": sum(u.disk_bytes for u in parts.values()),
              "tools_images": sum(len(x.images) for x in engines),
              "tools_images_bytes": sum({i.id: i.size for x in engines for i in x.images}.values())}
    if as_json:
        print(json.dumps({
            "caches": [{"cache": c.setting, "root": str(c.root), "entries": [e.as_json() for e in found]}
                       for c, found in scanned],
            "other_parts": {name: {"path": str(path), **asdict(parts[name])}
                            for name, path in other_parts(settings).items()},
            "tools_images": [{"engine": x.engine.name, "error": x.error, "current": x.current,
                              "images": [{**asdict(i), "current": i.ref == x.current} for i in x.images]}
                             for x in engines],
            "totals": totals}, indent=2))
        return
    for cache, found in scanned:
        print(f"{cache.setting} cache: {cache.root}")
        if not found:
            print("  (empty)")
            continue
        print(f"  {'KIND':<14} {'KEY':<22} {'SIZE':>10}  {'CREATED':<16}  {'LAST USED':<13}  STATE")
        for e in found:
            print(f"  {e.kind:<14} {printable(e.key, lines=False):<22} {human(e.usage.disk_bytes):>10}  "
                  f"{when(e.created):<16}  {ago(e.last_used, now):<13}  {state_of(e)}")
    user = UserCache.of(settings).root
    print(f"CACHE_DIR's other parts: {user}")
    for name, part in parts.items():
        print(f"  {name:<14} {human(part.disk_bytes):>10}")
    for x in engines:
        print(f"Tools images ({x.engine.name}, {tools_image.REPOSITORY}):")
        if x.error:
            print(f"  not listed: {x.engine.name} did not answer ({x.error})")
        for image in x.images:
            mark = "current" if image.ref == x.current else ""
            print(f"  {image.ref:<48} {human(image.size):>10}  {when(image.created):<16}  {mark}".rstrip())
        if not x.images and not x.error:
            print("  (none)")
        elif x.images and x.current is None:
            print("  (the current settings' tag is unknown: TOOLS_BASE_IMAGE is not a local image)")
    line = (f"Total: {totals['entries']} entries and {totals['temporaries']} temporaries, "
            f"{human(totals['entries_disk_bytes'])}; CACHE_DIR's other parts {human(totals['other_parts_disk_bytes'])}")
    if engines:
        line += (f"; {totals['tools_images']} tools images, {human(totals['tools_images_bytes'])} "
                 "(as the engines count them: layers they share are counted in each)")
    print(line)


def state_of(e: Entry) -> str:
    words = [e.state if e.problem is None else f"torn: {printable(e.problem, lines=False)}"]
    if e.published:
        words.append(f"published: WORKDIR's {', '.join(e.published)}")
    if e.usage.workdir_bytes:
        words.append(f"{human(e.usage.workdir_bytes)} of it are WORKDIR's files too (hard links)")
    elif e.usage.shared_bytes:
        words.append(f"{human(e.usage.shared_bytes)} of it hard-linked elsewhere")
    return "; ".join(words)


# -- verify -------------------------------------------------------------------------------------------------


@contextmanager
def locked(entry: Path) -> Iterator[None]:
    """The entry's lock, waiting (and saying so) while another process holds it."""
    lock = Cache.lock(entry, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        log.info("cache: waiting for %s, which %s", entry, holders(entry))
        lock = Cache.lock(entry)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def holders(entry: Path) -> str:
    pids = procs.lock_holders(Path(f"{entry}.lock"))
    return f"pid {', '.join(map(str, pids))} is using" if pids else "another process is using"


def verify(settings: Settings, remove: bool = False) -> int:
    """Hash every file of every entry; print each corrupt entry and a summary. The number of corrupt
    entries left (0 with `remove`: they are removed)."""
    started = time.monotonic()
    checked = hashed = unreadable = 0
    corrupt: list[tuple[Path, str]] = []
    wd = Workdir.of(settings)
    for cache in caches(settings):
        for path in entry_dirs(cache):
            if path.name.startswith("."):
                continue  # a temporary: `list` shows it, `prune` removes it once its process is gone
            began = time.monotonic()
            record, problem = check_entry(path, full=True)
            trash = None
            if problem is not None:  # looked at again under the lock: a build may have been replacing it
                with locked(path):
                    record, problem = check_entry(path, full=True)
                    if problem is not None and remove:
                        trash = evict(path)
            if record is None and problem is None:
                continue  # gone meanwhile
            checked += 1
            sizes = _recorded_files(record)
            hashed += sum(size for size, readable in sizes if readable)
            unreadable += sum(not readable for _, readable in sizes)
            log.debug("cache verify: %s %s %s: %s (%s, %s, %.1fs)", cache.setting, path.parent.name,
                      path.name, "intact" if problem is None else "CORRUPT", plural(len(sizes), "file"),
                      human(sum(size for size, _ in sizes)), time.monotonic() - began)
            if problem is not None:
                corrupt.append((path, problem))
                line = f"corrupt{', removed' if trash else ''}: {path}: {printable(problem, lines=False)}"
                published = artifacts.published_entries(wd).get((path.parent.name, path.name), [])
                if published and cache.setting == "WORKDIR":
                    line += f"; WORKDIR's {' and '.join(published)} {'was' if trash else 'is'} published from it"
                    if trash is not None:  # the next step rebuilds it instead of saying "up to date"
                        for artifact in published:
                            artifacts.unpublish(wd, artifact)
                        line += f": `osbuilder {published[0]}` rebuilds it"
                print(line)
            if trash is not None:
                fs.remove(trash)
    summary = (f"cache verify: {checked} entries, {human(hashed)} hashed in {time.monotonic() - started:.1f}s: "
               f"{checked - len(corrupt)} intact, {len(corrupt)} corrupt")
    if corrupt and remove:
        summary += " (removed: the next use rebuilds them)"
    if unreadable:
        summary += f"; {unreadable} files this user cannot read (a rootless rootfs's) were checked by size only"
    print(summary)
    return 0 if remove else len(corrupt)


def _recorded_files(record: dict[str, Any] | None) -> list[tuple[int, bool]]:
    """(size, readable) of each file an entry's content record lists."""
    contents = (record or {}).get("contents")
    found = []
    for value in contents.values() if isinstance(contents, dict) else ():
        try:
            recorded = recorded_file(value) if isinstance(value, str) else None
        except ValueError:  # a record of an older format: counted as nothing
            continue
        if recorded is not None:
            found.append((recorded.size, recorded.digest != "?"))
    return found


# -- prune --------------------------------------------------------------------------------------------------


def command_lines() -> dict[int, bytes]:
    """Every live process's command line."""
    found = {}
    for e in os.scandir("/proc"):
        if e.name.isdigit():
            try:
                found[int(e.name)] = Path(e.path, "cmdline").read_bytes()
            except OSError:
                continue
    return found


def named_by(path: Path, lines: dict[int, bytes]) -> list[int]:
    """The processes whose command line names `path` or a path inside it."""
    needle = os.fsencode(path.absolute())
    return sorted(pid for pid, line in lines.items() if needle + b"/" in line or needle + b"\0" in line
                  or needle + b"," in line)


@dataclass
class Pruned:
    removed: int = 0
    leftovers: int = 0
    freed: int = 0
    skipped: int = 0
    images: int = 0
    image_bytes: int = 0


def prune(settings: Settings, older_than: float = DEFAULT_DAYS, everything: bool = False,
          dry_run: bool = False) -> Pruned:
    """Remove entries not used for `older_than` days (`everything`: any age), leftovers of builds whose
    process is gone, and tools images other than the current one; `dry_run`: only say so."""
    now = time.time()
    cutoff = now - older_than * DAY
    would = "would remove" if dry_run else "removed"
    done = Pruned()
    lines = command_lines()
    wd = Workdir.of(settings)
    for _cache, found in scan(settings, check=False):
        for e in found:
            if e.temporary:
                if e.leftover:
                    print(f"{would} {e.path} ({human(e.usage.frees)}, a {e.state})")
                    done.leftovers += 1
                    done.freed += e.usage.frees
                    if not dry_run:
                        fs.remove(e.path)
                continue
            if not everything and (e.last_used or 0) > cutoff:
                continue
            why_not = _kept(e, lines)
            if why_not:
                print(f"kept {e.name()}: {why_not}")
                done.skipped += 1
                continue
            lock = Cache.lock(e.path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                print(f"skipped {e.name()}: {holders(e.path)} it (its lock is held)")
                done.skipped += 1
                continue
            trash = None
            try:  # under the lock, looked at again: a hit may have used it, a step published it meanwhile
                last_used = _mtime(e.path / MANIFEST) or _mtime(e.path)
                if not e.path.is_dir() or (not everything and (last_used or 0) > cutoff):
                    continue
                if e.cache == "WORKDIR" and artifacts.published_entries(wd).get((e.kind, e.key)):
                    print(f"kept {e.name()}: WORKDIR publishes it")
                    done.skipped += 1
                    continue
                if not dry_run:
                    trash = evict(e.path)
            finally:
                lock.release()
            print(f"{would} {e.name()} ({human(e.usage.frees)}, last used {ago(last_used, now)})")
            done.removed += 1
            done.freed += e.usage.frees
            if trash is not None:
                fs.remove(trash)
    _prune_images(settings, dry_run, done)
    summary = (f"cache prune: {would} {done.removed} entries and {done.leftovers} leftovers, "
               f"{'would free' if dry_run else 'freed'} {human(done.freed)}")
    if done.images:
        summary += (f"; {would} {done.images} tools images ({human(done.image_bytes)} as the engine counts them, "
                    "layers they share with the kept ones stay)")
    if done.skipped:
        summary += f"; {done.skipped} kept or skipped (above)"
    print(summary + ("; nothing was removed (--dry-run)" if dry_run else ""))
    return done


def _kept(e: Entry, lines: dict[int, bytes]) -> str | None:
    """Why an entry old enough to go stays."""
    if e.published:
        return f"WORKDIR publishes it (as its {', '.join(e.published)})"
    pids = named_by(e.path, lines)
    if pids:
        return f"in use: pid {', '.join(map(str, pids))} names it on its command line"
    return None


def _prune_images(settings: Settings, dry_run: bool, done: Pruned) -> None:
    for x in engine_images(settings):
        name = x.engine.name
        if x.error:
            print(f"kept {name}'s tools images: {name} did not answer ({x.error})")
            continue
        if not x.images:
            continue
        keep = x.current or x.images[0].ref  # the newest, when the current tag cannot be told
        if x.current is None:
            print(f"kept {keep}: the newest tools image (the current settings' tag is unknown: "
                  f"TOOLS_BASE_IMAGE is not a local {name} image)")
        for image in x.images:
            if image.ref == keep:
                continue
            if not dry_run:
                try:
                    tools_image.remove_image(x.engine, image.ref)
                except OsbuilderError as e:
                    said = next((line for line in reversed(e.detail.splitlines()) if line.strip()), e.message)
                    print(f"skipped {image.ref}: {name} refused ({printable(said.strip()[:200], lines=False)})")
                    done.skipped += 1
                    continue
            print(f"{'would remove' if dry_run else 'removed'} {name} tools image {image.ref} "
                  f"({human(image.size)}, made {when(image.created)})")
            done.images += 1
            done.image_bytes += image.size


# -- the subcommand -----------------------------------------------------------------------------------------


def command(settings: Settings, action: str, *, as_json: bool = False, remove: bool = False,
            older_than: float | None = None, everything: bool = False, dry_run: bool = False) -> int:
    """`osbuilder cache ACTION`: its exit code."""
    given = {"--json": as_json, "--remove": remove, "--older-than": older_than is not None, "--all": everything,
             "--dry-run": dry_run}
    allowed = {"list": {"--json"}, "verify": {"--remove"}, "prune": {"--older-than", "--all", "--dry-run"}}[action]
    wrong = [flag for flag, on in given.items() if on and flag not in allowed]
    if wrong:
        raise UsageError(f"cache {action}: {', '.join(wrong)} is not an option of `cache {action}`")
    if action == "list":
        list_cache(settings, as_json)
        return 0
    if action == "verify":
        corrupt = verify(settings, remove)
        if corrupt:
            raise OsbuilderError(f"cache verify: {corrupt} corrupt cache entr{'y' if corrupt == 1 else 'ies'} "
                                 "(above); `osbuilder cache verify --remove` removes them, the next use rebuilds")
        return 0
    if everything and older_than is not None:
        raise UsageError("cache prune: --all removes entries of any age; leave out --older-than")
    days = DEFAULT_DAYS if older_than is None else older_than
    if days < 0:
        raise UsageError(f"cache prune: --older-than: expected a number of days, 0 or more, got {days:g}")
    prune(settings, days, everything, dry_run)
    return 0


# -- words --------------------------------------------------------------------------------------------------


def human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    seconds = max(0.0, now - t)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / DAY:.0f} days ago"
