"""Debian's cloud kernel and a small initrd that loads its virtio and NVDIMM drivers, for boot checks only.

The kernel is taken from its package, without a chroot and without root: apt, with a private
configuration in the per-user cache (apt.py), fetches the linux-image-*-cloud-<arch> package that
OS_VERSION's metapackage linux-image-cloud-<arch> (ARCH's, arch.py) depends on, verified against the
archive keyring;
`dpkg-deb -x` unpacks it and depmod writes its modules.dep. vmlinuz is used as it is; the initrd is
osbuilder's own (boot_initrd.py: the modules the boot needs and a tiny static init), because our
images carry no /lib/modules. The result (vmlinuz, initrd.img, config, version.txt) does not depend
on the WORKDIR: it lives in the per-user cache (`UserCache.artifacts`, keyed by the release, the
mirror, the package and this code), is built once for every WORKDIR, and is NEVER installed into
the image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from osbuilder.agent.build import compiler_for
from osbuilder.apt import PrivateApt, first_dependency
from osbuilder.cache import Cache, Manifest
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, file_hash
from osbuilder.layout import UserCache
from osbuilder.rootfs.debian import Debian, classify_failure
from osbuilder.rootfs.distro import Suite
from osbuilder.run import run, tool_version
from osbuilder.settings import Settings
from osbuilder.urls import without_credentials
from osbuilder.vm import boot_initrd
from osbuilder.vm.options import BootKernel

log = logging.getLogger("osbuilder")

STEP = "debian-kernel"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
CONFIG_NAME = "config"
VERSION_NAME = "version.txt"


def mirror(settings: Settings) -> str:
    return settings.repo_url or Debian.default_mirror


def apt_state(settings: Settings) -> PrivateApt:
    """The private apt of this release of this mirror, in the per-user cache."""
    bare = without_credentials(mirror(settings))
    debian_arch = settings.guest.debian
    name = f"{settings.os_version}-{debian_arch}-{hashlib.sha256(bare.encode()).hexdigest()[:12]}"
    return PrivateApt(UserCache.of(settings).apt(name), debian_arch)


def package(settings: Settings) -> str:
    """The metapackage of ARCH's cloud kernel: it depends on the release's current one."""
    return settings.guest.debian_kernel


def manifest(settings: Settings) -> Manifest:
    """Every input of the Debian kernel artifact (the mirror without its credentials: they do not change
    what it serves, and the manifest is stored)."""
    return Manifest("debian-kernel", {
        "release": settings.os_version,
        "mirror": without_credentials(mirror(settings)),
        "package": package(settings),
        "modules": " ".join(boot_initrd.INITRD_MODULES),
        "code": file_hash(Path(__file__), Path(boot_initrd.__file__), boot_initrd.INIT_SOURCE),
        "cc": tool_version(compiler_for(settings.guest)[0]),
    })


def build(settings: Settings, out: Path, *, logfile: Path | None = None) -> None:
    """Fill `out` with vmlinuz, initrd.img, config and version.txt from the kernel package."""
    Debian().check_release(settings.os_version)
    logfile = logfile or UserCache.of(settings).log(STEP)
    work = out / "work"
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=1) as compiler:  # the init compiles while apt downloads
            init = compiler.submit(boot_initrd.build_init, work / "init", logfile=logfile,
                                   cc=compiler_for(settings.guest))
            version, deb = fetch(settings, work / "download", logfile)
            tree = work / "tree"
            run(["dpkg-deb", "-x", str(deb), str(tree)], step=STEP, logfile=logfile)
            deb.unlink()
            vmlinuz, modules_dir = locate(tree)
            release = modules_dir.name
            run(["depmod", "-b", str(tree), release], step=STEP, logfile=logfile)
            loaded = boot_initrd.make_initrd(out / INITRD_NAME, modules_dir, init.result())
        shutil.copyfile(vmlinuz, out / KERNEL_NAME)
        config = tree / "boot" / f"config-{release}"
        if config.is_file():
            shutil.copyfile(config, out / CONFIG_NAME)
        (out / VERSION_NAME).write_text(f"{release} {package(settings)} {version}\n")
        for name in (KERNEL_NAME, INITRD_NAME, VERSION_NAME):
            os.chmod(out / name, 0o644)
    except OsbuilderError as e:
        if "No space left on device" not in e.detail:
            raise
        raise InfrastructureError(f"CACHE_DIR: no space left on device in {UserCache.of(settings).root} while "
                                  "making Debian's boot kernel (nothing was kept)", e.detail) from None
    finally:
        discard(work)
    log.info("%s: %s %s with an initrd loading %s (%.1fs)", STEP, package(settings), version, " ".join(loaded),
             time.monotonic() - started)


def fetch(settings: Settings, dest: Path, logfile: Path) -> tuple[str, Path]:
    """(the metapackage's version, the kernel package it depends on), downloaded into `dest` by apt."""
    url, release, wanted = mirror(settings), settings.os_version, package(settings)
    apt = apt_state(settings)
    log.info("%s: fetching %s of %s from %s", STEP, wanted, release, without_credentials(url))
    try:
        with apt.lock():
            apt.configure(url, release, Debian.keyring)
            with apt.access(url):
                apt.update(step=STEP, logfile=logfile, verbose=settings.debug)
                fields = apt.show(wanted, step=STEP, logfile=logfile)
                if "Depends" not in fields:
                    raise UsageError(f"REPO_URL: {without_credentials(url)} has no {wanted} in {release} "
                                     "(Debian's boot kernel)")
                deb = apt.download(first_dependency(fields["Depends"]), dest, step=STEP, logfile=logfile,
                                   verbose=settings.debug)
    except UsageError:
        raise
    except OsbuilderError as e:
        raise classify_failure(e, [Suite(without_credentials(url), release)], [], []) from None
    return fields.get("Version", "?"), deb


def locate(tree: Path) -> tuple[Path, Path]:
    """(vmlinuz, the modules directory) of an unpacked kernel package. A release that keeps its modules
    in /usr/lib/modules gets a /lib link, which is where depmod looks."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise OsbuilderError(f"{STEP}: expected one kernel in the package's /boot, found {len(kernels)}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    if not (tree / "lib").exists() and (tree / "usr/lib/modules").is_dir():
        (tree / "lib").symlink_to("usr/lib")
    modules_dir = tree / "lib/modules" / release
    if not modules_dir.is_dir():
        raise OsbuilderError(f"{STEP}: the package has no modules for {release}")
    return kernels[0], modules_dir


def debian_kernel(settings: Settings, cache: Cache | None = None, rebuild: bool = False) -> BootKernel:
    """The Debian kernel + initrd from the per-user cache, built on first use."""
    cache = cache or Cache(UserCache.of(settings).artifacts, setting="CACHE_DIR")
    entry = cache.get_or_build(manifest(settings), lambda tmp: build(settings, tmp), rebuild).absolute()
    version = (entry / VERSION_NAME).read_text().strip()
    return BootKernel(entry / KERNEL_NAME, entry / INITRD_NAME, "debian", version, dax=has_fs_dax(entry / CONFIG_NAME))


def has_fs_dax(config: Path) -> bool:
    """The kernel of this .config mounts file systems with DAX (amd64's cloud kernel does, arm64's not)."""
    try:
        return "CONFIG_FS_DAX=y" in config.read_text().splitlines()
    except OSError:
        return True  # no config to tell: let the mount say
