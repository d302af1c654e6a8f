"""How an artifact reaches the guest: one `Attachment` per way a runtime attaches it, owning every fact.

An attachment knows its QEMU arguments (devices, machine options, memory), what it checks of the file
before a boot, the helper processes it needs while the guest runs (as a context manager entered when
QEMU starts and left when it stops), which artifact it boots (the image, or the initrd), and how the
guest's kernel finds and mounts its root (the root part of the command line and the console line that
shows the root mounted). `qemu.py` asks it for arguments; the phases ask it what to wait for and prove.

- `virtio-blk`: the image as a disk on a throw-away qcow2 overlay; root /dev/vda1.
- `nvdimm`: the image mapped read-only as an NVDIMM, as Kata Containers and Clear Containers attach it
  (its DAX variant, when the image carries Kata's DAX header, mounts the root with `dax`).
- `initrd`: the artifact as the kernel's initramfs, no disk; the agent is init.

BOOT_PROFILE names one of them (or `auto`: the RUNTIME's own, `runtimes.py`). To add an attachment:
subclass `Attachment`, override what differs, `register` an instance; BOOT_PROFILE, `osbuilder help`
and the boot checks pick it up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from osbuilder.errors import UsageError
from osbuilder.vm.qemu import MAX_MEMORY_MIB, VmPaths, make_overlay, qemu_escape

MiB = 1 << 20
# An NVDIMM's memory backend is mapped in memory-hotplug units: the image's size must be a multiple
# (image.py sizes images so).
MEMORY_HOTPLUG_UNIT = 128 * MiB


@dataclass(frozen=True)
class Attachment:
    """The base attachment: nothing attached (QEMU gets only the kernel). Subclasses attach an artifact."""

    name: str
    summary: str  # one line for `osbuilder help`
    root_params: str = ""  # the root part of the kernel command line
    root_milestone: str = "root_mounted"  # the console milestone (console.MILESTONES) that shows the root mounted
    root_awaited: str = ""  # what the root phase waits for, as its timeout message says
    # The console line that shows the root mounted, when console.MILESTONES has no entry for it: the guest
    # records `root_milestone` at the first line matching this regular expression.
    root_pattern: str = ""
    boots_initrd: bool = False  # it boots WORKDIR's initrd (`osbuilder initrd`), not its image
    root_read_only: bool = True  # `exec` checks that / is mounted read-only
    dax: bool = False  # the root is mounted with DAX; `exec` proves it from inside the guest
    own_kernel_only: str = ""  # why only osbuilder's kernel can boot it ("": any kernel can)
    agent_is_init: bool = False  # the artifact can only run the agent as PID 1
    label: str = ""  # its part of a boot profile's name ("nvdimm-dax"); "" for the plain disk
    skipped: Mapping[str, str] = field(default_factory=dict, hash=False)  # phase -> why it does not apply

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", MappingProxyType(dict(self.skipped)))  # a record is a constant

    def variant(self, dax_header: bool) -> Attachment:
        """This attachment for an image with (or without) Kata's DAX header."""
        return self

    def check(self, image: Path, memory_mib: int) -> None:
        """Refuse, with a one-line UsageError, an artifact this attachment cannot boot with `memory_mib` of
        guest RAM (before QEMU starts)."""

    def machine_options(self) -> list[str]:
        """Options appended to `-machine q35`."""
        return []

    def memory(self, memory_mib: int, image: Path | None) -> str:
        """QEMU's `-m`."""
        return str(memory_mib)

    def devices(self, image: Path | None, paths: VmPaths | None) -> list[str]:
        """QEMU arguments that attach `image` (`paths` None: an interactive boot, no run directory)."""
        return []

    def initramfs(self, image: Path | None) -> Path | None:
        """What QEMU loads with -initrd instead of the kernel's own initrd, if anything."""
        return None

    @contextmanager
    def running(self, image: Path | None, paths: VmPaths, logfile: Path) -> Iterator[None]:
        """What must exist while the guest runs (an overlay, a helper process), made before QEMU
        starts and undone after it stopped."""
        yield


@dataclass(frozen=True)
class VirtioBlk(Attachment):
    """The image as a virtio-blk disk on a throw-away qcow2 overlay: the guest never writes the image."""

    def devices(self, image: Path | None, paths: VmPaths | None) -> list[str]:
        if image is None:
            return []
        drive = (f"file={qemu_escape(str(paths.overlay))},format=qcow2" if paths
                 else f"file={qemu_escape(str(image))},format=raw,snapshot=on")
        return ["-drive", f"if=none,id=image,{drive}", "-device", "virtio-blk-pci,drive=image"]

    @contextmanager
    def running(self, image: Path | None, paths: VmPaths, logfile: Path) -> Iterator[None]:
        if image is not None:
            make_overlay(image, paths.overlay, logfile)
        yield  # the overlay goes with the run directory


