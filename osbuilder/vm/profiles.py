"""Boot profiles: what booting an artifact must prove, and how the artifact is attached to the guest.

A boot goes through the same phases in the same order, whatever boots:

    kernel  root  init  agent  running  exec  ssh  powerdown

A `Profile` says, as data, how one kind of boot differs:

- `attach`: how the artifact reaches the guest and how the kernel finds its root (the root part of
  the command line, and the console line that shows the root mounted);
- `pid1`: what runs as init, which decides how `init` is proven (systemd's banner, or the agent
  reporting pid1) and how the guest is powered off (ACPI button, or the agent's `poweroff`);
- `skipped`: the phases that do not apply, each with the reason boot.json records.

The guest is "ready" (`check.boot_to_ready`) when every phase before powerdown passed or was skipped
by its profile. A new way to boot is a new entry in PROFILES, made of an attachment and a PID 1, not
new branches in the phases.

BOOT_PROFILE names the attachment (BOOT_PROFILES): `virtio-blk` (a disk), `nvdimm` (the image mapped
as an NVDIMM, as Kata and Clear Containers do; its DAX variant when the image carries a DAX header),
or `auto`, the RUNTIME's own (RUNTIME_BOOT_PROFILE); AGENT_INIT chooses the PID 1.

Phase results are `Outcome` values; boot.json spells them "passed", "failed: <reason>" and
"skipped: <reason>" ("not run" for a phase without one).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from osbuilder.settings import Settings

PHASES = ("kernel", "root", "init", "agent", "running", "exec", "ssh", "powerdown")
READY = PHASES[:-1]  # what boot_to_ready runs: everything but powerdown


class Status(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Outcome:
    """The result of one phase. `str()` is how boot.json records it."""

    status: Status
    reason: str = ""

    @classmethod
    def passed(cls) -> Outcome:
        return cls(Status.PASSED)

    @classmethod
    def failed(cls, reason: str) -> Outcome:
        return cls(Status.FAILED, reason)

    @classmethod
    def skipped(cls, reason: str) -> Outcome:
        return cls(Status.SKIPPED, reason)

    def __str__(self) -> str:
        return self.status.value if self.status is Status.PASSED else f"{self.status.value}: {self.reason}"


@dataclass(frozen=True)
class Attachment:
    """How the artifact reaches the guest, and how the kernel finds and mounts its root filesystem."""

    name: str
    root_params: str  # the root part of the kernel command line
    root_milestone: str  # the console milestone (console.MILESTONES) that shows the root mounted
    root_awaited: str  # what the root phase waits for, as its timeout message says
    artifact: str = "image"  # the WORKDIR artifact it boots: "image" (container.img) or "initrd"
    root_read_only: bool = True  # `exec` checks that / is mounted read-only
    own_kernel_only: str = ""  # why only osbuilder's kernel can boot it ("": any kernel can)
    # The console line that shows the root mounted, when console.MILESTONES has no entry for it: the
    # guest records `root_milestone` at the first line matching this regular expression.
    root_pattern: str = ""
    dax: bool = False  # the root is mounted with DAX; `exec` proves it from inside the guest


class Pid1(enum.Enum):
    """What runs as the guest's init."""

    SYSTEMD = "systemd"  # proven by its banner on the console; powered off by the ACPI power button
    AGENT = "agent"  # proven by the agent's `version` reply (pid1 true); powered off by its `poweroff`


@dataclass(frozen=True)
class Profile:
    name: str
    attach: Attachment
    pid1: Pid1
    skipped: Mapping[str, str] = field(default_factory=dict, hash=False)  # phase -> why it does not apply

    def __post_init__(self) -> None:
        unknown = set(self.skipped) - set(PHASES)
        if unknown:
            raise ValueError(f"profile {self.name}: no such phase: {', '.join(sorted(unknown))}")
        object.__setattr__(self, "skipped", MappingProxyType(dict(self.skipped)))  # a profile is a constant

    @property
    def agent_is_init(self) -> bool:
        return self.pid1 is Pid1.AGENT

    @property
    def ready(self) -> tuple[str, ...]:
        """The phases a guest goes through before it is handed out (their skips recorded)."""
        return READY

    def skip(self, phase: str) -> Outcome | None:
        """The outcome this profile records for `phase` instead of running it, or None if it applies."""
        reason = self.skipped.get(phase)
        return Outcome.skipped(reason) if reason is not None else None

    def counts(self, phase: str, outcome: Outcome | None) -> bool:
        """Whether a phase's outcome counts towards a pass: passed, or this profile's own skip of it."""
        if outcome is None:
            return False
        return outcome.status is Status.PASSED or outcome == self.skip(phase)


# The image as a virtio-blk disk, its first partition the root, mounted read-only.
VIRTIO_BLK = Attachment(
    name="virtio-blk",
    root_params="root=/dev/vda1 rootfstype=ext4 ro rootflags=data=ordered,errors=remount-ro",
    root_milestone="root_mounted",
    root_awaited="the kernel to mount /dev/vda1 ('EXT4-fs (vda1): mounted filesystem')",
)

