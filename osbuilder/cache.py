"""Content-addressed artifact cache (Manifest, Cache), with atomic publish and cross-process locks.

An artifact's key is the sha256 of its manifest: a flat mapping of every input that shapes it
(settings, package list, source hashes, tool versions). Entries live in
`<cache root>/<kind>/<key>/` (WORKDIR/cache, or the per-user cache for artifacts that do not
depend on a WORKDIR) next to their `manifest.json`. A build runs in a temporary directory
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

from osbuilder.fs import discard, remove

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
                remove(entry)
            if (entry / MANIFEST).is_file():
                log.info("cache hit: %s %s", manifest.kind, manifest.key)
                os.utime(entry / MANIFEST)  # most recently used
                return entry
            for reason in self.explain_miss(manifest):
                log.info("cache miss: %s: %s", manifest.kind, reason)
            tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
            remove(tmp)
            tmp.mkdir()
            try:
                build(tmp)
                (tmp / MANIFEST).write_text(json.dumps(
                    {"kind": manifest.kind, "key": manifest.key, "inputs": manifest.inputs,
                     "created": time.time()}, indent=2, sort_keys=True))
                remove(entry)
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
