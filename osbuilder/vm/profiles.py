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
by its profile. A new way to boot is a new entry in PROFILES (issue 9: `nvdimm`, `initrd`), made of
an attachment and a PID 1, not new branches in the phases.

Phase results are `Outcome` values; boot.json spells them "passed", "failed: <reason>" and
"skipped: <reason>" ("not run" for a phase without one).
"""

from __future__ import annotations

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

SYSTEMD = Profile("systemd", VIRTIO_BLK, Pid1.SYSTEMD)
AGENT_INIT = Profile("agent-init", VIRTIO_BLK, Pid1.AGENT, skipped={
    "running": "agent is init (no systemd)",
    "ssh": "agent is init (no sshd)",
})

PROFILES: dict[str, Profile] = {p.name: p for p in (SYSTEMD, AGENT_INIT)}


def for_settings(settings: Settings) -> Profile:
    """The profile boots under these settings use (AGENT_INIT=yes: the agent is PID 1)."""
    return AGENT_INIT if settings.agent_init else SYSTEMD
