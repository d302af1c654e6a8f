"""One artifact identity for the CLI and the pytest fixtures: every artifact is built through the cache.

`Artifacts` builds each artifact once per set of inputs into WORKDIR/cache (the fixtures use it directly).
The CLI steps use it too, then publish the entry in WORKDIR (`osbuilder rootfs` -> WORKDIR/rootfs,
`image` -> WORKDIR/container.img, ...): a copy of the rootfs tree, hard links to the image, initrd and
kernel files (the same bytes, so a boot record of the fixtures' image is a boot record of WORKDIR's).
`Workdir.published(artifact)` remembers which entry WORKDIR's artifact is, with its content record, so:

- a step whose inputs did not change says "up to date" and does nothing (`-f`/`--force` rebuilds);
- `image` and `initrd` take WORKDIR/rootfs as it is: unchanged since `rootfs` published it, it is that
  cache entry (and the image is the one the fixtures made of it); edited, it is a rootfs of its own,
  keyed by its content.
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
from typing import Any

from osbuilder import image as image_step
from osbuilder import initrd as initrd_step
from osbuilder import layout, userns
from osbuilder.cache import Cache, Manifest, check_tree, describe_path, describe_tree, path_matches
from osbuilder.fs import discard, publish, temp_beside, write_atomically
from osbuilder.kernel import build as kernel_step
from osbuilder.layout import KernelFiles, Workdir
from osbuilder.rootfs import build as rootfs_step
from osbuilder.run import run
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")


@dataclass(frozen=True)
class Artifact:
    """A built artifact: its path, and the manifest (inputs and key) it was built from."""

    path: Path
    manifest: Manifest

    @property
    def key(self) -> str:
        return self.manifest.key


class Artifacts:
    """Builds each artifact once per set of inputs, through the cache: behind the fixtures and the CLI steps.

    `rebuild` (--osbuilder-rebuild, -f) builds each artifact again once per `session`: the run's id, which
    pytest-xdist's workers share, so an entry another worker of this run built (and may be using) is a
    hit, never rebuilt or deleted."""

    def __init__(self, cache: Cache, rebuild: bool = False, session: str | None = None) -> None:
        self.cache = cache
        self.rebuild = rebuild
        self.session = session

    @classmethod
    def of(cls, settings: Settings, rebuild: bool = False) -> Artifacts:
        return cls(Cache(Workdir.of(settings).cache), rebuild, os.urandom(8).hex())

    def _get(self, what: str, manifest: Manifest, build: Callable[[Path], object]) -> Path:
        started = time.monotonic()
        entry = self.cache.get_or_build(manifest, build, self.rebuild, session=self.session)
        log.info("osbuilder %s ready in %.1fs", what, time.monotonic() - started)
        return entry

    def rootfs(self, settings: Settings) -> Artifact:
        """The rootfs directory for these settings."""
        m = rootfs_step.manifest(settings)
        entry = self._get("rootfs", m, lambda tmp: rootfs_step.build_rootfs(settings, tmp / layout.ROOTFS))
        return Artifact(entry / layout.ROOTFS, m)

    def image(self, settings: Settings, rootfs: Artifact | None = None) -> Artifact:
        """container.img made from `rootfs` (default: `rootfs(settings)`)."""
        tree = rootfs or self.rootfs(settings)
        m = image_step.image_manifest(settings, tree.key)
        entry = self._get("image", m, lambda tmp: image_step.build_image(settings, tree.path, tmp / layout.IMAGE))
        return Artifact(entry / layout.IMAGE, m)

    def initrd(self, settings: Settings, rootfs: Artifact | None = None) -> Artifact:
        """container-initrd.img made from `rootfs` (default: `rootfs(settings)` with AGENT_INIT=yes, the
        only kind of rootfs an initrd can boot)."""
        settings = settings.with_values(AGENT_INIT="yes")
        tree = rootfs or self.rootfs(settings)
        m = initrd_step.initrd_manifest(settings, tree.key)
        entry = self._get("initrd", m,
                          lambda tmp: initrd_step.build_initrd(settings, tree.path, tmp / layout.INITRD))
        return Artifact(entry / layout.INITRD, m)

    def kernel(self, settings: Settings, config: Path | None = None) -> Artifact:
        """A directory with the kernel outputs (layout.KernelFiles) for these settings: from osbuilder's
        fragments, or with `config` from that complete .config as it is."""
        m = kernel_step.kernel_manifest(settings, config=config)
        entry = self._get("kernel", m, lambda tmp: kernel_step.build_kernel(settings, tmp, config=config))
        return Artifact(entry, m)


# -- WORKDIR's artifacts: published cache entries ----------------------------------------------------


@dataclass(frozen=True)
class Published:
    """What a CLI step left in WORKDIR: the artifact and whether it was already there."""

    path: Path
    key: str
    fresh: bool  # False: up to date, nothing was done


def _record(wd: Workdir, artifact: str) -> dict[str, Any] | None:
    try:
        record = json.loads(wd.published(artifact).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _current(wd: Workdir, artifact: str, paths: dict[str, Path], key: str | None = None) -> dict[str, Any] | None:
    """WORKDIR's published record of `artifact` when `paths` (name -> path) are still what it published
    (and it is the entry `key`, when given)."""
    record = _record(wd, artifact)
    if record is None or (key is not None and record.get("key") != key):
        return None
    contents = record.get("contents")
    if not isinstance(contents, dict) or set(contents) != set(paths):
        return None
    for name, path in paths.items():
        want = contents[name]
        if isinstance(want, dict):  # a tree
            if not path.is_dir() or path.is_symlink() or check_tree(path, want)[0] is not None:
                return None
        elif not isinstance(want, str) or not path_matches(path, want):
            return None
    return record


def _remember(wd: Workdir, artifact: str, manifest: Manifest, paths: dict[str, Path], tree: bool = False) -> None:
    contents: dict[str, Any] = {name: describe_tree(p) if tree else describe_path(p) for name, p in paths.items()}
    write_atomically(wd.published(artifact), json.dumps({"key": manifest.key, "kind": manifest.kind,
                                                         "inputs": manifest.inputs, "contents": contents},
                                                        indent=1, sort_keys=True) + "\n")


def _link_or_copy(source: Path, dest: Path) -> None:
    """`dest` becomes `source`'s bytes: a hard link (same filesystem), else a copy; atomically."""
    tmp = temp_beside(dest)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            run(["cp", "--reflink=auto", "--sparse=always", "--", str(source), str(tmp)], step="publish")
        publish(tmp, dest)
    finally:
        discard(tmp)


