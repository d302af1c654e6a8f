"""Kernel source into WORKDIR/linux: from Debian's linux-source package, a tarball, a git tree or URL.

The tree is unpacked (or cloned) into a temporary directory beside WORKDIR/linux and renamed into
place only when complete. A marker file inside records which source it came from (path, size and
mtime of a tarball; the commit of a git tree), the kernel version and a timestamp for reproducible
builds; when the marker matches the current KERNEL_SOURCE, getting the source again is a no-op.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from osbuilder.cache import publish, sha256_file, temp_beside
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.run import run
from osbuilder.settings import Settings

MARKER = ".osbuilder-source.json"
DEBIAN_SOURCE_DIR = Path("/usr/src")
DEBIAN_PACKAGE = "linux-source-6.1"
_URL = re.compile(r"^(https?|git|ssh|file)://|^[\w.-]+@[\w.-]+:")


@dataclass(frozen=True)
class SourceSpec:
    """What KERNEL_SOURCE names: kind is 'tarball', 'git-tree' or 'git-url'."""

    kind: str
    location: str
    ref: str = ""


@dataclass(frozen=True)
class SourceTree:
    """An unpacked tree and its marker (identity, version, epoch)."""

    path: Path
    marker: dict[str, Any]
    fresh: bool

    @property
    def version(self) -> str:
        return self.marker["version"]

    @property
    def epoch(self) -> int:
        return int(self.marker["epoch"])

    @property
    def identity(self) -> dict[str, Any]:
        return self.marker["identity"]


def source_dir(settings: Settings) -> Path:
    return settings.workdir / "linux"


def resolve(settings: Settings) -> SourceSpec:
    raw = (settings.kernel_source or "debian").strip()
    if raw == "debian":
        return SourceSpec("tarball", str(debian_tarball()))
    if _URL.match(raw):
        url, _, ref = raw.partition("#")
        return SourceSpec("git-url", url, ref)
    path = Path(raw).expanduser()
    if path.is_dir():
        if (path / ".git").exists():
            return SourceSpec("git-tree", str(path.resolve()))
        raise UsageError(f"KERNEL_SOURCE: {raw} is a directory but not a git tree",
                         "give a tarball, a git tree, a git URL, or `debian`")
    if path.is_file():
        return SourceSpec("tarball", str(path.resolve()))
    raise UsageError(f"KERNEL_SOURCE: {raw}: no such file or directory")


def debian_tarball() -> Path:
    found = sorted(DEBIAN_SOURCE_DIR.glob("linux-source-*.tar.*"), key=_version_key)
    if not found:
        raise UsageError(
            f"KERNEL_SOURCE: debian: no {DEBIAN_SOURCE_DIR}/linux-source-*.tar.xz; run "
            f"`apt-get install {DEBIAN_PACKAGE}` or `osbuilder check-deps --install`")
    return found[-1]


def _version_key(path: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path.name)]


def identity(spec: SourceSpec, logfile: Path) -> dict[str, Any]:
    """Cheap facts that change when the source changes."""
    if spec.kind == "tarball":
        st = Path(spec.location).stat()
        return {"kind": "tarball", "path": spec.location, "size": st.st_size, "mtime": int(st.st_mtime)}
    if spec.kind == "git-tree":
        return {"kind": "git-tree", "path": spec.location, "commit": _git_head(Path(spec.location), logfile)}
    return {"kind": "git-url", "url": spec.location, "ref": spec.ref}


def read_marker(tree: Path) -> dict[str, Any] | None:
    try:
        return json.loads((tree / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_source(settings: Settings, *, logfile: Path | None = None) -> SourceTree:
    """WORKDIR/linux for KERNEL_SOURCE: reuse it when its marker matches, else fetch it anew."""
    dest = source_dir(settings)
    logfile = logfile or settings.workdir / "logs" / "kernel-src.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        spec = resolve(settings)
        ident = identity(spec, logfile)
        marker = read_marker(dest)
        if marker and marker.get("identity") == ident:
            return SourceTree(dest, marker, fresh=False)
        tmp = temp_beside(dest)
        tmp.mkdir()
        try:
            tree = fetch(settings, spec, tmp, logfile)
            marker = describe(settings, spec, ident, tree, logfile)
            (tree / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            publish(tree, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SourceTree(dest, marker, fresh=True)


def fetch(settings: Settings, spec: SourceSpec, tmp: Path, logfile: Path) -> Path:
    """Unpack or clone into `tmp`; return the top of the source tree inside it."""
    if spec.kind == "tarball":
        return _unpack(settings, Path(spec.location), tmp, logfile)
    tree = tmp / "linux"
    if spec.kind == "git-tree":
        cmd = ["git", "clone", "--quiet", "--local", "--no-hardlinks", spec.location, tree]
    else:
        cmd = ["git", "clone", "--quiet", "--depth", "1", *(["--branch", spec.ref] if spec.ref else []),
               spec.location, tree]
    try:
        run(cmd, step="kernel-src", logfile=logfile, verbose=settings.debug)
    except OsbuilderError as e:
        raise UsageError(f"KERNEL_SOURCE: cannot clone {spec.location}", e.detail) from None
    _check_tree(spec, tree)
    return tree


def _unpack(settings: Settings, tarball: Path, tmp: Path, logfile: Path) -> Path:
    try:
        run(["tar", "-xf", tarball, "-C", tmp], step="kernel-src", logfile=logfile, verbose=settings.debug)
    except OsbuilderError as e:
        raise UsageError(f"KERNEL_SOURCE: {tarball} is corrupt or truncated (tar failed)", e.detail) from None
    entries = [p for p in tmp.iterdir()]
    tree = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
    if tree == tmp:  # a tarball without a top directory: move its contents one level down
        tree = tmp / "linux"
        tree.mkdir()
        for p in entries:
            p.rename(tree / p.name)
    _check_tree(SourceSpec("tarball", str(tarball)), tree)
    return tree


def _check_tree(spec: SourceSpec, tree: Path) -> None:
    needed = ("Makefile", "Kconfig", "scripts/kconfig/merge_config.sh")
    missing = [n for n in needed if not (tree / n).is_file()]
    if missing:
        raise UsageError(f"KERNEL_SOURCE: {spec.location} is not a Linux source tree (no {missing[0]})")


def describe(settings: Settings, spec: SourceSpec, ident: dict[str, Any], tree: Path,
             logfile: Path) -> dict[str, Any]:
    """The marker: identity, kernel version, a reproducible timestamp, and a content hash."""
    out = run(["make", "-s", "-C", tree, "kernelversion"], step="kernel-src", logfile=logfile, capture=True)
    version = out.stdout.decode().strip().splitlines()[-1]
    if spec.kind == "tarball":
        epoch = int(Path(spec.location).stat().st_mtime)
        digest = sha256_file(Path(spec.location))
    else:
        epoch = int(_git(tree, logfile, "log", "-1", "--format=%ct"))
        digest = _git_head(tree, logfile)
    return {"identity": ident, "version": version, "epoch": epoch, "content": digest,
            "spec": {"kind": spec.kind, "location": spec.location, "ref": spec.ref}}


def _git(tree: Path, logfile: Path, *args: str) -> str:
    out = run(["git", "-C", tree, *args], step="kernel-src", logfile=logfile, capture=True)
    return out.stdout.decode().strip()


def _git_head(tree: Path, logfile: Path) -> str:
    try:
        return _git(tree, logfile, "rev-parse", "HEAD")
    except OsbuilderError as e:
        raise UsageError(f"KERNEL_SOURCE: {tree}: cannot read the git commit", e.detail) from None


