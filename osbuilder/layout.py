"""Where everything lives: the one place artifact, log, lock, cache and record names are spelled.

Two roots:

- `Workdir` (WORKDIR, default ./workdir): what belongs to one build: the rootfs, container.img,
  the kernel outputs, the kernel source link and object tree, the artifact cache of the pytest
  fixtures, logs, boot logs and boot records.
- `UserCache` (CACHE_DIR, default $XDG_CACHE_HOME/osbuilder or ~/.cache/osbuilder): what does not
  depend on the WORKDIR and is shared by every one of them: the accelerator verdict (keyed by host
  kernel, QEMU and CPU), Debian's boot kernel and initrd (and the apt lists it comes from), ccache,
  unpacked kernel sources keyed by their origin, and the rootfs base trees (rootfs/base.py). Removing
  it is always safe (`rm -rf`); the next run rebuilds what it needs.

Steps take paths from here; none of them spells `workdir / "..."` itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from osbuilder.arch import Arch
from osbuilder.run import user_cache_root
from osbuilder.settings import Settings

# Artifact names (the old Makefile's, kept so that its users find their files).
ROOTFS = "rootfs"
IMAGE = "container.img"
INITRD = "container-initrd.img"
VMLINUZ = "vmlinuz.container"
VMLINUX = "vmlinux.container"
KERNEL_CONFIG = "config.container"
SYSTEM_MAP = "System.map.container"
KERNEL_METADATA = "kernel-metadata.json"


@dataclass(frozen=True)
class KernelFiles:
    """The outputs of one kernel build, in a directory (WORKDIR, or a fixture's cache entry)."""

    dir: Path

    @property
    def vmlinuz(self) -> Path:
        return self.dir / VMLINUZ

    @property
    def vmlinux(self) -> Path:
        return self.dir / VMLINUX

    @property
    def config(self) -> Path:
        return self.dir / KERNEL_CONFIG

    @property
    def system_map(self) -> Path:
        return self.dir / SYSTEM_MAP

    @property
    def metadata(self) -> Path:
        return self.dir / KERNEL_METADATA

    def all(self) -> tuple[Path, ...]:
        return (self.vmlinuz, self.vmlinux, self.config, self.system_map, self.metadata)


@dataclass(frozen=True)
class Workdir:
    """Paths inside WORKDIR."""

    root: Path

    @classmethod
    def of(cls, settings: Settings) -> Workdir:
        return cls(settings.workdir)

    @property
    def rootfs(self) -> Path:
        return self.root / ROOTFS

    @property
    def image(self) -> Path:
        return self.root / IMAGE

    @property
    def initrd(self) -> Path:
        """The agent-as-init initrd (`osbuilder initrd`)."""
        return self.root / INITRD

    @property
    def kernel(self) -> KernelFiles:
        return KernelFiles(self.root)

    @property
    def linux(self) -> Path:
        """The kernel source tree (`osbuilder kernel-src`)."""
        return self.root / "linux"

    @property
    def kernel_build(self) -> Path:
        """The kernel's out-of-tree object directory, reused between builds."""
        return self.root / "kernel-build"

    def kernel_build_for(self, guest: Arch) -> Path:
        """`kernel_build` for this host's architecture; kernel-build-<arch> for a cross build, so that
        building for one ARCH does not throw the other's objects away."""
        return self.kernel_build if guest.native else self.root / f"kernel-build-{guest.name}"

    @property
    def bisect(self) -> Path:
        """`kconfig bisect`: its saved state, the configs it tested, the kernel it built last."""
        return self.root / "bisect"

    @property
    def bisect_state(self) -> Path:
        return self.bisect / "state.json"

    def bisect_config(self, sha256: str) -> Path:
        """A normalised config a bisection tested (or will), by content hash."""
        return self.bisect / "configs" / f"{sha256[:16]}.config"

    @property
    def bisect_kernel(self) -> KernelFiles:
        return KernelFiles(self.bisect / "kernel")

    @property
    def kconfig_scratch(self) -> Path:
        """The object tree `make olddefconfig` normalises configs in (`kconfig diff`, `kconfig bisect`)."""
        return self.bisect / "kconfig-scratch"

    @property
    def bisect_run_build(self) -> Path:
        """`bisect-run`'s object tree: a git checkout's commits, one after another."""
        return self.root / "bisect-run-build"

    @property
    def bisect_run_kernel(self) -> KernelFiles:
        return KernelFiles(self.root / "bisect-run")

    @property
    def cache(self) -> Path:
        """The content-addressed artifact cache of the pytest fixtures."""
        return self.root / "cache"

    def published(self, artifact: str) -> Path:
        """Which cache entry WORKDIR's `artifact` (rootfs, image, initrd, kernel) is, and its content record
        (artifacts.py): what tells "up to date" from "edited" or "rebuilt"."""
        return self.root / "published" / f"{artifact}.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, step: str) -> Path:
        """The log file of one step (`rootfs`, `image`, `kernel`, ...): every command and its output."""
        return self.logs / f"{step}.log"

    @property
    def boot_logs(self) -> Path:
        return self.root / "boot-logs"

    def boot_log(self, name: str) -> Path:
        """The log directory of one boot (console.log, qmp.jsonl, boot.json, ...)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:100] or "boot"
        return (self.boot_logs / safe).absolute()

    @property
    def boot_records(self) -> Path:
        return self.root / "boot-records"

    def boot_record(self, sha256: str) -> Path:
        """Proof that the artifact with this content passed a boot check."""
        return self.boot_records / f"{sha256}.json"


def default_user_cache(env: os._Environ[str] | dict[str, str] | None = None) -> Path:
    return user_cache_root(env)


@dataclass(frozen=True)
class UserCache:
    """Paths inside the per-user cache (CACHE_DIR)."""

    root: Path

    @classmethod
    def of(cls, settings: Settings) -> UserCache:
        return cls(settings.cache_dir or default_user_cache())

    @property
    def artifacts(self) -> Path:
        """Content-addressed artifacts that do not depend on a WORKDIR (Debian's boot kernel, the rootfs base
        trees)."""
        return self.root / "artifacts"

    @property
    def accel_verdict(self) -> Path:
        """Whether KVM really runs a guest on this host (accel.py)."""
        return self.root / "accel-probe.json"

    @property
    def ccache(self) -> Path:
        return self.root / "ccache"

    @property
    def archive_dates(self) -> Path:
        """The last `Date:` seen in each mirror's Release file (rootfs/inputs.py), for offline runs."""
        return self.root / "archive-dates.json"

    @property
    def kernel_sources(self) -> Path:
        """Unpacked kernel sources, one directory per origin."""
        return self.root / "kernel-src"

    @property
    def container_verdict(self) -> Path:
        """Which run options let the container engine run osbuilder's steps (container/engine.py)."""
        return self.root / "container-probe.json"

    @property
    def tools_image_lock(self) -> Path:
        """Held while the USE_DOCKER tools image is built, so parallel runs build it once."""
        return self.root / "tools-image.lock"

    @property
    def apt_archives(self) -> Path:
        """The Debian packages the tools image's build downloaded, kept for its next build."""
        return self.root / "apt-archives"

    @property
    def apt_states(self) -> Path:
        """Where the private apt states are (`apt`)."""
        return self.root / "apt"

    def apt(self, name: str) -> Path:
        """A private apt state (apt.py: configuration, lists, caches) for one suite of one mirror."""
        return self.apt_states / name

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, step: str) -> Path:
        return self.logs / f"{step}.log"