def publish_rootfs(settings: Settings, force: bool = False) -> Published:
    """`osbuilder rootfs`: the cached rootfs for these settings, copied to WORKDIR/rootfs."""
    wd = Workdir.of(settings)
    manifest = rootfs_step.manifest(settings)
    if not force and _current(wd, "rootfs", {"rootfs": wd.rootfs}, manifest.key):
        return Published(wd.rootfs, manifest.key, False)
    built = Artifacts.of(settings, rebuild=force).rootfs(settings)
    tmp = temp_beside(wd.rootfs)
    try:
        copy_tree(built.path, tmp, wd.log("rootfs"))
        publish(tmp, wd.rootfs)
    finally:
        discard(tmp)
    _remember(wd, "rootfs", manifest, {"rootfs": wd.rootfs}, tree=True)
    return Published(wd.rootfs, manifest.key, True)


def copy_tree(source: Path, dest: Path, logfile: Path) -> None:
    """Copy a rootfs tree with its owners, modes and times, where its owners are the real ones (a rootless
    tree's belong to subordinate ids: the copy is made in its namespace, into a directory lent to it)."""
    dest.mkdir(mode=0o700)
    image_step.lend_to_tree_namespace(dest, logfile)
    run(userns.in_tree_namespace(["cp", "-a", "--reflink=auto", "--", f"{source}/.", str(dest)]), step="rootfs",
        logfile=logfile)
    run(userns.in_tree_namespace(["chmod", f"--reference={source}", "--", str(dest)]), step="rootfs", logfile=logfile)
    if not userns.rootless():
        run(["chown", f"--reference={source}", "--", str(dest)], step="rootfs", logfile=logfile)


def workdir_rootfs(settings: Settings) -> Artifact:
    """WORKDIR/rootfs as an artifact: the cache entry `osbuilder rootfs` published while it is unchanged,
    else a rootfs of its own (edited, or made some other way), keyed by its content."""
    wd = Workdir.of(settings)
    record = _current(wd, "rootfs", {"rootfs": wd.rootfs})
    if record is not None:
        return Artifact(wd.rootfs, Manifest(record["kind"], record["inputs"]))
    digest = hashlib.sha256(json.dumps(describe_tree(wd.rootfs), sort_keys=True).encode()).hexdigest()
    return Artifact(wd.rootfs, Manifest("rootfs", {"tree": digest}))


def publish_file(settings: Settings, artifact: str, dest: Path, built: Callable[[Artifacts], Artifact],
                 manifest: Manifest, force: bool) -> Published:
    """Publish a one-file artifact (image, initrd) as `dest`, unless it is the entry already."""
    wd = Workdir.of(settings)
    if not force and _current(wd, artifact, {dest.name: dest}, manifest.key):
        return Published(dest, manifest.key, False)
    entry = built(Artifacts.of(settings, rebuild=force))
    _link_or_copy(entry.path, dest)
    _remember(wd, artifact, manifest, {dest.name: dest})
    return Published(dest, manifest.key, True)


def publish_image(settings: Settings, force: bool = False) -> Published:
    """`osbuilder image`: container.img of WORKDIR/rootfs, through the cache, as WORKDIR/container.img."""
    tree = workdir_rootfs(settings)
    manifest = image_step.image_manifest(settings, tree.key)
    return publish_file(settings, "image", Workdir.of(settings).image,
                        lambda artifacts: artifacts.image(settings, tree), manifest, force)


def publish_initrd(settings: Settings, force: bool = False) -> Published:
    """`osbuilder initrd`: the initrd of WORKDIR/rootfs (an AGENT_INIT=yes one), as WORKDIR's."""
    tree = workdir_rootfs(settings)
    manifest = initrd_step.initrd_manifest(settings.with_values(AGENT_INIT="yes"), tree.key)
    return publish_file(settings, "initrd", Workdir.of(settings).initrd,
                        lambda artifacts: artifacts.initrd(settings, tree), manifest, force)


def publish_kernel(settings: Settings, force: bool = False) -> Published:
    """`osbuilder kernel`: the kernel outputs for these settings, through the cache, in WORKDIR."""
    wd = Workdir.of(settings)
    manifest = kernel_step.kernel_manifest(settings)
    files = {path.name: path for path in wd.kernel.all()}
    if not force and _current(wd, "kernel", files, manifest.key):
        return Published(wd.root, manifest.key, False)
    entry = Artifacts.of(settings, rebuild=force).kernel(settings)
    for name, dest in files.items():
        _link_or_copy(KernelFiles(entry.path).dir / name, dest)
    _remember(wd, "kernel", manifest, files)
    return Published(wd.root, manifest.key, True)
