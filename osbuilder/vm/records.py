"""Boot records: proof that an artifact passed a boot check, for the install commands to require.

After a passing boot check, `write_records` stores a record (`Workdir.boot_record(sha256)`) for the
image file and for the kernel file it booted with: {artifact, sha256, passed, kernel, timings,
when, ...}. `passing_record(workdir, path)` hashes a file and returns its passing record, or None;
the install commands refuse an artifact without one. Hashes are remembered per (path, size,
mtime) within a process, so checking the same image twice reads it once.

`workdir` is the WORKDIR (a Path) or its `Workdir`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from osbuilder import fs
from osbuilder.layout import Workdir

_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """fs.sha256_file, remembered for this process while the file's size and mtime stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = fs.sha256_file(path)
    return _HASHES[key]


def _layout(workdir: Path | Workdir) -> Workdir:
    return workdir if isinstance(workdir, Workdir) else Workdir(workdir)


def make_record(artifact: Path, digest: str, role: str, passed: bool, kernel: dict[str, Any],
                timings: dict[str, float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "artifact": str(artifact.resolve()),
        "role": role,  # "image" or "kernel"
        "sha256": digest,
        "passed": passed,
        "kernel": kernel,
        "timings": timings,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def write_record(workdir: Path | Workdir, record: dict[str, Any]) -> Path:
    """Atomically write one record (a failing record never replaces a passing one)."""
    dest = _layout(workdir).boot_record(record["sha256"])
    if not record["passed"] and _read(dest, record["sha256"]) is not None:
        return dest
    return fs.write_atomically(dest, json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_records(workdir: Path | Workdir, image: Path, kernel_file: Path, *, passed: bool,
                  kernel: dict[str, Any], timings: dict[str, float],
                  extra: dict[str, Any] | None = None) -> list[Path]:
    """Records for the image and for the kernel file it booted with."""
    out = []
    for role, path in (("image", image), ("kernel", kernel_file)):
        rec = make_record(path, sha256_file(path), role, passed, kernel, timings, extra)
        out.append(write_record(workdir, rec))
    return out


def _read(path: Path, digest: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("sha256") != digest or rec.get("passed") is not True:
        return None
    return rec


def passing_record(workdir: Path | Workdir, artifact_path: Path) -> dict[str, Any] | None:
    """The passing boot record of this file's exact content, or None."""
    if not artifact_path.is_file():
        return None
    digest = sha256_file(artifact_path)
    return _read(_layout(workdir).boot_record(digest), digest)
