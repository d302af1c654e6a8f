"""debian_kernel.py: Debian's cloud kernel and the initrd that loads its virtio and NVDIMM modules."""

from __future__ import annotations

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
from osbuilder.vm import boot_initrd, debian_kernel


def test_the_kernel_package_gives_its_one_kernel_and_its_modules(tmp_path: Path) -> None:
    """An unpacked package: its one vmlinuz and modules directory, in /lib/modules (bookworm) or
    /usr/lib/modules (trixie, linked from /lib where depmod looks)."""
    release = "6.1.0-9-cloud-amd64"
    old, new = tmp_path / "bookworm", tmp_path / "trixie"
    for tree, modules in ((old, "lib/modules"), (new, "usr/lib/modules")):
        (tree / "boot").mkdir(parents=True)
        (tree / "boot" / f"vmlinuz-{release}").write_bytes(b"kernel")
        (tree / modules / release / "kernel").mkdir(parents=True)
    for tree in (old, new):
        vmlinuz, modules_dir = debian_kernel.locate(tree)
        assert vmlinuz == tree / "boot" / f"vmlinuz-{release}" and modules_dir.name == release
        assert (modules_dir / "kernel").is_dir() and modules_dir == tree / "lib/modules" / release
    assert (new / "lib").is_symlink() and not (old / "lib").is_symlink()
    (new / "boot/vmlinuz-6.1.0-10-cloud-amd64").write_bytes(b"another")
    with pytest.raises(OsbuilderError, match="expected one kernel in the package's /boot, found 2"):
        debian_kernel.locate(new)


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
        assert module in boot_initrd.INITRD_MODULES

