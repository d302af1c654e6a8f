"""Boot profiles: what booting an artifact must prove, given how it is attached and what runs as init.

A boot goes through the same phases in the same order, whatever boots:

    kernel  root  init  agent  running  exec  ssh  powerdown

A `Profile` is an attachment (`attachments.py`: how the artifact reaches the guest and how the kernel
finds its root) and a PID 1 (systemd, or the agent: this decides how `init` is proven and how the
guest is powered off). The phases that do not apply follow from both (the agent as init has no
systemd to reach `running` and no sshd; an initrd has no root filesystem to mount), each with the
reason boot.json records. A boot resolves its profile once (`for_settings`) and passes the object on.

Phase results are `Outcome` values; boot.json spells them "passed", "failed: <reason>" and
"skipped: <reason>" ("not run" for a phase without one).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from osbuilder import runtimes
from osbuilder.settings import Settings
from osbuilder.vm import attachments
from osbuilder.vm.attachments import Attachment

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


class Pid1(enum.Enum):
    """What runs as the guest's init."""

    SYSTEMD = "systemd"  # proven by its banner on the console; powered off by the ACPI power button
    AGENT = "agent"  # proven by the agent's `version` reply (pid1 true); powered off by its `poweroff`


AGENT_IS_INIT = MappingProxyType({"running": "agent is init (no systemd)", "ssh": "agent is init (no sshd)"})


@dataclass(frozen=True)
class Profile:
    attach: Attachment
    pid1: Pid1

    def __post_init__(self) -> None:
        unknown = set(self.attach.skipped) - set(PHASES)
        if unknown:
            raise ValueError(f"attachment {self.attach.name}: no such phase: {', '.join(sorted(unknown))}")
        if self.attach.agent_is_init and self.pid1 is not Pid1.AGENT:
            raise ValueError(f"attachment {self.attach.name} runs the agent as init")

    @property
    def name(self) -> str:
        """As boot.json records it: `systemd`, `agent-init`, `nvdimm-dax`, `nvdimm-agent-init`, `initrd`, ..."""
        if self.attach.agent_is_init:
            return self.attach.label or self.attach.name
        suffix = "agent-init" if self.agent_is_init else ""
        return "-".join(filter(None, (self.attach.label, suffix))) or "systemd"

    @property
    def agent_is_init(self) -> bool:
        return self.pid1 is Pid1.AGENT

    @property
    def skipped(self) -> Mapping[str, str]:
        """phase -> why it does not apply to this profile."""
        return {**(AGENT_IS_INIT if self.agent_is_init else {}), **self.attach.skipped}

    def skip(self, phase: str) -> Outcome | None:
        """The outcome this profile records for `phase` instead of running it, or None if it applies."""
        reason = self.skipped.get(phase)
        return Outcome.skipped(reason) if reason is not None else None

    def counts(self, phase: str, outcome: Outcome | None) -> bool:
        """Whether a phase's outcome counts towards a pass: passed, or this profile's own skip of it."""
        if outcome is None:
            return False
        return outcome.status is Status.PASSED or outcome == self.skip(phase)


def attachment_for(settings: Settings) -> Attachment:
    """BOOT_PROFILE's attachment; `auto` is the RUNTIME's own."""
    name = settings.boot_profile
    return attachments.get(runtimes.get(settings.runtime).attachment if name == "auto" else name)


def for_settings(settings: Settings, dax_header: bool = False, attachment: Attachment | None = None) -> Profile:
    """The profile boots under these settings use: BOOT_PROFILE's attachment (`attachment`, when the
    caller resolved it already; its DAX variant when the image carries a DAX header) and AGENT_INIT's
    PID 1 (an attachment that can only run the agent as init, such as the initrd, has that)."""
    attach = (attachment or attachment_for(settings)).variant(dax_header)
    agent = settings.agent_init or attach.agent_is_init
    return Profile(attach, Pid1.AGENT if agent else Pid1.SYSTEMD)


# Named profiles, for tests and benches that boot a particular way.
SYSTEMD = Profile(attachments.VIRTIO_BLK, Pid1.SYSTEMD)
AGENT_INIT = Profile(attachments.VIRTIO_BLK, Pid1.AGENT)
NVDIMM_SYSTEMD = Profile(attachments.NVDIMM, Pid1.SYSTEMD)
NVDIMM_AGENT_INIT = Profile(attachments.NVDIMM, Pid1.AGENT)
NVDIMM_DAX_SYSTEMD = Profile(attachments.NVDIMM_DAX, Pid1.SYSTEMD)
NVDIMM_DAX_AGENT_INIT = Profile(attachments.NVDIMM_DAX, Pid1.AGENT)
INITRD = Profile(attachments.INITRD, Pid1.AGENT)
