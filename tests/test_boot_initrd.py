"""The initrd osbuilder makes for Debian's kernel: which modules, in which order, how they are stored, and
its init. (Booting it is boot_tests' job: test_good_path, test_nvdimm and test_broken_images with
BOOT_KERNEL=debian.)"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from osbuilder.readback import read_newc
from osbuilder.vm import boot_initrd
from osbuilder.vm.boot_initrd import ModuleIndex

ROOT = Path(__file__).resolve().parent.parent

# The shape of a real modules.dep (depmod of Debian's 6.1 cloud kernel), trimmed.
MODULES_DEP = """\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/nvdimm/nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_btt.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/libnvdimm.ko:
kernel/drivers/acpi/nfit/nfit.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/input/evdev.ko:
kernel/drivers/something/not-wanted.ko: kernel/drivers/virtio/virtio.ko
"""
BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n"


def modules_dir(tmp_path: Path, suffix: str = ".ko") -> Path:
    """A modules directory with MODULES_DEP (its files' suffix replaced) and a file for each module
    whose content names it."""
    d = tmp_path / "lib/modules/6.1.0-9-cloud-amd64"
    dep = MODULES_DEP.replace("\\\n", "").replace(".ko", suffix)
    for line in dep.splitlines():
        path = d / line.partition(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(compress(f"module {path.name}".encode(), suffix))
    (d / "modules.dep").write_text(dep)
    (d / "modules.builtin").write_text(BUILTIN)
    return d


def compress(data: bytes, suffix: str) -> bytes:
    if suffix.endswith(".xz"):
        return lzma.compress(data)
    if suffix.endswith(".gz"):
        return gzip.compress(data)
    if suffix.endswith(".zst"):
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    return data


def test_each_module_comes_after_what_it_depends_on(tmp_path: Path) -> None:
    index = ModuleIndex.read(modules_dir(tmp_path))
    order = index.load_order(("virtio_pci", "virtio_blk", "virtio_net", "ext4", "nd_pmem", "nfit", "evdev",
                              "no_such_module"))
    assert order == ["virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
                     "virtio_blk", "failover", "net_failover", "virtio_net", "libnvdimm", "nd_btt", "nd_pmem",
                     "nfit", "evdev"]
    for name in order:  # every dependency is loaded before the module that needs it
        assert all(order.index(dep) < order.index(name) for dep in index.depends[name])
    assert "ext4" in index.builtin and "not_wanted" in index.paths  # built in: nothing to load; not asked for


def test_module_names_are_the_kernels() -> None:
    assert boot_initrd.module_name("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz") == \
        "vmw_vsock_virtio_transport"
    assert boot_initrd.module_name("kernel/crypto/crc32c-intel.ko.zst") == "crc32c_intel"
    with pytest.raises(Exception, match="is not a kernel module"):
        boot_initrd.module_name("kernel/modules.order")


@pytest.mark.parametrize("suffix", [".ko", ".ko.xz", ".ko.zst", ".ko.gz"])
def test_compressed_modules_are_stored_decompressed(tmp_path: Path, suffix: str) -> None:
    """A release that compresses its modules (trixie: .ko.xz) gets plain .ko files in the initrd: the
    init loads them with finit_module whether or not the kernel could decompress them itself."""
    index = ModuleIndex.read(modules_dir(tmp_path, suffix))
    order = index.load_order(("virtio_blk",))
    init = tmp_path / "init"
    init.write_bytes(b"\x7fELF init")
    entries = {e.name: e for e in boot_initrd.initrd_entries(init, index, order)}
    assert entries["lib/modules/1-virtio.ko"].data == f"module virtio{suffix}".encode()
    assert entries["lib/modules/3-virtio_blk.ko"].data == f"module virtio_blk{suffix}".encode()
    assert [n for n in entries if n.startswith("lib/modules/")] == [
        "lib/modules/1-virtio.ko", "lib/modules/2-virtio_ring.ko", "lib/modules/3-virtio_blk.ko"]


def test_the_initrd_holds_the_init_the_console_and_the_modules_in_load_order(tmp_path: Path) -> None:
    """A real initrd: the init compiled from boot_init.c (static: no interpreter in the initramfs), the
    console device for its first lines, mount points, the modules numbered so that name order is load
    order; read back as the kernel reads it."""
    dest = tmp_path / "initrd.img"
    init_binary = boot_initrd.build_init(tmp_path / "scratch/init")
    order = boot_initrd.make_initrd(dest, modules_dir(tmp_path, ".ko.xz"), init_binary)
    assert order[:2] == ["virtio", "virtio_ring"] and "nd_pmem" in order and "not_wanted" not in order
    data = dest.read_bytes()
    assert len(data) % 512 == 0
    entries = {e.name: e for e in read_newc(data)}
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (os.major(console.rdev), os.minor(console.rdev)) == (5, 1)
    for name in ("dev", "proc", "root", "lib/modules"):
        assert stat.S_ISDIR(entries[name].mode)
    modules = sorted(n for n in entries if n.startswith("lib/modules/") and n.endswith(".ko"))
    assert [n.split("-", 1)[1].removesuffix(".ko") for n in modules] == order
    init = entries["init"]
    assert stat.S_IMODE(init.mode) == 0o755 and init.data.startswith(b"\x7fELF")
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())
    (tmp_path / "init.bin").write_bytes(init.data)
    headers = subprocess.run(["readelf", "-l", str(tmp_path / "init.bin")], capture_output=True, text=True,
                             check=True).stdout
    assert "INTERP" not in headers  # static
    again = tmp_path / "again.img"
    boot_initrd.make_initrd(again, modules_dir(tmp_path, ".ko.xz"), init_binary)
    assert again.read_bytes() == data  # the same inputs, the same bytes


def test_boot_init_source_is_clang_formatted() -> None:
    clang_format = shutil.which("clang-format")
    assert clang_format, "clang-format is not installed: run .ci/install-deps (or apt-get install clang-format)"
    out = subprocess.run([clang_format, "--style=file", "--dry-run", "--Werror", str(boot_initrd.INIT_SOURCE)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_the_console_watcher_knows_the_inits_failures() -> None:
    """Every line boot_init.c prints when it stops the boot is a fatal console line with its cause; its
    progress lines are not."""
    from osbuilder.vm.console import match_fatal

    source = boot_initrd.INIT_SOURCE.read_text()
    examples = {
        "root device %s did not appear": ("osbuilder-init: error: root device /dev/vdz1 did not appear within 5s "
                                          "(root=, rootdelay=)", "root filesystem not found"),
        "no init to run": ("osbuilder-init: error: no init to run: the root filesystem doesn't have requested "
                           "/sbin/init (No such file or directory)", "no init to run"),
        "cannot mount root device": ("osbuilder-init: error: cannot mount root device /dev/vda1 as ext4 "
                                     "(rootflags=dax): Invalid argument", "the initrd cannot mount the root"),
        "cannot run %s": ("osbuilder-init: error: cannot run /sbin/init: Exec format error", "no init to run"),
        "cannot mount %s on %s": ("osbuilder-init: error: cannot mount proc on /proc: No such device",
                                  "the initrd's init failed"),
    }
    for text, (line, reason) in examples.items():
        assert text in source
        pattern = match_fatal(line)
        assert pattern is not None and pattern.reason.startswith(reason), (line, pattern)
    for harmless in ("osbuilder-init: loaded 23 of 23 modules in 0.41s",
                     "osbuilder-init: warning: cannot load module 19-nd_btt.ko: No such device",
                     "osbuilder-init: mounted /dev/vda1 (ext4, ro,data=ordered) on /root",
                     "osbuilder-init: running /sbin/init"):
        assert match_fatal(harmless) is None, harmless