@dataclass(frozen=True)
class Nvdimm(Attachment):
    """The image as Kata attaches it: a file memory backend, read-only (QEMU opens the file O_RDONLY, so
    the guest can never write it) and private, behind an unarmed NVDIMM (the NFIT tells the guest it is
    read-only). The backend maps the whole file in memory-hotplug units of 128 MiB."""

    def variant(self, dax_header: bool) -> Attachment:
        return NVDIMM_DAX if dax_header else NVDIMM

    def check(self, image: Path, memory_mib: int) -> None:
        if not image.is_file():
            return  # the boot names it
        size = image.stat().st_size
        if size == 0 or size % MEMORY_HOTPLUG_UNIT:
            raise UsageError(f"BOOT_IMAGE: {image} is {size} bytes, not a multiple of {MEMORY_HOTPLUG_UNIT >> 20} MiB, "
                             "so the NVDIMM memory backend cannot map it; make it with `osbuilder image` or boot it "
                             "with BOOT_PROFILE=virtio-blk")
        if memory_mib + (size >> 20) > MAX_MEMORY_MIB:
            raise UsageError(f"VM_MEMORY: {memory_mib} MiB plus the {size >> 20} MiB image mapped as an "
                             f"NVDIMM exceed the {MAX_MEMORY_MIB} MiB QEMU's guest can address")

    def machine_options(self) -> list[str]:
        return ["nvdimm=on"]

    def memory(self, memory_mib: int, image: Path | None) -> str:
        size = image.stat().st_size if image is not None else 0
        return f"{memory_mib}M,slots=1,maxmem={memory_mib + -(-size // MiB)}M"

    def devices(self, image: Path | None, paths: VmPaths | None) -> list[str]:
        if image is None:
            return []
        size = image.stat().st_size
        backend = (f"memory-backend-file,id=mem0,mem-path={qemu_escape(str(image))},size={size},"
                   "readonly=on,share=off")
        return ["-object", backend, "-device", "nvdimm,id=nv0,memdev=mem0,unarmed=on"]


@dataclass(frozen=True)
class Initrd(Attachment):
    """The artifact as the kernel's initramfs (`osbuilder initrd`), as the runtime's `initrd =` boots it:
    no disk and no root=; the kernel unpacks the archive into its tmpfs root and runs /init, the agent."""

    def initramfs(self, image: Path | None) -> Path | None:
        return image


ATTACHMENTS: dict[str, Attachment] = {}


def register(attachment: Attachment) -> Attachment:
    if attachment.name in ATTACHMENTS or attachment.name == "auto":
        raise ValueError(f"attachment {attachment.name!r} is registered twice (or named auto)")
    ATTACHMENTS[attachment.name] = attachment
    return attachment


@contextmanager
def registered(attachment: Attachment) -> Iterator[Attachment]:
    """`attachment` registered for the duration of a `with` block (tests)."""
    register(attachment)
    try:
        yield attachment
    finally:
        del ATTACHMENTS[attachment.name]


def names() -> tuple[str, ...]:
    return tuple(ATTACHMENTS)


def get(name: str) -> Attachment:
    try:
        return ATTACHMENTS[name]
    except KeyError:
        raise UsageError(f"BOOT_PROFILE: no boot profile {name!r}; expected one of auto, "
                         f"{', '.join(ATTACHMENTS)}") from None


VIRTIO_BLK = register(VirtioBlk(
    name="virtio-blk",
    summary="the image as a disk (a copy-on-write overlay), root /dev/vda1",
    root_params="root=/dev/vda1 rootfstype=ext4 ro rootflags=data=ordered,errors=remount-ro",
    root_awaited="the kernel to mount /dev/vda1 ('EXT4-fs (vda1): mounted filesystem')",
))

# Without a DAX header in the image (DAX=no) the namespace is a plain block device: no `dax` flag.
NVDIMM = register(Nvdimm(
    name="nvdimm",
    summary="the image mapped read-only as an NVDIMM, as Kata and Clear Containers attach it",
    root_params="root=/dev/pmem0p1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4",
    root_awaited="the kernel to mount /dev/pmem0p1 ('EXT4-fs (pmem0p1): mounted filesystem')",
    root_pattern=r"EXT4-fs \(pmem0p1\): mounted filesystem",
    label="nvdimm",
))
# ... with the DAX header (DAX=yes): the runtime's own command line, the root mounted with DAX, so the
# guest reads the image's pages in place instead of through its page cache.
NVDIMM_DAX = dataclasses.replace(
    NVDIMM,
    root_params="root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4",
    root_awaited="the kernel to mount /dev/pmem0p1 with DAX ('EXT4-fs (pmem0p1): mounted filesystem')",
    dax=True,
    label="nvdimm-dax",
)

INITRD = register(Initrd(
    name="initrd",
    summary="WORKDIR's initrd as the kernel's initramfs, no disk (the agent is init)",
    root_milestone="init_started",
    root_awaited="the kernel to run /init from the initramfs",
    boots_initrd=True,
    root_read_only=False,  # the initramfs is the kernel's writable tmpfs
    own_kernel_only="Debian's kernel needs its virtio modules from an initrd of its own",
    agent_is_init=True,
    label="initrd",
    skipped={"root": "initrd (no root filesystem to mount: the kernel unpacks the initramfs)"},
))
