"""What one boot runs with: the kernel, the accelerator, the profile, the resources and the time budgets.

Plain values, no behaviour: `check.guest_options` fills a `BootOptions` from the settings, and
`BootOptions.spec()` turns it into the `VmSpec` qemu.py launches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from osbuilder.agent import AGENT_NAME, AGENT_VERSION, SERVICE_NAME
from osbuilder.agent.protocol import OSBUILDER, AgentProtocol
from osbuilder.arch import X86_64, Arch
from osbuilder.vm import ssh
from osbuilder.vm.profiles import SYSTEMD, Profile
from osbuilder.vm.qemu import VmSpec, kernel_cmdline


@dataclass(frozen=True)
class BootKernel:
    """A kernel (and optional initrd) to boot an image with."""

    kernel: Path
    initrd: Path | None
    name: str  # "debian", "built" or "path"
    version: str = ""
    dax: bool = True  # it can mount a root with DAX (FS_DAX; Debian's arm64 kernel cannot)


@dataclass(frozen=True)
class Accel:
    """The accelerator a boot runs under, and why (accel.choose)."""

    name: str  # "kvm" or "tcg"
    reason: str
    auto: bool  # chosen by ACCEL=auto (so a KVM failure may fall back to TCG)


SILENCE = 0.25  # of BOOT_TIMEOUT: how long the guest may show no progress before a phase calls it hung
CEILING = 1.5  # of BOOT_TIMEOUT: how long after QEMU's start a boot still making progress may take to be ready
AGENT_GRACE = 0.15  # of BOOT_TIMEOUT: how long the agent may lag behind multi-user.target
POWERDOWN = 0.25  # of BOOT_TIMEOUT (at least POWERDOWN_MIN): the power-off's silence budget; its ceiling is twice it
POWERDOWN_MIN = 20.0


@dataclass(frozen=True)
class Budget:
    """How long a phase waits for the guest. While the guest makes progress (guest.py: a console line, a
    QMP event from the guest, what a phase notes) it waits, up to `ceiling` seconds after QEMU's start
    (`from_start`) or after the phase's own start; a guest silent for `silence` seconds is hung, unless the
    host starved it meanwhile (host.py), which buys it time up to the ceiling."""

    silence: float
    ceiling: float
    from_start: bool = True


@dataclass(frozen=True)
class Budgets:
    """Every budget of a boot, from BOOT_TIMEOUT: `boot` for each phase up to ready (kernel, root, init,
    agent, running, exec, ssh: one ceiling counted from QEMU's start), `agent_grace` (the agent's lag behind
    multi-user.target), `powerdown` (counted from the power button)."""

    boot: Budget
    agent_grace: float
    powerdown: Budget

    @classmethod
    def from_timeout(cls, timeout: float) -> Budgets:
        powerdown = max(POWERDOWN_MIN, timeout * POWERDOWN)
        return cls(boot=Budget(silence=timeout * SILENCE, ceiling=timeout * CEILING),
                   agent_grace=max(15.0, timeout * AGENT_GRACE),
                   powerdown=Budget(silence=powerdown, ceiling=2 * powerdown, from_start=False))


@dataclass(frozen=True)
class AgentSpec:
    """The agent a boot proves: the protocol it speaks, and what the image records of it (its binary's
    name, its unit, its version) for messages and diagnostics."""

    protocol: AgentProtocol = OSBUILDER
    name: str = AGENT_NAME
    service: str = SERVICE_NAME
    version: str = AGENT_VERSION  # as recorded ("custom:<hash>" for a binary osbuilder did not build)

    @property
    def osbuilders_own(self) -> bool:
        """osbuilder's own agent: its version must be the one this osbuilder builds."""
        return self.name == AGENT_NAME and not self.version.startswith("custom:")


@dataclass(frozen=True)
class BootOptions:
    image: Path
    kernel: BootKernel
    log_dir: Path
    accel: Accel
    memory: int = 1024
    cpus: int = 1
    timeout: float = 120
    append: str = ""
    ssh_key: ssh.SessionKey | None = None
    name: str = "boot"
    profile: Profile = SYSTEMD
    agent: AgentSpec = AgentSpec()
    vsock_cid: int | None = None  # the guest's vsock address, when its agent protocol needs vsock
    arch: Arch = X86_64  # the guest's architecture (ARCH)

    @property
    def cmdline(self) -> str:
        return kernel_cmdline(self.profile.attach.root_params, self.append, self.arch)

    @property
    def budgets(self) -> Budgets:
        return Budgets.from_timeout(self.timeout)

    def spec(self, *, interactive: bool = False) -> VmSpec:
        """What qemu.py launches: the image attached by the profile's attachment, the agent's port,
        the session key as a credential (`interactive`: the console is yours, no agent port)."""
        creds = {ssh.CREDENTIAL: self.ssh_key.public} if self.ssh_key else {}
        return VmSpec(kernel=self.kernel.kernel, initrd=self.kernel.initrd, cmdline=self.cmdline,
                      image=self.image, attachment=self.profile.attach, accel=self.accel.name,
                      memory=self.memory, cpus=self.cpus, credentials=creds,
                      serial_ports=() if interactive else self.agent.protocol.serial_ports,
                      vsock_cid=None if interactive else self.vsock_cid, arch=self.arch)
