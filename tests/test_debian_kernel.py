"""debian_kernel.py: Debian's cloud kernel and the initrd that loads its virtio and NVDIMM modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vmstubs import (
    load_settings,
)

from osbuilder import readback
from osbuilder import settings as settings_mod
from osbuilder.cache import Cache
from osbuilder.errors import OsbuilderError
from osbuilder.layout import UserCache
from osbuilder.vm import debian_kernel

FAKE_CHROOT = """#!{python}
import os, sys
root, argv = sys.argv[1], sys.argv[2:]
if argv[0] == "find":
    os.execvp("find", ["find", root + argv[1], *argv[2:]])
with open(os.path.join(root, "calls"), "a") as f:
    f.write(" ".join(argv) + "\\n")
if argv[0] == "dpkg-query":
    print("6.1.99-1", end="")
"""


def test_initrd_hook_lists_the_kernels_virtio_modules(tmp_path: Path) -> None:
    """The hook lists every module the guest needs that this kernel has as a module (and no other),
    regenerates the initrd and notes the package version."""
    root = tmp_path / "chroot"
    (root / "etc/initramfs-tools").mkdir(parents=True)
    (root / "boot").mkdir()
    drivers = root / "lib/modules/6.1.0-9-cloud-amd64/kernel/drivers"
    drivers.mkdir(parents=True)
    built_in = {"virtio_pmem", "nd_pmem"}  # as if compiled into this kernel: no .ko, nothing to load
    for module in set(debian_kernel.INITRD_MODULES) - built_in:
        (drivers / f"{module}.ko.xz").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chroot").write_text(FAKE_CHROOT.format(python=sys.executable))
    (bin_dir / "chroot").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["sh", "-c", debian_kernel.HOOK, "sh", str(root)], env=env, check=True, timeout=60)
    listed = (root / "etc/initramfs-tools/modules").read_text().split()
    assert {"virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "vsock", "ext4", "button"} <= set(listed)
    assert listed == [m for m in debian_kernel.INITRD_MODULES if m not in built_in]
    assert "update-initramfs -u -k all" in (root / "calls").read_text()
    assert (root / "boot/osbuilder-kernel-version").read_text() == "6.1.99-1"


def test_extract_takes_the_one_kernel_and_its_initrd(tmp_path: Path) -> None:
    boot, out = tmp_path / "boot", tmp_path / "out"
    boot.mkdir()
    out.mkdir()
    release = "6.1.0-9-cloud-amd64"
    for name, data in ((f"vmlinuz-{release}", b"kernel"), (f"initrd.img-{release}", b"initrd"),
                       (f"config-{release}", b"CONFIG_X=y\n"), ("osbuilder-kernel-version", b"6.1.27-1\n")):
        (boot / name).write_bytes(data)
    debian_kernel.extract(boot, out)
    assert (out / debian_kernel.KERNEL_NAME).read_bytes() == b"kernel"
    assert (out / debian_kernel.INITRD_NAME).read_bytes() == b"initrd"
    assert (out / debian_kernel.VERSION_NAME).read_text() == f"{release} linux-image-cloud-amd64 6.1.27-1\n"
    (boot / "vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"another")
    with pytest.raises(OsbuilderError, match="expected one kernel .* found 2"):
        debian_kernel.extract(boot, out)


def test_debian_kernel_is_built_once_for_every_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(tmp_path)
    builds: list[Path] = []

    def build(settings: settings_mod.Settings, out: Path, **kw: Any) -> None:
        builds.append(out)
        for name in (debian_kernel.KERNEL_NAME, debian_kernel.INITRD_NAME):
            (out / name).write_bytes(b"x")
        (out / debian_kernel.VERSION_NAME).write_text("6.1.0-9-cloud-amd64 linux-image-cloud-amd64 6.1.27-1\n")

    monkeypatch.setattr(debian_kernel, "build", build)
    first = debian_kernel.debian_kernel(s)
    again = debian_kernel.debian_kernel(s.with_values(WORKDIR=str(tmp_path / "another-workdir")))
    assert len(builds) == 1 and again == first
    assert first.kernel.is_relative_to(UserCache.of(s).artifacts) and not s.workdir.exists()
    assert first.version.startswith("6.1.0-9-cloud-amd64") and first.initrd is not None
    assert readback.cache_entry(Cache(UserCache.of(s).artifacts), debian_kernel.manifest(s)) == first.kernel.parent


def test_debian_initrd_loads_the_nvdimm_stack() -> None:
    for module in ("nfit", "libnvdimm", "nd_pmem"):
        assert module in debian_kernel.INITRD_MODULES

