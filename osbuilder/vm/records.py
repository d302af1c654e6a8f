"""Boot records: proof that an artifact passed a boot check, for the install commands to require.

After a passing boot check, `write_records` stores a record (`Workdir.boot_record(sha256)`) for the
image file and for the kernel file it booted with: {artifact, sha256, passed, kernel, timings,
when, ...}. The hash is the one taken before the boot: a guest `pin`s its image and kernel (hashes
them and holds them open) before QEMU starts, and a file replaced or written to between the hash
and the end of the boot gets no record at all. `passing_record(workdir, path)` hashes a file and
returns its passing record, or None; the install commands refuse an artifact without one. Hashes are
remembered per file version (device, inode, size, mtime, ctime) within a process, so checking the
same image twice reads it once.

`workdir` is the WORKDIR (a Path) or its `Workdir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from osbuilder.arch import X86_64
from osbuilder.fs import write_atomically
from osbuilder.layout import Workdir

_HASHES: dict[tuple[int, ...], str] = {}


def _version(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another (a rename or a write changes the ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_fd(fd: int) -> str:
    """sha256 of an open file's content, remembered for this process per file version."""
    key = _version(os.fstat(fd))
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def sha256_file(path: Path) -> str:
    """sha256 of a file's content, remembered for this process per file version."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


class Pinned:
    """A file hashed before use and held open, so that what happened to it since can be told:
    `replaced()` (its path names another file now, or it was written to) and `changed()` (the
    hashed file itself was written to, wherever its name went)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.stat = os.fstat(self.fd)
            self.digest = _hash_fd(self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def replaced(self) -> str | None:
        try:
            now = os.stat(self.path)
        except OSError:
            return f"{self.path} was removed"
        if (now.st_dev, now.st_ino) != (self.stat.st_dev, self.stat.st_ino):
            return f"{self.path} was replaced"
        return self.changed()

    def changed(self) -> str | None:
        if self.fd < 0:
            raise ValueError(f"{self.path}: pin already closed")
        now = os.fstat(self.fd)
        if (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            return f"{self.path} was written to"
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pin(*paths: Path) -> list[Pinned]:
    """Hash and hold open each file (all or none: a failure closes those already pinned)."""
    pinned: list[Pinned] = []
    try:
        for path in paths:
            pinned.append(Pinned(path))
    except BaseException:
        for p in pinned:
            p.close()
        raise
    return pinned


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
    """Atomically write one record (a failing record never replaces a passing one). A passing record
    keeps the attachments earlier passing checks of the same content proved (`passes`): a pass as an
    NVDIMM does not erase a pass as a disk, and the reverse."""
    dest = _layout(workdir).boot_record(record["sha256"])
    earlier = _read(dest, record["sha256"])
    if not record["passed"] and earlier is not None:
        return dest
    if earlier is not None and isinstance(earlier.get("passes"), dict):
        record = {**record, "passes": merge_passes(earlier["passes"], record.get("passes", {}))}
    return write_atomically(dest, json.dumps(record, indent=2, sort_keys=True) + "\n")


def merge_passes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """attachment -> {"profile": name, "with": [digests of what it booted with]}, both records' entries."""
    merged = {k: dict(v) for k, v in old.items() if isinstance(v, dict)}
    for attach, entry in new.items():
        with_ = sorted({*merged.get(attach, {}).get("with", []), *entry.get("with", [])})
        merged[attach] = {**entry, "with": with_}
    return merged


def passed_attachments(record: dict[str, Any] | None) -> dict[str, Any]:
    """The attachments (virtio-blk, nvdimm, initrd) a passing record proves, each with what it booted with
    and the protocol its agent was proven over."""
    passes = record.get("passes") if record else None
    return passes if isinstance(passes, dict) else {}


def write_records(workdir: Path | Workdir, image: Path, kernel_file: Path, *, passed: bool,
                  kernel: dict[str, Any], timings: dict[str, float],
                  extra: dict[str, Any] | None = None, digests: tuple[str, str] | None = None) -> list[Path]:
    """Records for the image and for the kernel file it booted with: `digests` (image, kernel) are
    their hashes taken before the boot (default: hash them now)."""
    digests = digests or (sha256_file(image), sha256_file(kernel_file))
    extra = dict(extra or {})
    attachment, profile = extra.get("attachment"), extra.get("profile")
    protocol = (extra.get("agent") or {}).get("protocol")
    arch = extra.get("arch", X86_64.name)
    out = []
    for role, path, digest, other in (("image", image, digests[0], digests[1]),
                                      ("kernel", kernel_file, digests[1], digests[0])):
        passes = {attachment: {"profile": profile, "with": [other], "agent_protocol": protocol, "arch": arch}} \
            if passed and attachment else {}
        rec = make_record(path, digest, role, passed, kernel, timings, {**extra, "passes": passes})
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


def passing_record_of(workdir: Path | Workdir, digest: str) -> dict[str, Any] | None:
    """The passing boot record of content with this sha256, or None."""
    return _read(_layout(workdir).boot_record(digest), digest)


def passing_record(workdir: Path | Workdir, artifact_path: Path) -> dict[str, Any] | None:
    """The passing boot record of this file's exact content, or None."""
    if not artifact_path.is_file():
        return None
    digest = sha256_file(artifact_path)
    return _read(_layout(workdir).boot_record(digest), digest)
