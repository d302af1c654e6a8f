"""Kernel source: from Debian's linux-source package, a tarball, a git tree or a git URL.

KERNEL_SOURCE resolves to an `Origin`: what it names and its cheap identity (the sha256 of a
tarball's content, the HEAD commit of a git tree, the commit a git URL's ref points at now, asked
with `git ls-remote`, so a branch that moved is fetched again). The identity keys
both the kernel's cache entry (`build.kernel_manifest` never unpacks or clones anything) and the
unpacked tree, which lives in the per-user cache (`UserCache.kernel_sources / <identity hash>`),
so every WORKDIR with the same source shares one tree: it is unpacked (or cloned) once, into a
temporary directory beside its place, under a file lock, and renamed into place when complete.
WORKDIR/linux is a symlink to it (`osbuilder kernel-src`). A marker file inside the tree records
the identity, the kernel version, a timestamp for reproducible builds and a content hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, link_atomically, publish, remove, sha256_file, temp_beside
from osbuilder.layout import UserCache, Workdir
from osbuilder.run import run
from osbuilder.settings import Settings

MARKER = ".osbuilder-source.json"
DEBIAN_SOURCE_DIR = Path("/usr/src")
DEBIAN_PACKAGE = "linux-source-6.1"
_URL = re.compile(r"^(https?|git|ssh|file)://|^[\w.-]+@[\w.-]+:")
_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_UNREACHABLE = re.compile(r"Could not resolve|unable to access|Connection (refused|timed out|reset)|"
                          r"timed out|Network is unreachable|Could not read from remote", re.IGNORECASE)


@dataclass(frozen=True)
class SourceSpec:
    """What KERNEL_SOURCE names: kind is 'tarball', 'git-tree' or 'git-url'."""

    kind: str
    location: str
    ref: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location, "ref": self.ref}


@dataclass(frozen=True)
class Origin:
    """A source and its identity, known without unpacking or cloning it.

    `epoch` is the build timestamp the source implies when the identity does not determine it (a
    tarball's mtime: two copies of one tarball share a tree but may differ in mtime); for git it is
    None, the commit time, read from the tree once it is there.
    """

    spec: SourceSpec
    identity: dict[str, Any]
    epoch: int | None = None

    @property
    def key(self) -> str:
        """The name of the unpacked tree in the per-user cache."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SourceTree:
    """An unpacked tree: `path` is WORKDIR/linux (a link to the shared tree in the per-user cache),
    `marker` what the tree's marker records, with `spec` and `epoch` of the current KERNEL_SOURCE,
    `fresh` whether this call unpacked (or cloned) it."""

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


def resolve(settings: Settings) -> SourceSpec:
    raw = (settings.kernel_source or "debian").strip()
    if raw == "debian":
        return SourceSpec("tarball", str(debian_tarball()))
    if _URL.match(raw):
        url, _, ref = raw.partition("#")
        if ref.startswith("-") or re.search(r"[\s\x00-\x1f\x7f~^:?*\[\\]", ref):
            raise UsageError(f"KERNEL_SOURCE: {ref!r} is not a branch, tag or commit name")
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


def origin(settings: Settings, *, logfile: Path | None = None) -> Origin:
    """KERNEL_SOURCE and its identity: hashes a tarball or reads a git tree's HEAD; never unpacks."""
    spec = resolve(settings)
    if spec.kind == "tarball":
        st = Path(spec.location).stat()
        digest = _tarball_sha256(spec.location, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        return Origin(spec, {"kind": "tarball", "sha256": digest}, int(st.st_mtime))
    if spec.kind == "git-tree":
        logfile = logfile or Workdir.of(settings).log("kernel-src")
        return Origin(spec, {"kind": "git-tree", "commit": _git_head(Path(spec.location), logfile)})
    logfile = logfile or Workdir.of(settings).log("kernel-src")
    commit = remote_commit(spec, logfile)
    return Origin(spec, {"kind": "git-url", "url": spec.location, "ref": spec.ref, "commit": commit})


def remote_commit(spec: SourceSpec, logfile: Path) -> str:
    """The commit a git URL's ref (default: HEAD) points at now: `git ls-remote`, no clone."""
    if _COMMIT.match(spec.ref):
        return spec.ref
    ref = spec.ref or "HEAD"
    try:
        out = run(["git", "ls-remote", "--", spec.location, ref, ref + "^{}"], step="kernel-src", logfile=logfile,
                  capture=True, timeout=120, env={"GIT_TERMINAL_PROMPT": "0"})
    except OsbuilderError as e:
        cls = InfrastructureError if _UNREACHABLE.search(e.detail) else UsageError
        raise cls(f"KERNEL_SOURCE: cannot ask {spec.location} for {ref} (git ls-remote failed)", e.detail) from None
    refs: dict[str, str] = {}
    for line in out.stdout.decode().splitlines():
        commit, _, name = line.partition("\t")
        refs[name] = commit
    for name in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"):
        if name in refs:
            return refs[name]
    raise UsageError(f"KERNEL_SOURCE: {spec.location} has no branch or tag {ref!r}")


@functools.lru_cache(maxsize=8)
def _tarball_sha256(path: str, size: int, mtime_ns: int, inode: int, device: int) -> str:
    """Hashed once per process and file version (~0.5 s for Debian's 130 MiB tarball)."""
    return sha256_file(Path(path))


def read_marker(tree: Path) -> dict[str, Any] | None:
    try:
        return json.loads((tree / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_source(settings: Settings, *, logfile: Path | None = None) -> SourceTree:
    """WORKDIR/linux for KERNEL_SOURCE: a link to the shared tree, unpacked first if no WORKDIR had it."""
    workdir = Workdir.of(settings)
    logfile = logfile or workdir.log("kernel-src")
    link = workdir.linux
    link.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(link) + ".lock"):
        where = origin(settings, logfile=logfile)
        tree, marker, fresh = _shared_tree(settings, where, logfile)
        if not (link.is_symlink() and os.readlink(link) == str(tree)):
            if link.is_dir() and not link.is_symlink():
                remove(link)  # a tree unpacked into WORKDIR by an older osbuilder
            link_atomically(str(tree), link)
    current = {"spec": where.spec.as_dict(), **({"epoch": where.epoch} if where.epoch is not None else {})}
    return SourceTree(link, {**marker, **current}, fresh)


def _shared_tree(settings: Settings, where: Origin, logfile: Path) -> tuple[Path, dict[str, Any], bool]:
    """The tree for `where` in the per-user cache: (path, marker, whether it was unpacked now)."""
    dest = UserCache.of(settings).kernel_sources / where.key
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        marker = read_marker(dest)
        if marker and marker.get("identity") == where.identity:
            return dest, marker, False
        tmp = temp_beside(dest)
        tmp.mkdir()
        try:
            tree = fetch(settings, where.spec, tmp, logfile, commit=where.identity.get("commit", ""))
            marker = describe(where, tree, logfile)
            (tree / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            publish(tree, dest)
        finally:
            discard(tmp)
    return dest, marker, True


def fetch(settings: Settings, spec: SourceSpec, tmp: Path, logfile: Path, commit: str = "") -> Path:
    """Unpack or clone into `tmp`; return the top of the source tree inside it. A git URL's tree
    is checked out at `commit` (what its identity says the ref pointed at)."""
    if spec.kind == "tarball":
        return _unpack(settings, Path(spec.location), tmp, logfile)
    tree = tmp / "linux"
    if spec.kind == "git-tree":
        cmd: list[str | Path] = ["git", "clone", "--quiet", "--local", "--no-hardlinks", "--", spec.location, tree]
    elif _COMMIT.match(spec.ref):  # a commit, not a branch or tag: fetched by its name
        cmd = ["git", "init", "--quiet", tree]
    else:
        cmd = ["git", "clone", "--quiet", "--depth", "1", *(["--branch", spec.ref] if spec.ref else []),
               "--", spec.location, tree]
    try:
        run(cmd, step="kernel-src", logfile=logfile, verbose=settings.debug)
        if commit and _git_head(tree, logfile, required=False) != commit:  # the ref moved since ls-remote
            _checkout_commit(settings, spec, tree, commit, logfile)
    except OsbuilderError as e:
        raise UsageError(f"KERNEL_SOURCE: cannot clone {spec.location}", e.detail) from None
    _check_tree(spec, tree)
    return tree


def _checkout_commit(settings: Settings, spec: SourceSpec, tree: Path, commit: str, logfile: Path) -> None:
    for args in (["fetch", "--quiet", "--depth", "1", "--", spec.location, commit],
                 ["checkout", "--quiet", "--detach", "FETCH_HEAD"]):
        run(["git", "-C", tree, *args], step="kernel-src", logfile=logfile, verbose=settings.debug)


def _unpack(settings: Settings, tarball: Path, tmp: Path, logfile: Path) -> Path:
    try:
        run(["tar", "-xf", tarball, "-C", tmp], step="kernel-src", logfile=logfile, verbose=settings.debug)
    except OsbuilderError as e:
        raise UsageError(f"KERNEL_SOURCE: {tarball} is corrupt or truncated (tar failed)", e.detail) from None
    entries = list(tmp.iterdir())
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


def describe(where: Origin, tree: Path, logfile: Path) -> dict[str, Any]:
    """The marker: identity, kernel version, a reproducible timestamp, and a content hash."""
    out = run(["make", "-s", "-C", tree, "kernelversion"], step="kernel-src", logfile=logfile, capture=True)
    version = out.stdout.decode().strip().splitlines()[-1]
    if where.spec.kind == "tarball":
        epoch = where.epoch
        digest = where.identity["sha256"]
    else:
        epoch = int(_git(tree, logfile, "log", "-1", "--format=%ct"))
        digest = _git_head(tree, logfile)
    return {"identity": where.identity, "version": version, "epoch": epoch, "content": digest,
            "spec": where.spec.as_dict()}


def _git(tree: Path, logfile: Path, *args: str) -> str:
    out = run(["git", "-C", tree, *args], step="kernel-src", logfile=logfile, capture=True)
    return out.stdout.decode().strip()


def _git_head(tree: Path, logfile: Path, required: bool = True) -> str:
    try:
        return _git(tree, logfile, "rev-parse", "--verify", "--quiet", "HEAD")
    except OsbuilderError as e:
        if not required:  # a repository without commits yet
            return ""
        raise UsageError(f"KERNEL_SOURCE: {tree}: cannot read the git commit", e.detail) from None


def worktree(path: Path, logfile: Path) -> SourceTree:
    """A user's git checkout of Linux, built in place (`bisect-run`): whatever commit is checked out.
    Its content marker is its location, not its commit, so one object tree serves every commit."""
    path = path.resolve()
    spec = SourceSpec("git-tree", str(path))
    if not (path / ".git").exists():
        raise UsageError(f"--source-tree: {path} is not a git tree (run bisect-run from a kernel checkout)")
    _check_tree(spec, path)
    if (path / ".config").exists() or (path / "include" / "config").is_dir():
        raise UsageError(f"--source-tree: {path} holds an in-tree build (a .config); run `make mrproper` there "
                         "first (osbuilder builds out of tree)")
    out = run(["make", "-s", "-C", path, "kernelversion"], step="kernel-src", logfile=logfile, capture=True)
    version = out.stdout.decode().strip().splitlines()[-1]
    commit = _git_head(path, logfile)
    epoch = int(_git(path, logfile, "log", "-1", "--format=%ct"))
    marker = {"identity": {"kind": "git-tree", "commit": commit}, "version": version, "epoch": epoch,
              "content": f"worktree:{path}", "spec": spec.as_dict()}
    return SourceTree(path, marker, False)
