"""One artifact identity for the CLI and the pytest fixtures: every artifact is built through the cache.

`Artifacts` builds each artifact once per set of inputs into WORKDIR/cache (the fixtures use it directly).
The CLI steps use it too, then publish the entry in WORKDIR (`osbuilder rootfs` -> WORKDIR/rootfs,
`image` -> WORKDIR/container.img, ...): a copy of the rootfs tree, hard links to the image, initrd and
kernel files (the same bytes, so a boot record of the fixtures' image is a boot record of WORKDIR's).
`Workdir.published(artifact)` remembers which entry WORKDIR's artifact is, with its content record, so:

- a step whose inputs did not change says "up to date" and does nothing (`-f`/`--force` rebuilds);
- the fixtures publish what they built the same way (`osbuilder_rootfs`, `osbuilder_image`,
  `osbuilder_initrd`; not the kernel: a kernel in WORKDIR is what BOOT_KERNEL=auto boots), so after
  `pytest -m build` and the boot gates, WORKDIR/container.img is the image they built and booted;
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

from filelock import FileLock

from osbuilder import image as image_step
from osbuilder import initrd as initrd_step
from osbuilder import layout, userns
from osbuilder.cache import (
    RECORD_FORMAT,
    Cache,
    Copied,
    Manifest,
    check_tree,
    describe_path,
    describe_tree,
    path_matches,
    tree_record,
)
from osbuilder.fs import discard, temp_beside, write_atomically
from osbuilder.fs import publish as publish_path
from osbuilder.kernel import build as kernel_step
from osbuilder.layout import Workdir
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
        entry = self._get("rootfs", m, lambda tmp: Copied.under(layout.ROOTFS, rootfs_step.build_rootfs(
            settings, tmp / layout.ROOTFS, rebuild=self.rebuild, session=self.session)))
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


def published_entries(wd: Workdir) -> dict[tuple[str, str], list[str]]:
    """(kind, key) of each cache entry WORKDIR's published records name -> the artifacts it is published as
    (whether or not WORKDIR's copy was edited since: the record still names the entry)."""
    found: dict[tuple[str, str], list[str]] = {}
    for artifact in PUBLISHED_AS:
        record = _record(wd, artifact)
        if record is not None and isinstance(record.get("kind"), str) and isinstance(record.get("key"), str):
            found.setdefault((record["kind"], record["key"]), []).append(artifact)
    return found


def unpublish(wd: Workdir, artifact: str) -> None:
    """Forget which cache entry WORKDIR's `artifact` is (`cache verify --remove` removed that entry as corrupt,
    and WORKDIR's hard links are the same bytes): its step then builds and publishes it again instead of
    saying "up to date"."""
    record = wd.published(artifact)
    with FileLock(str(record) + ".lock"):
        record.unlink(missing_ok=True)


def published_files(wd: Workdir) -> list[Path]:
    """The files WORKDIR publishes as hard links to a cache entry's (everything but the rootfs tree)."""
    return [path for artifact, paths in PUBLISHED_AS.items() if artifact != "rootfs" for path in paths(wd).values()]


def _current(wd: Workdir, artifact: str, paths: dict[str, Path], key: str | None = None) -> dict[str, Any] | None:
    """WORKDIR's published record of `artifact` when `paths` (name -> path) are still what it published
    (and it is the entry `key`, when given)."""
    record = _record(wd, artifact)
    if record is None or (key is not None and record.get("key") != key):
        return None
    contents = record.get("contents")
    if record.get("record") != RECORD_FORMAT or not isinstance(contents, dict) or set(contents) != set(paths):
        return None
    for name, path in paths.items():
        want = contents[name]
        if isinstance(want, dict):  # a tree
            if not path.is_dir() or path.is_symlink() or check_tree(path, want)[0] is not None:
                return None
        elif not isinstance(want, str) or not path_matches(path, want):
            return None
    return record


def _remember(wd: Workdir, artifact: str, manifest: Manifest, paths: dict[str, Path],
              copied_from: Path | None = None) -> None:
    """Record what WORKDIR's `artifact` is; `copied_from`: the cache entry its tree was copied from, whose
    record vouches for the files whose size and mtime are unchanged (a tree; else single files)."""
    contents: dict[str, Any] = {name: describe_tree(p, tree_record(copied_from, name)) if copied_from else
                                describe_path(p) for name, p in paths.items()}
    write_atomically(wd.published(artifact), json.dumps({"key": manifest.key, "kind": manifest.kind,
                                                         "inputs": manifest.inputs, "record": RECORD_FORMAT,
                                                         "contents": contents},
                                                        indent=1, sort_keys=True) + "\n")


def _link_or_copy(source: Path, dest: Path) -> None:
    """`dest` becomes `source`'s bytes: a hard link (same filesystem), else a copy; atomically."""
    tmp = temp_beside(dest)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            run(["cp", "--reflink=auto", "--sparse=always", "--", str(source), str(tmp)], step="publish")
        publish_path(tmp, dest)
    finally:
        discard(tmp)


PUBLISHED_AS = {  # artifact -> what of a cache entry WORKDIR holds, and where
    "rootfs": lambda wd: {layout.ROOTFS: wd.rootfs},
    "image": lambda wd: {layout.IMAGE: wd.image},
    "initrd": lambda wd: {layout.INITRD: wd.initrd},
    "kernel": lambda wd: {path.name: path for path in wd.kernel.all()},
}


def publish(settings: Settings, name: str, artifact: Artifact) -> Published:
    """Make WORKDIR's `name` (rootfs, image, initrd, kernel) the cache entry `artifact`, unless it is already:
    the rootfs tree is copied (WORKDIR/rootfs may be edited), the files are hard-linked (the same bytes)."""
    wd = Workdir.of(settings)
    paths = PUBLISHED_AS[name](wd)
    wd.published(name).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(wd.published(name)) + ".lock"):  # another process (an xdist worker) may publish it too
        if _current(wd, name, paths, artifact.key):
            return Published(wd.root, artifact.key, False)
        source = artifact.path.parent if name in ("rootfs", "image", "initrd") else artifact.path
        for file, dest in paths.items():
            if name == "rootfs":
                tmp = temp_beside(dest)
                try:
                    userns.copy_tree(source / file, tmp, wd.log("rootfs"))
                    publish_path(tmp, dest)
                finally:
                    discard(tmp)
            else:
                _link_or_copy(source / file, dest)
        _remember(wd, name, artifact.manifest, paths, source if name == "rootfs" else None)
    return Published(wd.root, artifact.key, True)


