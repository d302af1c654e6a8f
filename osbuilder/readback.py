"""Reading artifacts back without mounting or unpacking them: for tests (osbuilder's and yours) and for
looking at what was built.

    from osbuilder.readback import read_file, stat_path
    assert stat_path(image.path, "/usr/bin/curl") is not None

The image is read with e2fsprogs (`sfdisk -J`, `dumpe2fs`, `debugfs`) at the filesystem's offset, the
initrd with `zstd -dc` and a newc reader, a cache entry through its content record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from osbuilder.cache import Cache, Manifest, inspect_entry
from osbuilder.image import ImageLayout, read_dax_header
from osbuilder.initrd import TRAILER, Entry, newc_headers
from osbuilder.run import run


def read_layout(image: Path) -> ImageLayout:
    """Read the partition table back (sfdisk -J) and the filesystem's block size (dumpe2fs)."""
    table = json.loads(run(["sfdisk", "-J", str(image)], step="image", capture=True).stdout)["partitiontable"]
    part = table["partitions"][0]
    sector = table.get("sectorsize", 512)
    offset = part["start"] * sector
    header = run(["dumpe2fs", "-h", f"{image}?offset={offset}"], step="image", capture=True).stdout.decode()
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    dax = read_dax_header(image)
    return ImageLayout(image.stat().st_size, offset, part["size"] * sector, int(fields["Block size"].strip()),
                       dax.dataoff if dax else 0)


def read_file(image: Path, path: str) -> bytes:
    """A file's content from inside the image, read with debugfs (no mount)."""
    return _debugfs(image, f"cat {path}")


@dataclass(frozen=True)
class PathInfo:
    """What debugfs says about a path inside the image."""

    kind: str  # regular, directory, symlink, ...
    mode: int
    uid: int
    gid: int
    link: str | None


def stat_path(image: Path, path: str) -> PathInfo | None:
    """Type, mode, owner and symlink target of `path` inside the image; None if it does not exist."""
    text = _debugfs(image, f"stat {path}").decode(errors="replace")
    m = re.search(r"Type:\s+(\S+)\s+Mode:\s+(\d+)", text)
    if not m:
        return None
    uid = re.search(r"User:\s+(\d+)", text)
    gid = re.search(r"Group:\s+(\d+)", text)
    link = re.search(r'Fast link dest: "(.*)"', text)
    return PathInfo(m.group(1), int(m.group(2), 8), int(uid.group(1)) if uid else -1,
                    int(gid.group(1)) if gid else -1, link.group(1) if link else None)


def _debugfs(image: Path, request: str) -> bytes:
    layout = read_layout(image)
    return run(["debugfs", "-R", request, layout.fs_spec(image)], step="image", capture=True).stdout


def read_newc(data: bytes) -> list[Entry]:
    """The entries of a newc archive (concatenated archives too, as the kernel reads them), trailers left out."""
    out: list[Entry] = []
    for h in newc_headers(data):
        name = h.name.decode(errors="surrogateescape")
        if name != TRAILER:
            mode, uid, gid, mtime, filesize = h.fields[1], h.fields[2], h.fields[3], h.fields[5], h.fields[6]
            out.append(Entry(name, mode, uid, gid, mtime, data[h.data_at:h.data_at + filesize],
                             os.makedev(h.fields[9], h.fields[10])))
    return out


def list_initrd(path: Path) -> list[Entry]:
    """The entries of a built initrd (decompressed with zstd)."""
    raw = run(["zstd", "-dc", str(path)], step="initrd", capture=True).stdout
    return read_newc(raw)


def cache_entry(cache: Cache, manifest: Manifest) -> Path | None:
    """The cache's entry for `manifest` when it is there and intact (no lock taken, nothing changed)."""
    entry = cache.entry(manifest)
    record, problem = inspect_entry(entry, manifest)
    return entry if record is not None and problem is None else None
