"""Debian's cloud kernel and an initrd that loads the virtio and NVDIMM drivers, for boot checks only.

Debian's linux-image-cloud-amd64 builds virtio_pci, virtio_blk, virtio_console, virtio_net, vsock,
the NVDIMM stack (nfit, libnvdimm, nd_pmem) and ext4 as modules, and our images carry no
/lib/modules. So the initrd must load them: it is regenerated (in a throw-away mmdebstrap chroot)
with those modules listed in /etc/initramfs-tools/modules. Modules loaded in the initramfs stay
loaded after switch_root, so the guest gets its disk or NVDIMM, agent port and network. The result
(vmlinuz + initrd.img) does not depend on the WORKDIR: it lives in the per-user cache
(`UserCache.artifacts`, keyed by the release, mirror and package list), is built once for every
WORKDIR, and is NEVER installed into the image.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from osbuilder.cache import Cache, Manifest
from osbuilder.errors import InfrastructureError, OsbuilderError
from osbuilder.fs import discard, file_hash
from osbuilder.layout import UserCache
from osbuilder.rootfs.debian import Debian, mirror_access
from osbuilder.run import run, tool_version
from osbuilder.settings import Settings
from osbuilder.urls import without_credentials
from osbuilder.vm.options import BootKernel

PACKAGE = "linux-image-cloud-amd64"
PACKAGES = (PACKAGE, "initramfs-tools", "zstd")
# Loaded by the initrd; each is added only when the kernel has it as a module. `button` and
# `evdev` deliver the ACPI power button to systemd-logind, so `system_powerdown` works. The NVDIMM
# boot needs `nfit` (the ACPI NFIT: QEMU's NVDIMM becomes a region), `libnvdimm` (with the pfn
# support that reads the DAX header) and `nd_pmem` (/dev/pmem0); `nd_btt` and `dax_pmem` are the
# namespace's other personalities.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng", "vsock",
                  "vmw_vsock_virtio_transport", "virtio_pmem", "nfit", "libnvdimm", "nd_pmem", "nd_btt",
                  "dax_pmem", "ext4", "button", "evdev")
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
VERSION_NAME = "version.txt"

# Runs as an mmdebstrap customize hook: $1 is the chroot.
HOOK = """set -e
for m in {modules}; do
  if chroot "$1" find /lib/modules -name "$m.ko*" | grep -q .; then
    echo "$m" >> "$1/etc/initramfs-tools/modules"
  fi
done
chroot "$1" update-initramfs -u -k all
chroot "$1" dpkg-query -W -f '${{Version}}' {package} > "$1/boot/osbuilder-kernel-version"
""".format(modules=" ".join(INITRD_MODULES), package=PACKAGE)


def mirror(settings: Settings) -> str:
    return settings.repo_url or Debian.default_mirror


def manifest(settings: Settings) -> Manifest:
    """Every input of the Debian kernel artifact (the mirror without its credentials: they do not change
    what it serves, and the manifest is stored)."""
    return Manifest("debian-kernel", {
        "release": settings.os_version,
        "mirror": without_credentials(mirror(settings)),
        "packages": " ".join(PACKAGES),
        "hook": HOOK,
        "code": file_hash(Path(__file__)),
        "mmdebstrap": tool_version("mmdebstrap"),
    })


def build(settings: Settings, out: Path, *, logfile: Path | None = None) -> None:
    """Fill `out` with vmlinuz, initrd.img and version.txt taken from a temporary chroot."""
    Debian().check_release(settings.os_version)
    logfile = logfile or UserCache.of(settings).log("debian-kernel")
    chroot = out / "chroot"
    cmd = ["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=directory",
           "--include=" + ",".join(PACKAGES),
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           f"--customize-hook={HOOK}"]
    try:
        with mirror_access([mirror(settings)], out / "apt-auth.conf") as ([url], hooks):
            run([*cmd, *hooks, "--", settings.os_version, str(chroot), url], step="debian-kernel",
                logfile=logfile, verbose=settings.debug)
        extract(chroot / "boot", out)
    except OsbuilderError as e:
        if "Failed to fetch" in e.detail or "Could not resolve" in e.detail:
            raise InfrastructureError("debian-kernel: the Debian mirror is unreachable", e.detail) from None
        raise
    finally:
        discard(chroot)


def extract(boot: Path, out: Path) -> None:
    """Copy the one vmlinuz-* and its initrd.img-* out of the chroot's /boot."""
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise OsbuilderError(f"debian-kernel: expected one kernel in {boot}, found {len(kernels)}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = boot / f"initrd.img-{release}"
    if not initrd.is_file():
        raise OsbuilderError(f"debian-kernel: {initrd.name} was not generated")
    shutil.copyfile(kernels[0], out / KERNEL_NAME)
    shutil.copyfile(initrd, out / INITRD_NAME)
    if (boot / f"config-{release}").is_file():
        shutil.copyfile(boot / f"config-{release}", out / "config")
    version = (boot / "osbuilder-kernel-version").read_text().strip()
    (out / VERSION_NAME).write_text(f"{release} {PACKAGE} {version}\n")
    for name in (KERNEL_NAME, INITRD_NAME, VERSION_NAME):
        os.chmod(out / name, 0o644)


def debian_kernel(settings: Settings, cache: Cache | None = None, rebuild: bool = False) -> BootKernel:
    """The Debian kernel + initrd from the per-user cache, built on first use."""
    cache = cache or Cache(UserCache.of(settings).artifacts, setting="CACHE_DIR")
    entry = cache.get_or_build(manifest(settings), lambda tmp: build(settings, tmp), rebuild).absolute()
    version = (entry / VERSION_NAME).read_text().strip()
    return BootKernel(entry / KERNEL_NAME, entry / INITRD_NAME, "debian", version)
