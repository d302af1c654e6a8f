"""Run a boot profile: the boot check, the guests the fixtures hand out, and `osbuilder boot`.

    opts = guest_options(settings, image=..., kernel=boot_kernel(settings), accel=accel.choose(...),
                         name="my-boot", ssh_key=key)
    record = with_kvm_fallback(opts, settings, lambda o: run_check(o, settings))

`run_check` boots through every phase of the profile and writes the boot records when all passed;
`booted` hands out a guest booted up to (not including) powerdown. With ACCEL=auto, a boot that
fails under KVM for a reason that is not the artifact's is retried under TCG (`with_kvm_fallback`)
and KVM is distrusted from then on.

Exit codes (through the CLI): 0 the check passed, 1 the image or kernel failed a check (BootFailure),
125 an infrastructure failure (BootInfrastructureError, e.g. a KVM internal error), 2 a usage error
(no image yet).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from osbuilder import fs
from osbuilder.errors import InfrastructureError, UsageError
from osbuilder.image import ALIGN as IMAGE_ALIGN
from osbuilder.image import read_dax_header, wants_dax
from osbuilder.layout import Workdir
from osbuilder.settings import MAX_VM_MEMORY, Settings
from osbuilder.vm import accel, phases, profiles, ssh
from osbuilder.vm.debian_kernel import debian_kernel
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import Accel, BootKernel, BootOptions
from osbuilder.vm.qemu import VmSpec, kernel_cmdline, run_interactive

log = logging.getLogger("osbuilder")

T = TypeVar("T")


# -- what to boot -------------------------------------------------------------------------------

def boot_image(settings: Settings) -> Path:
    """The artifact `osbuilder boot` boots: BOOT_IMAGE, else the WORKDIR's image (or its initrd, when the
    boot profile attaches one)."""
    wd = Workdir.of(settings)
    initrd = profiles.for_settings(settings).attach.artifact == "initrd"
    image = (settings.boot_image or (wd.initrd if initrd else wd.image)).absolute()
    if not image.is_file():
        build = "osbuilder rootfs && osbuilder initrd" if initrd else "osbuilder rootfs && osbuilder image"
        raise UsageError(f"BOOT_IMAGE: {image} does not exist; run `{build}` first")
    return image


def boot_kernel(settings: Settings, path: Path | None = None, built: Path | None = None) -> BootKernel:
    """The kernel to boot: `path` (--kernel PATH), else BOOT_KERNEL: auto (the built kernel if
    present, else Debian's), built, debian, or a path. `built` is where the built kernel's vmlinuz
    is looked for (default: the WORKDIR's)."""
    choice = settings.boot_kernel.strip() or "auto"
    if path is None and choice not in ("auto", "built", "debian"):
        path = Path(choice).expanduser()
    if path is not None:
        if not path.is_file():
            raise UsageError(f"BOOT_KERNEL: {path} is not a file")
        return BootKernel(path.absolute(), None, "path")
    built = built or Workdir.of(settings).kernel.vmlinuz
    if choice == "built" or (choice == "auto" and built.is_file()):
        if not built.is_file():
            raise UsageError(f"BOOT_KERNEL=built: {built} does not exist; run `osbuilder kernel` first")
        return BootKernel(built.absolute(), None, "built")
    refuse_debian_kernel(profiles.for_settings(settings), choice)
    return debian_kernel(settings)


def kernel_and_accel(settings: Settings, path: Path | None = None) -> tuple[BootKernel, Accel]:
    """`boot_kernel(settings, path)` and `accel.choose(settings)`, side by side: on a fresh machine the
    KVM probe runs while Debian's boot kernel is fetched and built."""
    with ThreadPoolExecutor(max_workers=1) as prober:
        chosen = prober.submit(accel.choose, settings)
        kernel = boot_kernel(settings, path)
        return kernel, chosen.result()


def refuse_debian_kernel(profile: profiles.Profile, choice: str = "debian") -> None:
    """A one-line usage error when the profile's attachment cannot boot with Debian's kernel."""
    why = profile.attach.own_kernel_only
    if why:
        hint = "`osbuilder kernel-src && osbuilder kernel` first" if choice == "auto" else "BOOT_KERNEL=built"
        raise UsageError(f"BOOT_KERNEL={choice}: the {profile.name} boot profile needs osbuilder's own kernel "
                         f"({why}); use {hint}")


def guest_options(settings: Settings, *, image: Path, kernel: BootKernel, accel: Accel, name: str,
                  ssh_key: ssh.SessionKey | None = None, append: str = "",
                  timeout: float | None = None, profile: profiles.Profile | None = None) -> BootOptions:
    """Options for one boot under these settings: memory, CPUs, BOOT_TIMEOUT (unless `timeout`),
    BOOT_APPEND then `append`, the profile (`profile`, else the settings'), logs in
    `Workdir.boot_log(name)`. `image` is the artifact the profile attaches (container.img, or the initrd)."""
    profile = profile or image_profile(settings, image)
    if kernel.name == "debian":
        refuse_debian_kernel(profile)
    if profile.attach.name == "nvdimm":
        check_nvdimm_image(settings, image)
    return BootOptions(
        image=image, kernel=kernel, log_dir=Workdir.of(settings).boot_log(name), accel=accel,
        memory=settings.vm_memory, cpus=settings.vm_cpus, timeout=timeout or settings.boot_timeout,
        append=" ".join(p for p in (settings.boot_append, append) if p), ssh_key=ssh_key, name=name,
        profile=profile)


def image_profile(settings: Settings, image: Path) -> profiles.Profile:
    """The settings' profile for booting `image`: with BOOT_PROFILE=nvdimm, the DAX attachment when the
    image carries a DAX header (an image without one cannot be mounted with DAX)."""
    dax = image.is_file() and read_dax_header(image) is not None
    profile = profiles.for_settings(settings, dax=dax)
    if profile.attach.name == "nvdimm" and not dax and wants_dax(settings):
        log.warning("boot: %s has no DAX header (made with DAX=no?): booting it as an NVDIMM without DAX", image)
    return profile


def check_nvdimm_image(settings: Settings, image: Path) -> None:
    """An NVDIMM's memory backend maps the whole image in memory-hotplug units of 128 MiB. (A missing
    image is left to the boot, which names it.)"""
    if not image.is_file():
        return
    size = image.stat().st_size
    if size == 0 or size % IMAGE_ALIGN:
        raise UsageError(f"BOOT_IMAGE: {image} is {size} bytes, not a multiple of {IMAGE_ALIGN >> 20} MiB, so "
                         "the NVDIMM memory backend cannot map it; make it with `osbuilder image` or boot it "
                         "with BOOT_PROFILE=virtio-blk")
    if settings.vm_memory + (size >> 20) > MAX_VM_MEMORY:
        raise UsageError(f"VM_MEMORY: {settings.vm_memory} MiB plus the {size >> 20} MiB image mapped as an NVDIMM "
                         f"exceed the {MAX_VM_MEMORY} MiB QEMU's guest can address")


# -- running a profile --------------------------------------------------------------------------

def start_guest(opts: BootOptions) -> Guest:
    """A started guest (QEMU running, nothing checked yet). Close it, or use it as a context manager."""
    return Guest.start(opts)


def boot_to_ready(guest: Guest) -> None:
    """Every phase of the guest's profile but powerdown: kernel, root, init, agent, running, exec,
    ssh (those the profile skips are recorded as skipped)."""
    for phase in guest.profile.ready:
        if phase == "ssh" and guest.opts.ssh_key is None and guest.profile.skip(phase) is None:
            continue  # no session key, nothing to log in with: "not run", so the check does not pass
        phases.run(guest, phase)
    guest.collect_console_timings()


def run_check(opts: BootOptions, settings: Settings) -> dict[str, Any]:
    """The whole check, once; returns the boot record. Writes boot records when it passes, carrying
    the hashes the guest took of the image and kernel before QEMU started (none when a file was
    replaced or written to during the boot)."""
    with start_guest(opts) as guest:
        boot_to_ready(guest)
        phases.run(guest, "powerdown")
    guest.write_passing_records(settings.workdir)
    return guest.record()


def with_kvm_fallback(opts: BootOptions, settings: Settings, fn: Callable[[BootOptions], T]) -> T:
    """Run `fn(opts)`; if KVM (chosen by ACCEL=auto) fails there, distrust it and retry under TCG
    (logs in `<log dir>-tcg`)."""
    try:
        return fn(opts)
    except InfrastructureError as e:
        if opts.accel.name != "kvm" or not opts.accel.auto:
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
        guest = start_guest(o)
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

def run_boot_check(settings: Settings, image: Path, kernel: BootKernel,
                   name: str = "osbuilder-boot-check", chosen: Accel | None = None) -> dict[str, Any]:
    """The full boot check of `image` with `kernel` (`osbuilder boot --check`) under `chosen` (default:
    `accel.choose`), with a throw-away session SSH key; writes boot records when it passes. Returns
    the boot record."""
    key_dir = fs.pid_tempdir("osbkey-", Path(tempfile.gettempdir()))  # swept if we are SIGKILLed
    try:
        key = ssh.make_session_key(key_dir)
        opts = guest_options(settings, image=image, kernel=kernel, accel=chosen or accel.choose(settings),
                             name=name, ssh_key=key)
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


def boot_interactive(settings: Settings, image: Path, kernel: BootKernel, chosen: Accel | None = None) -> int:
    """`osbuilder boot`: the image on the terminal (serial on stdio; Ctrl-A X quits) under `chosen`
    (default: `accel.choose`); QEMU's exit code."""
    chosen = chosen or accel.choose(settings)
    profile = image_profile(settings, image)
    size = 0
    if profile.attach.name == "nvdimm":
        check_nvdimm_image(settings, image)
        size = image.stat().st_size
    spec = VmSpec(kernel=kernel.kernel, initrd=kernel.initrd,
                  cmdline=kernel_cmdline(profile.attach.root_params, settings.boot_append),
                  image=image, accel=chosen.name, memory=settings.vm_memory, cpus=settings.vm_cpus, agent=False,
                  attach=profile.attach.name, image_size=size)
    return run_interactive(spec)
