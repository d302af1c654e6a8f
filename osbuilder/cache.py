"""Content-addressed artifact cache under WORKDIR/cache, with atomic publish and cross-process locks.

An artifact's key is the sha256 of its manifest: a flat mapping of every input that shapes it
(settings, package list, source hashes, tool versions). Entries live in
`WORKDIR/cache/<kind>/<key>/` next to their `manifest.json`. A build runs in a temporary directory
beside the entry and is renamed into place only when it completed, under a file lock, so parallel
pytest-xdist workers build each artifact once. When a lookup misses, `explain_miss` names the
inputs that differ from the most recent entry of the same kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from osbuilder import userns

log = logging.getLogger("osbuilder")

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    """sha256 of one file, read in 1 MiB blocks (images are hundreds of MiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


@dataclass(frozen=True)
class Manifest:
    kind: str
    inputs: dict[str, str]

    @property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, manifest: Manifest) -> Path:
        return self.root / manifest.kind / manifest.key

    def lookup(self, manifest: Manifest) -> Path | None:
        entry = self.entry(manifest)
        return entry if (entry / MANIFEST).is_file() else None

    def get_or_build(self, manifest: Manifest, build: Callable[[Path], None], rebuild: bool = False) -> Path:
        """Return the entry directory for `manifest`, calling `build(tmpdir)` to fill it on a miss."""
        entry = self.entry(manifest)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if rebuild and entry.exists():
                _remove(entry)
            if (entry / MANIFEST).is_file():
                log.info("cache hit: %s %s", manifest.kind, manifest.key)
                os.utime(entry / MANIFEST)  # most recently used
                return entry
            for reason in self.explain_miss(manifest):
                log.info("cache miss: %s: %s", manifest.kind, reason)
            tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
            _remove(tmp)
            tmp.mkdir()
            try:
                build(tmp)
                (tmp / MANIFEST).write_text(json.dumps(
                    {"kind": manifest.kind, "key": manifest.key, "inputs": manifest.inputs,
                     "created": time.time()}, indent=2, sort_keys=True))
                _remove(entry)
                os.rename(tmp, entry)
            finally:
                discard(tmp)
        return entry

    def explain_miss(self, manifest: Manifest) -> list[str]:
        """Which inputs differ from the closest cached entry of the same kind."""
        kind_dir = self.root / manifest.kind
        found = list(kind_dir.glob(f"*/{MANIFEST}")) if kind_dir.is_dir() else []
        if not found:
            return ["no earlier build"]
        best: list[str] | None = None
        for path in found:
            previous = json.loads(path.read_text())["inputs"]
            reasons = [f"{name} changed: {_short(previous.get(name))} -> {_short(manifest.inputs.get(name))}"
                       for name in sorted(set(previous) | set(manifest.inputs))
                       if previous.get(name) != manifest.inputs.get(name)]
            if best is None or len(reasons) < len(best):
                best = reasons
        return best or ["entry missing"]


def _short(value: str | None) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= 60 else value[:57] + "..."


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        userns.remove_tree(path)  # a rootfs built by an ordinary user has owners only its namespace maps
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard(path: Path) -> None:
    """Remove a temporary path after a step, whether it worked or not: a failure here is logged, not
    raised, so it never hides the step's own error (the next run removes leftovers, see temp_beside)."""
    try:
        _remove(path)
    except Exception as e:  # noqa: BLE001 - cleanup must not mask the real outcome
        log.warning("could not remove %s: %s", path, getattr(e, "message", e))


def temp_beside(dest: Path) -> Path:
    """A fresh temporary path next to `dest` (same filesystem, so a rename publishes it).

    Leftovers of interrupted runs (same prefix, a process that no longer exists) are removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    for old in dest.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove(old)
    tmp = dest.with_name(f"{prefix}{os.getpid()}")
    _remove(tmp)
    return tmp


def publish(tmp: Path, dest: Path) -> None:
    """Move a completed `tmp` (file or directory) to `dest`, replacing what was there."""
    if tmp.is_dir() and dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        _remove(old)
        os.rename(dest, old)
        os.rename(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)