# The image as an NVDIMM, as Kata Containers and Clear Containers attach it: QEMU maps the file
# read-only (memory-backend-file readonly=on, nvdimm unarmed=on; qemu.py), the guest sees /dev/pmem0.
# Without a DAX header in the image (DAX=no) the namespace is a plain block device: no `dax` flag.
NVDIMM = Attachment(
    name="nvdimm",
    root_params="root=/dev/pmem0p1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4",
    root_milestone="root_mounted",
    root_awaited="the kernel to mount /dev/pmem0p1 ('EXT4-fs (pmem0p1): mounted filesystem')",
    root_pattern=r"EXT4-fs \(pmem0p1\): mounted filesystem",
)
# ... with the DAX header (DAX=yes): the runtime's own command line, the root mounted with DAX, so
# the guest reads the image's pages in place instead of through its page cache.
NVDIMM_DAX = dataclasses.replace(
    NVDIMM,
    root_params="root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4",
    root_awaited="the kernel to mount /dev/pmem0p1 with DAX ('EXT4-fs (pmem0p1): mounted filesystem')",
    dax=True,
)

AGENT_IS_INIT = {"running": "agent is init (no systemd)", "ssh": "agent is init (no sshd)"}

SYSTEMD = Profile("systemd", VIRTIO_BLK, Pid1.SYSTEMD)
AGENT_INIT = Profile("agent-init", VIRTIO_BLK, Pid1.AGENT, skipped=AGENT_IS_INIT)
NVDIMM_SYSTEMD = Profile("nvdimm", NVDIMM, Pid1.SYSTEMD)
NVDIMM_AGENT_INIT = Profile("nvdimm-agent-init", NVDIMM, Pid1.AGENT, skipped=AGENT_IS_INIT)
NVDIMM_DAX_SYSTEMD = Profile("nvdimm-dax", NVDIMM_DAX, Pid1.SYSTEMD)
NVDIMM_DAX_AGENT_INIT = Profile("nvdimm-dax-agent-init", NVDIMM_DAX, Pid1.AGENT, skipped=AGENT_IS_INIT)

# The artifact as the kernel's initramfs (`osbuilder initrd`), as the runtime's `initrd =` boots it:
# no disk and no root=; the kernel unpacks the archive into its tmpfs root and runs /init, the agent.
INITRD_ATTACH = Attachment(
    name="initrd",
    root_params="",
    root_milestone="init_started",
    root_awaited="the kernel to run /init from the initramfs",
    artifact="initrd",
    root_read_only=False,  # the initramfs is the kernel's writable tmpfs
    own_kernel_only="Debian's kernel needs its virtio modules from an initrd of its own",
)
INITRD = Profile("initrd", INITRD_ATTACH, Pid1.AGENT, skipped={
    "root": "initrd (no root filesystem to mount: the kernel unpacks the initramfs)",
    "running": "agent is init (no systemd)",
    "ssh": "agent is init (no sshd)",
})

PROFILES: dict[str, Profile] = {p.name: p for p in (SYSTEMD, AGENT_INIT, NVDIMM_SYSTEMD, NVDIMM_AGENT_INIT,
                                                    NVDIMM_DAX_SYSTEMD, NVDIMM_DAX_AGENT_INIT, INITRD)}

# BOOT_PROFILE -> its attachment for an image without, and with, a DAX header. A disk cannot do DAX:
# virtio-blk boots a DAX image through its outer partition table (image.py), without `dax`.
BOOT_PROFILES: dict[str, tuple[Attachment, Attachment]] = {
    "virtio-blk": (VIRTIO_BLK, VIRTIO_BLK),
    "nvdimm": (NVDIMM, NVDIMM_DAX),
    "initrd": (INITRD_ATTACH, INITRD_ATTACH),  # `osbuilder initrd`'s archive, no disk
}
# BOOT_PROFILE=auto: how the RUNTIME attaches the image (both map it as an NVDIMM).
RUNTIME_BOOT_PROFILE = {"kata": "nvdimm", "clear-containers": "nvdimm"}


def boot_profile_name(settings: Settings) -> str:
    """BOOT_PROFILE, with auto resolved to the RUNTIME's own attachment."""
    name = settings.boot_profile
    return RUNTIME_BOOT_PROFILE[settings.runtime] if name == "auto" else name


def for_settings(settings: Settings, dax: bool = False) -> Profile:
    """The profile boots under these settings use: BOOT_PROFILE's attachment (the DAX one when `dax`,
    the image carries a DAX header) and AGENT_INIT's PID 1 (an attachment with a single profile, such
    as the initrd, has its own)."""
    attach = BOOT_PROFILES[boot_profile_name(settings)][dax]
    pid1 = Pid1.AGENT if settings.agent_init else Pid1.SYSTEMD
    candidates = [p for p in PROFILES.values() if p.attach == attach]
    return next((p for p in candidates if p.pid1 is pid1), candidates[0])
