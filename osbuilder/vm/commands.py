"""`osbuilder boot`: boot the current image interactively, or `--check` it and print the timings.

Exit codes (through the CLI): 0 the check passed, 1 the image or kernel failed a check,
125 an infrastructure failure (e.g. KVM internal error), 2 a usage error (no image yet).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from pathlib import Path
from typing import Any

from osbuilder.cache import Cache
from osbuilder.errors import UsageError
from osbuilder.settings import Settings
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import bootcheck, ssh
from osbuilder.vm.debian_kernel import BootKernel, debian_kernel
from osbuilder.vm.qemu import VmSpec, kernel_cmdline, run_interactive

log = logging.getLogger("osbuilder")

BUILT_KERNEL = "vmlinuz.container"


def boot_kernel(settings: Settings, path: Path | None = None, cache: Cache | None = None) -> BootKernel:
    """The kernel to boot: --kernel PATH, else BOOT_KERNEL (auto: built if present, else Debian's)."""
    choice = settings.boot_kernel.strip() or "auto"
    if path is None and choice not in ("auto", "built", "debian"):
        path = Path(choice).expanduser()
    if path is not None:
        if not path.is_file():
            raise UsageError(f"BOOT_KERNEL: {path} is not a file")
        return BootKernel(path.absolute(), None, "path")
    built = settings.workdir / BUILT_KERNEL
    if choice == "built" or (choice == "auto" and built.is_file()):
        if not built.is_file():
            raise UsageError(f"BOOT_KERNEL=built: {built} does not exist; run `osbuilder kernel` first")
        return BootKernel(built.absolute(), None, "built")
    return debian_kernel(settings, cache)


def boot_image(settings: Settings) -> Path:
    image = (settings.boot_image or settings.workdir / "container.img").absolute()
    if not image.is_file():
        raise UsageError(f"BOOT_IMAGE: {image} does not exist; run `osbuilder rootfs && osbuilder image` first")
    return image


def log_dir_for(settings: Settings, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:100] or "boot"
    return (settings.workdir / "boot-logs" / safe).absolute()


def check_options(settings: Settings, image: Path, kernel: BootKernel, log_dir: Path,
                  key: ssh.SessionKey | None, name: str) -> bootcheck.BootOptions:
    return bootcheck.BootOptions(
        image=image, kernel=kernel, log_dir=log_dir, accel=accel_mod.choose(settings, kernel),
        memory=settings.vm_memory, cpus=settings.vm_cpus, timeout=settings.boot_timeout,
        append=settings.boot_append, ssh_key=key, name=name, agent_init=settings.agent_init)


def format_timings(record: dict[str, Any]) -> str:
    lines = [f"boot check {'PASSED' if record['passed'] else 'FAILED'}: {record['image']}",
             f"  kernel: {record['kernel']['kind']} {record['kernel']['version'] or record['kernel']['path']}",
             f"  accel:  {record['accel']['name']} ({record['accel']['reason']})",
             "  phase timings (seconds since QEMU start):"]
    lines += [f"    {name:<22} {at:8.2f}" for name, at in record["timings"].items()]
    if record.get("guest_startup"):
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in record["guest_startup"].items())
        lines.append(f"  systemd-analyze: {parts}")
    lines.append(f"  logs: {record['log_dir']}")
    return "\n".join(lines)


def run_boot_check(settings: Settings, image: Path, kernel: BootKernel, name: str = "osbuilder-boot-check",
                   key_dir: Path | None = None) -> dict[str, Any]:
    """The full boot check of `image` with `kernel`; writes boot records when it passes."""
    import tempfile

    log_dir = log_dir_for(settings, name)
    with tempfile.TemporaryDirectory(prefix="osb-key-") as tmp:
        key = ssh.make_session_key(key_dir or Path(tmp))
        opts = check_options(settings, image, kernel, log_dir, key, name)
        return bootcheck.with_kvm_fallback(opts, settings, lambda o: bootcheck.run_check(o, settings))


def _terminate_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every guest is powered off and its temp dir removed."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def boot(settings: Settings, args: Any) -> int:
    """`osbuilder boot [--check] [--kernel PATH]`."""
    _terminate_as_interrupt()
    image = boot_image(settings)
    kernel = boot_kernel(settings, getattr(args, "boot_kernel_path", None))
    if getattr(args, "check", False):
        record = run_boot_check(settings, image, kernel)
        print(format_timings(record))
        return 0
    accel = accel_mod.choose(settings, kernel)
    spec = VmSpec(kernel=kernel.kernel, initrd=kernel.initrd, cmdline=kernel_cmdline(settings.boot_append),
                  image=image, accel=accel.name, memory=settings.vm_memory, cpus=settings.vm_cpus, agent=False)
    return run_interactive(spec)
