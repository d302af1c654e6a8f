"""The small initrd with which Debian's cloud kernel boots images that carry no /lib/modules (boot checks only).

Debian's cloud kernel builds virtio, vsock, the NVDIMM stack and more as modules. This initrd holds
the few the boot needs (INITRD_MODULES, those this kernel has as modules, each after what it depends
on as modules.dep says) and a tiny static init (boot_init.c) that loads them, waits for the root
device, mounts it as the kernel command line says and switches to it. Modules loaded in the
initramfs stay loaded after the switch, so the guest keeps its disk or NVDIMM, agent port, network
and power button.

The archive is an uncompressed newc cpio (a few MiB: the kernel unpacks it without a decompressor,
quickest under TCG):

    /init                      boot_init.c, compiled static (agent/build.py's compile_static)
    /dev/console               so that the init's first line already reaches the console
    /dev /proc /root           mount points
    /lib/modules/NNN-name.ko   the modules, numbered in load order, decompressed (.ko.xz, .ko.zst and
                               .ko.gz of releases that compress them: the kernel may lack the
                               in-kernel decompressor, the host has them all)

Every entry is owned by root and dated 0: the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from osbuilder.agent.build import compile_static
from osbuilder.errors import OsbuilderError
from osbuilder.initrd import Entry, write_newc
from osbuilder.run import run

log = logging.getLogger("osbuilder")

INIT_SOURCE = Path(__file__).resolve().with_name("boot_init.c")
# Loaded by the initrd; each only when the kernel has it as a module. `button` and `evdev` deliver the
# ACPI power button to systemd-logind, so `system_powerdown` works. The NVDIMM boot needs `nfit` (the
# ACPI NFIT: QEMU's NVDIMM becomes a region), `libnvdimm` (with the pfn support that reads the DAX
# header) and `nd_pmem` (/dev/pmem0); `nd_btt` and `dax_pmem` are the namespace's other personalities.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng", "vsock",
                  "vmw_vsock_virtio_transport", "virtio_pmem", "nfit", "libnvdimm", "nd_pmem", "nd_btt",
                  "dax_pmem", "ext4", "button", "evdev")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
CONSOLE = os.makedev(5, 1)


def module_name(path: str) -> str:
    """The kernel's name of a module file: its base name without the suffix, '-' read as '_'."""
    base = path.rpartition("/")[2]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    raise OsbuilderError(f"debian-kernel: {path} is not a kernel module")


@dataclass(frozen=True)
class ModuleIndex:
    """What depmod says of one kernel's modules (`lib/modules/<release>`)."""

    dir: Path
    paths: dict[str, str]  # module name -> its file, relative to `dir`
    depends: dict[str, list[str]]  # module name -> the names it needs, in modules.dep's order
    builtin: frozenset[str]

    @classmethod
    def read(cls, modules_dir: Path) -> ModuleIndex:
        paths: dict[str, str] = {}
        depends: dict[str, list[str]] = {}
        try:
            dep_text = (modules_dir / "modules.dep").read_text()
        except OSError as e:
            raise OsbuilderError(f"debian-kernel: cannot read {modules_dir}/modules.dep: {e.strerror}") from None
        for line in dep_text.splitlines():
            path, sep, needs = line.partition(":")
            if not sep:
                continue
            name = module_name(path)
            paths[name] = path
            depends[name] = [module_name(p) for p in needs.split()]
        builtin_file = modules_dir / "modules.builtin"
        builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
        return cls(modules_dir, paths, depends, frozenset(module_name(p) for p in builtin))

    def load_order(self, wanted: tuple[str, ...]) -> list[str]:
        """The modules of `wanted` this kernel has as modules, each after the modules it depends on
        (modules.dep lists them so that loading the last first works, as modprobe does)."""
        order: list[str] = []

        def add(name: str) -> None:
            if name in order:
                return
            for dep in reversed(self.depends.get(name, [])):
                add(dep)
            order.append(name)

        for name in wanted:
            if name in self.paths:
                add(name)
            elif name not in self.builtin:
                log.info("debian-kernel: %s is neither a module nor built into this kernel; not loaded", name)
        return order


def module_bytes(path: Path) -> bytes:
    """A module file's content, decompressed."""
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        return run(["zstd", "-dcq", str(path)], step="debian-kernel", capture=True).stdout
    return path.read_bytes()


def build_init(out: Path, *, logfile: Path | None = None, cc: list[str] | None = None) -> Path:
    """The initrd's /init, compiled static from boot_init.c (with `cc`: the guest architecture's compiler)."""
    return compile_static(INIT_SOURCE, out, step="debian-kernel", logfile=logfile, cc=cc)


def initrd_entries(init: Path, index: ModuleIndex, order: list[str]) -> list[Entry]:
    """The archive's entries: mount points, the console, the modules in load order, /init."""
    def directory(name: str) -> Entry:
        return Entry(name, stat.S_IFDIR | 0o755, 0, 0, 0, b"")

    entries = [directory("dev"), Entry("dev/console", stat.S_IFCHR | 0o600, 0, 0, 0, b"", CONSOLE),
               directory("proc"), directory("root"), directory("lib"), directory("lib/modules")]
    width = len(str(len(order)))
    for number, name in enumerate(order, 1):
        data = module_bytes(index.dir / index.paths[name])
        entries.append(Entry(f"lib/modules/{number:0{width}d}-{name}.ko", stat.S_IFREG | 0o644, 0, 0, 0, data))
    entries.append(Entry("init", stat.S_IFREG | 0o755, 0, 0, 0, init.read_bytes()))
    return entries


def make_initrd(dest: Path, modules_dir: Path, init: Path) -> list[str]:
    """Write the initrd for the kernel whose modules (with depmod's modules.dep) are in `modules_dir`,
    with `init` (build_init's) as /init. Returns the modules it loads, in order."""
    index = ModuleIndex.read(modules_dir)
    order = index.load_order(INITRD_MODULES)
    write_newc(dest, initrd_entries(init, index, order))
    return order
