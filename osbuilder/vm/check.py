"""Run a boot profile: the boot check, the guests the fixtures hand out, and `osbuilder boot`.

    image, kernel, profile, chosen = plan(settings)
    opts = guest_options(settings, image=image, kernel=kernel, accel=chosen, name="my-boot", ssh_key=key,
                         profile=profile)
    record = with_kvm_fallback(opts, settings, lambda o: run_check(o, settings))

`run_check` boots through every phase of the profile and writes the boot records when all passed;
`booted` hands out a guest booted up to (not including) powerdown. With ACCEL=auto, a boot that
fails under KVM for a reason that is not the artifact's is retried under TCG (`with_kvm_fallback`)
and KVM is distrusted from then on.

Exit codes (through the CLI): 0 the check passed, 1 the image or kernel failed a check (BootFailure),
125 an infrastructure failure (BootInfrastructureError, e.g. a KVM internal error; HostOverloaded, a
host too busy to boot the guest within the ceiling), 2 a usage error (no image yet).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from osbuilder import fs, metadata, runtimes
from osbuilder.agent import AGENT_NAME, AGENT_VERSION, SERVICE_NAME
from osbuilder.agent import protocol as protocol_mod
from osbuilder.arch import X86_64
from osbuilder.errors import InfrastructureError, UsageError
from osbuilder.image import read_dax_header, wants_dax
from osbuilder.layout import KernelFiles, Workdir
from osbuilder.settings import Settings
from osbuilder.vm import accel, phases, profiles, ssh
from osbuilder.vm.attachments import Attachment
from osbuilder.vm.debian_kernel import debian_kernel
from osbuilder.vm.guest import Guest, HostOverloaded, Launcher
from osbuilder.vm.options import Accel, AgentSpec, BootKernel, BootOptions
from osbuilder.vm.qemu import Vm, run_interactive

log = logging.getLogger("osbuilder")

T = TypeVar("T")


# -- what to boot -------------------------------------------------------------------------------

def plan(settings: Settings, kernel_path: Path | None = None) -> tuple[Path, BootKernel, profiles.Profile, Accel]:
    """What `osbuilder boot` boots under these settings: the artifact, the kernel, the profile (BOOT_PROFILE
    resolved once) and the accelerator (probed while the kernel is made)."""
    attachment = profiles.attachment_for(settings)
    image = boot_image(settings, attachment)
    kernel, chosen = kernel_and_accel(settings, kernel_path, attachment)
    return image, kernel, image_profile(settings, image, attachment), chosen


def boot_image(settings: Settings, attachment: Attachment | None = None) -> Path:
    """The artifact `osbuilder boot` boots: BOOT_IMAGE, else the WORKDIR's image (or its initrd, when the
    attachment boots one)."""
    wd = Workdir.of(settings)
    initrd = (attachment or profiles.attachment_for(settings)).boots_initrd
    image = (settings.boot_image or (wd.initrd if initrd else wd.image)).absolute()
    why = fs.not_a_file(image)
    if why == "does not exist" and settings.boot_image is None:
        build = "osbuilder rootfs && osbuilder initrd" if initrd else "osbuilder rootfs && osbuilder image"
        raise UsageError(f"BOOT_IMAGE: {image} does not exist; run `{build}` first")
    if why:
        raise UsageError(f"BOOT_IMAGE: {image} {why}; give an image file")
    return image


def boot_kernel(settings: Settings, path: Path | None = None, built: Path | None = None,
                attachment: Attachment | None = None) -> BootKernel:
    """The kernel to boot: `path` (--kernel PATH), else BOOT_KERNEL: auto (the built kernel if
    present, else Debian's), built, debian, or a path. `built` is where the built kernel's vmlinuz
    is looked for (default: the WORKDIR's)."""
    choice = settings.boot_kernel.strip() or "auto"
    if path is None and choice not in ("auto", "built", "debian"):
        path = Path(choice).expanduser()
    if path is not None:
        why = fs.not_a_file(path)
        if why:
            raise UsageError(f"BOOT_KERNEL: {path} {why}")
        return BootKernel(path.absolute(), None, "path")
    built = built or Workdir.of(settings).kernel.vmlinuz
    found = built_arch(built) if built.is_file() else settings.arch
    other = found if found != settings.arch else None  # the built kernel's architecture, when not ARCH
    if choice == "auto" and other:
        log.info("boot: %s is a kernel for %s, not ARCH=%s: booting Debian's", built, other, settings.arch)
    elif choice == "built" or (choice == "auto" and built.is_file()):
        if other:
            raise UsageError(f"BOOT_KERNEL=built: {built} is a kernel for {other}, not ARCH={settings.arch}; "
                             "build one with `osbuilder kernel` or use BOOT_KERNEL=debian")
        if not built.is_file():
            raise UsageError(f"BOOT_KERNEL=built: {built} does not exist; run `osbuilder kernel` first")
        return BootKernel(built.absolute(), None, "built")
    refuse_debian_kernel(attachment or profiles.attachment_for(settings), choice)
    return debian_kernel(settings)


def built_arch(vmlinuz: Path) -> str:
    """The architecture the kernel build beside `vmlinuz` was for (its kernel-metadata.json; x86_64 for
    a build from before ARCH, or one without metadata)."""
    try:
        found = json.loads(KernelFiles(vmlinuz.parent).metadata.read_text()).get("arch")
    except (OSError, ValueError, AttributeError):
        found = None
    return found if isinstance(found, str) else X86_64.name


def kernel_and_accel(settings: Settings, path: Path | None = None,
                     attachment: Attachment | None = None) -> tuple[BootKernel, Accel]:
    """`boot_kernel(settings, path)` and `accel.choose(settings)`, side by side: on a fresh machine the
    KVM probe runs while Debian's boot kernel is fetched and built."""
    with ThreadPoolExecutor(max_workers=1) as prober:
        chosen = prober.submit(accel.choose, settings)
        kernel = boot_kernel(settings, path, attachment=attachment)
        return kernel, chosen.result()


def refuse_debian_kernel(attachment: Attachment, choice: str = "debian") -> None:
    """A one-line usage error when the attachment cannot boot with Debian's kernel."""
    why = attachment.own_kernel_only
    if why:
        hint = "`osbuilder kernel-src && osbuilder kernel` first" if choice == "auto" else "BOOT_KERNEL=built"
        raise UsageError(f"BOOT_KERNEL={choice}: the {attachment.name} boot profile needs osbuilder's own kernel "
                         f"({why}); use {hint}")


def guest_options(settings: Settings, *, image: Path, kernel: BootKernel, accel: Accel, name: str,
                  ssh_key: ssh.SessionKey | None = None, append: str = "",
                  timeout: float | None = None, profile: profiles.Profile | None = None) -> BootOptions:
    """Options for one boot under these settings: memory, CPUs, BOOT_TIMEOUT (unless `timeout`),
    BOOT_APPEND then `append`, the profile (`profile`, else the settings'), logs in
    `Workdir.boot_log(name)`. `image` is the artifact the profile attaches (container.img, or the initrd);
    the attachment checks it before anything starts."""
    profile = profile or image_profile(settings, image)
    if kernel.name == "debian":
        refuse_debian_kernel(profile.attach)
    if profile.attach.dax and not (settings.guest.root_dax and kernel.dax):
        if not settings.guest.root_dax:  # as the runtime mounts it there
            log.info("boot: the root is mounted without DAX, as the runtime mounts it on %s", settings.guest.name)
        else:
            log.warning("boot: %s kernel %s cannot mount a root with DAX (no CONFIG_FS_DAX): the image is booted "
                        "as an NVDIMM without DAX", kernel.name, kernel.version)
        profile = profiles.Profile(profile.attach.variant(False), profile.pid1)
    profile.attach.check(image, settings.vm_memory)
    agent = agent_spec(settings, image)
    if profile.agent_is_init and not agent.protocol.can_poweroff:
        raise UsageError(f"AGENT_INIT: the boot check proves an agent that is the guest's init over osbuilder's "
                         f"protocol only; {agent.name} speaks {agent.protocol.name}")
    return BootOptions(
        image=image, kernel=kernel, log_dir=Workdir.of(settings).boot_log(name), accel=accel,
        memory=settings.vm_memory, cpus=settings.vm_cpus, timeout=timeout or settings.boot_timeout,
        append=" ".join(p for p in (settings.boot_append, append) if p), ssh_key=ssh_key, name=name,
        profile=profile, agent=agent, vsock_cid=vsock_cid(agent.protocol), arch=settings.guest)


def agent_spec(settings: Settings, image: Path) -> AgentSpec:
    """The agent a boot of `image` proves, and over which protocol: AGENT_PROTOCOL, else (auto) what the
    image records of its agent, else the RUNTIME's protocol when it speaks only one. Never found by
    trying protocols on the agent (a wrong first byte breaks a Kata agent's session)."""
    recorded = metadata.agent_of(image) if image.is_file() else None
    name = settings.agent_protocol
    if name == "auto" and recorded:
        name = str(recorded.get("protocol") or protocol_mod.OSBUILDER.name)  # records before protocols: osbuilder's
    if name == "auto":
        spoken = runtimes.get(settings.runtime).agent_protocols
        if image.is_file() and len(spoken) != 1:
            raise UsageError(f"AGENT_PROTOCOL: {image} records no agent (not made by osbuilder?) and RUNTIME="
                             f"{settings.runtime} speaks {', '.join(spoken)}; set AGENT_PROTOCOL")
        name = spoken[0] if image.is_file() else protocol_mod.OSBUILDER.name
    agent = recorded or {}
    return AgentSpec(protocol_mod.get(name), str(agent.get("name", AGENT_NAME)),
                     str(agent.get("service", SERVICE_NAME)), str(agent.get("version", AGENT_VERSION)))


def vsock_cid(protocol: protocol_mod.AgentProtocol) -> int | None:
    """A guest address for vsock when the protocol needs it: the host must have /dev/vhost-vsock (else
    125: not the image's fault)."""
    if protocol.vsock_port is None:
        return None
    if not os.access("/dev/vhost-vsock", os.R_OK | os.W_OK):
        raise InfrastructureError(f"AGENT_PROTOCOL={protocol.name}: the agent listens on vsock port "
                                  f"{protocol.vsock_port}, and this host has no usable /dev/vhost-vsock "
                                  "(modprobe vhost_vsock)")
    return secrets.randbelow(2**31 - 3) + 3  # 0-2 are reserved


def image_profile(settings: Settings, image: Path, attachment: Attachment | None = None) -> profiles.Profile:
    """The settings' profile for booting `image`: the attachment's DAX variant when the image carries
    a DAX header (an image without one cannot be mounted with DAX)."""
    dax_header = image.is_file() and read_dax_header(image) is not None
    profile = profiles.for_settings(settings, dax_header=dax_header, attachment=attachment)
    if not dax_header and profile.attach.variant(True).dax and wants_dax(settings):
        log.warning("boot: %s has no DAX header (made with DAX=no?): booting it as an NVDIMM without DAX", image)
    return profile


# -- running a profile --------------------------------------------------------------------------

def boot_to_ready(guest: Guest, checks: Mapping[str, Callable[[Guest], Any]] = phases.CHECKS) -> None:
    """Every phase of the guest's profile but powerdown: kernel, root, init, agent, running, exec,
    ssh (those the profile skips are recorded as skipped; `checks`: each phase's check)."""
    for phase in profiles.READY:
        if phase == "ssh" and guest.opts.ssh_key is None and guest.profile.skip(phase) is None:
            continue  # no session key, nothing to log in with: "not run", so the check does not pass
        phases.run(guest, phase, checks)
    guest.collect_console_timings()


def run_check(opts: BootOptions, settings: Settings, *, launch: Launcher = Vm,
              checks: Mapping[str, Callable[[Guest], Any]] = phases.CHECKS) -> dict[str, Any]:
    """The whole check, once; returns the boot record. Writes boot records when it passes, carrying
    the hashes the guest took of the image and kernel before QEMU started (none when a file was
    replaced or written to during the boot). `launch` and `checks`: what starts QEMU and what each
    phase checks (tests give their own)."""
    with Guest.start(opts, launch) as guest:
        boot_to_ready(guest, checks)
        phases.run(guest, "powerdown", checks)
    guest.write_passing_records(settings.workdir)
    return guest.record()


def with_kvm_fallback(opts: BootOptions, settings: Settings, fn: Callable[[BootOptions], T]) -> T:
    """Run `fn(opts)`; if KVM (chosen by ACCEL=auto) fails there, distrust it and retry under TCG
    (logs in `<log dir>-tcg`). An overloaded host is not KVM's failure (TCG would only be slower)."""
    try:
        return fn(opts)
    except InfrastructureError as e:
        if opts.accel.name != "kvm" or not opts.accel.auto or isinstance(e, HostOverloaded):
            raise
        log.warning("boot: KVM failed (%s); retrying under TCG", e.message)
        accel.distrust_kvm(settings, e.message)
        tcg = dataclasses.replace(opts, accel=Accel("tcg", f"KVM failed during a boot: {e.message}", True),
                                  log_dir=opts.log_dir.with_name(opts.log_dir.name + "-tcg"))
        return fn(tcg)


@contextmanager
def booted(opts: BootOptions, settings: Settings) -> Iterator[Guest]:
    """A guest booted through every phase but powerdown (KVM falling back to TCG), stopped on exit."""
    guests: list[Guest] = []

    def boot(o: BootOptions) -> Guest:
        guest = Guest.start(o)
        guests.append(guest)
        try:
            boot_to_ready(guest)
        except BaseException:
            guest.close(graceful=0)
            raise
        return guest

    try:
        yield with_kvm_fallback(opts, settings, boot)
    finally:
        for guest in guests:
            guest.close()


# -- `osbuilder boot` ---------------------------------------------------------------------------

def run_boot_check(settings: Settings, image: Path, kernel: BootKernel, profile: profiles.Profile | None = None,
                   name: str = "osbuilder-boot-check", chosen: Accel | None = None) -> dict[str, Any]:
    """The full boot check of `image` with `kernel` (`osbuilder boot --check`; `profile`, else the
    settings' for the image) under `chosen` (default: `accel.choose`), with a throw-away session SSH
    key; writes boot records when it passes. Returns the boot record."""
    key_dir = fs.pid_tempdir("osbkey-", Path(tempfile.gettempdir()))  # swept if we are SIGKILLed
    try:
        key = ssh.make_session_key(key_dir)
        opts = guest_options(settings, image=image, kernel=kernel, accel=chosen or accel.choose(settings),
                             name=name, ssh_key=key, profile=profile)
        return with_kvm_fallback(opts, settings, lambda o: run_check(o, settings))
    finally:
        shutil.rmtree(key_dir, ignore_errors=True)


def format_timings(record: dict[str, Any]) -> str:
    """What `osbuilder boot --check` prints: the verdict, kernel, accelerator and phase timings."""
    lines = [f"boot check {'PASSED' if record['passed'] else 'FAILED'}: {record['image']}",
             f"  kernel: {record['kernel']['kind']} {record['kernel']['version'] or record['kernel']['path']}",
             f"  accel:  {record['accel']['name']} ({record['accel']['reason']})",
             *([f"  profile: {record['profile']}"] if record.get("profile") else []),
             "  phase timings (seconds since QEMU start):"]
    lines += [f"    {name:<22} {at:8.2f}" for name, at in record["timings"].items()]
    if record.get("guest_startup"):
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in record["guest_startup"].items())
        lines.append(f"  systemd-analyze: {parts}")
    lines.append(f"  logs: {record['log_dir']}")
    return "\n".join(lines)


def boot_interactive(settings: Settings, image: Path, kernel: BootKernel, profile: profiles.Profile,
                     chosen: Accel | None = None) -> int:
    """`osbuilder boot`: the image on the terminal (serial on stdio; Ctrl-A X quits) under `chosen`
    (default: `accel.choose`); QEMU's exit code."""
    opts = guest_options(settings, image=image, kernel=kernel, accel=chosen or accel.choose(settings),
                         name="osbuilder-boot", profile=profile)
    return run_interactive(opts.spec(interactive=True))