def build_and_publish(settings: Settings, name: str, manifest: Manifest, build: Callable[[Artifacts], Artifact],
                      force: bool) -> Published:
    """A CLI step: up to date when WORKDIR's `name` is the entry `manifest` names, else built through the
    cache (`force`: built again) and published."""
    wd = Workdir.of(settings)
    if not force and _current(wd, name, PUBLISHED_AS[name](wd), manifest.key):
        return Published(wd.root, manifest.key, False)
    done = publish(settings, name, build(Artifacts.of(settings, rebuild=force)))
    return Published(done.path, done.key, True)


def publish_rootfs(settings: Settings, force: bool = False) -> Published:
    """`osbuilder rootfs`: the cached rootfs for these settings, as WORKDIR/rootfs."""
    return build_and_publish(settings, "rootfs", rootfs_step.manifest(settings),
                             lambda artifacts: artifacts.rootfs(settings), force)


def workdir_rootfs(settings: Settings) -> Artifact:
    """WORKDIR/rootfs as an artifact: the cache entry `osbuilder rootfs` published while it is unchanged,
    else a rootfs of its own (edited, or made some other way), keyed by its content."""
    wd = Workdir.of(settings)
    record = _current(wd, "rootfs", PUBLISHED_AS["rootfs"](wd))
    if record is not None:
        return Artifact(wd.rootfs, Manifest(record["kind"], record["inputs"]))
    digest = hashlib.sha256(json.dumps(describe_tree(wd.rootfs), sort_keys=True).encode()).hexdigest()
    return Artifact(wd.rootfs, Manifest("rootfs", {"tree": digest}))


def publish_image(settings: Settings, force: bool = False) -> Published:
    """`osbuilder image`: container.img of WORKDIR/rootfs, through the cache, as WORKDIR/container.img."""
    tree = workdir_rootfs(settings)
    return build_and_publish(settings, "image", image_step.image_manifest(settings, tree.key),
                             lambda artifacts: artifacts.image(settings, tree), force)


def publish_initrd(settings: Settings, force: bool = False) -> Published:
    """`osbuilder initrd`: the initrd of WORKDIR/rootfs (an AGENT_INIT=yes one), as WORKDIR's."""
    tree = workdir_rootfs(settings)
    manifest = initrd_step.initrd_manifest(settings.with_values(AGENT_INIT="yes"), tree.key)
    return build_and_publish(settings, "initrd", manifest, lambda artifacts: artifacts.initrd(settings, tree), force)


def publish_kernel(settings: Settings, force: bool = False) -> Published:
    """`osbuilder kernel`: the kernel outputs for these settings, through the cache, in WORKDIR."""
    return build_and_publish(settings, "kernel", kernel_step.kernel_manifest(settings),
                             lambda artifacts: artifacts.kernel(settings), force)
