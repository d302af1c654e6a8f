"""Guest architectures: what osbuilder needs to know of each, in one record per architecture.

ARCH (default: the host's) picks the record. A step asks its record instead of naming x86 things:
the rootfs asks for Debian's architecture name and the C cross compiler, the image step checks that
`/sbin/init` and the agent were built for `machine`, and the kernel and boot steps take the QEMU
binary, machine, console and kernel image from it. An architecture whose `unsupported` says why is
known by name, so ARCH=s390x is refused with that reason rather than as an unknown name.

For arm64, Kata runs QEMU's `virt` machine and attaches the image as an NVDIMM, which QEMU describes
to the guest in ACPI, so the guest boots through UEFI firmware (Kata's AAVMF; Debian's
qemu-efi-aarch64 here, which also carries the SMBIOS credentials and the ACPI power button); Kata 2.x
mounts that root without DAX on arm64. The serial console is the PL011, `ttyAMA0`. The kernel's boot
image is `Image`, installed under both of the runtime's names (vmlinuz.container, vmlinux.container):
through UEFI, QEMU boots an EFI-stub `Image`, not an ELF vmlinux. Kata runs arm64 guests under KVM
only (`-cpu host`); under TCG the guest gets QEMU's `max` CPU, as virt's default is a 32-bit one, with
QEMU's fast implementation-defined pointer-authentication algorithm (ARM64_TCG_CPU).
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass

from osbuilder.errors import UsageError

NOT_YET = "osbuilder builds and boots x86_64 and arm64 guests only so far"


@dataclass(frozen=True)
class Arch:
    """One guest architecture."""

    name: str  # what ARCH takes: "x86_64", "arm64"
    machine: str  # what `uname -m` and an ELF header call it: "x86_64", "aarch64"
    debian: str  # Debian's architecture name: "amd64", "arm64"
    qemu: str  # the system emulator
    qemu_package: str  # the Debian package that ships it
    qemu_machine: str  # QEMU's -machine for boot checks
    tcg_cpu: str  # QEMU's -cpu under TCG ("" for QEMU's default)
    console: str  # the serial console's kernel device
    kernel_arch: str  # the kernel's ARCH= (and arch/<kernel_arch>/ in its tree)
    kernel_target: str  # the make target of the boot image
    kernel_image: str  # that image, relative to the object tree (installed as vmlinuz.container)
    kernel_vmlinux: str  # what is installed as vmlinux.container, relative to the object tree
    kernel_fragments: tuple[str, ...]  # osbuilder's kernel fragments for this architecture (configs/)
    cross_prefix: str  # CROSS_COMPILE for this guest on another host
    cross_packages: tuple[str, ...]  # Debian packages that give the cross compiler and C library
    firmware: str  # the firmware QEMU boots with ("" for its built-in one)
    firmware_package: str
    debian_kernel: str  # Debian's cloud kernel metapackage (the boot check's distro kernel)
    root_dax: bool = True  # the runtime mounts an NVDIMM root with DAX here (Kata 2.x on arm64: no)
    kvm_probe: bool = False  # osbuilder's KVM probe guest (vm/kvm_probe.S) is this architecture's code
    unsupported: str = ""  # why ARCH cannot be this yet (empty: it can)

    @property
    def native(self) -> bool:
        """This host runs the architecture's programs itself (no qemu-user)."""
        return self.machine == platform.machine()

    def gcc(self) -> str:
        """The C compiler that makes this architecture's programs on this host."""
        return "gcc" if self.native else f"{self.cross_prefix}gcc"

    def cross_compile(self) -> str:
        """The kernel's CROSS_COMPILE on this host ("" when native)."""
        return "" if self.native else self.cross_prefix

    def require_compiler(self, what: str) -> str:
        """`gcc()`, or one line naming the packages that give it."""
        cc = self.gcc()
        if shutil.which(cc) is None:
            packages = " ".join(self.cross_packages) if not self.native else "gcc libc6-dev"
            raise UsageError(f"ARCH: {self.name}: {what} needs the C compiler {cc}, which is not installed "
                             f"(apt-get install {packages}, or `osbuilder check-deps --install`)")
        return cc


# QEMU's `max` CPU signs and checks pointers (PACIASP/AUTIASP in nearly every function of Debian's arm64
# kernel) with the architected QARMA5 cipher, which TCG computes in software at great cost. QEMU's own
# implementation-defined algorithm keeps pointer authentication in the guest ("Address authentication
# (IMP DEF algorithm)" on its console) at a fraction of the cost: a boot check took 0.37x the time and
# the CPU here (bench/bench_arm64_tcg_cpu.py).
ARM64_TCG_CPU = "max,pauth-impdef=on"

X86_64 = Arch(
    name="x86_64", machine="x86_64", debian="amd64",
    qemu="qemu-system-x86_64", qemu_package="qemu-system-x86", qemu_machine="q35", tcg_cpu="",
    console="ttyS0", kernel_arch="x86", kernel_target="bzImage", kernel_image="arch/x86/boot/bzImage",
    kernel_vmlinux="vmlinux", kernel_fragments=("serial", "kvm-guest", "x86"),
    cross_prefix="x86_64-linux-gnu-", cross_packages=("gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"),
    firmware="", firmware_package="", debian_kernel="linux-image-cloud-amd64", kvm_probe=True,
)
ARM64 = Arch(
    name="arm64", machine="aarch64", debian="arm64",
    qemu="qemu-system-aarch64", qemu_package="qemu-system-arm", qemu_machine="virt", tcg_cpu=ARM64_TCG_CPU,
    console="ttyAMA0", kernel_arch="arm64", kernel_target="Image", kernel_image="arch/arm64/boot/Image",
    kernel_vmlinux="arch/arm64/boot/Image", kernel_fragments=("serial-pl011", "arm64"),
    cross_prefix="aarch64-linux-gnu-", cross_packages=("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"),
    firmware="/usr/share/qemu-efi-aarch64/QEMU_EFI.fd", firmware_package="qemu-efi-aarch64",
    debian_kernel="linux-image-cloud-arm64", root_dax=False,
)


def _not_yet(name: str, machine: str, debian: str) -> Arch:
    return Arch(name=name, machine=machine, debian=debian, qemu="", qemu_package="", qemu_machine="", tcg_cpu="",
                console="", kernel_arch="", kernel_target="", kernel_image="", kernel_vmlinux="",
                kernel_fragments=(), cross_prefix="", cross_packages=(),
                firmware="", firmware_package="", debian_kernel="", unsupported=f"not supported yet ({NOT_YET})")


ARCHES: dict[str, Arch] = {a.name: a for a in (
    X86_64, ARM64, _not_yet("s390x", "s390x", "s390x"), _not_yet("ppc64le", "ppc64le", "ppc64el"))}
ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "aarch64": "arm64", "ppc64el": "ppc64le"}


def names() -> tuple[str, ...]:
    return tuple(name for name, a in ARCHES.items() if not a.unsupported)


def lookup(name: str) -> Arch:
    """The record ARCH names (an alias such as aarch64 or amd64 too); one line for anything else,
    or for an architecture osbuilder cannot build for yet."""
    key = name.strip().lower()
    found = ARCHES.get(ALIASES.get(key, key))
    if found is None:
        raise UsageError(f"ARCH: unknown architecture {name!r}; known: {', '.join(names())}")
    if found.unsupported:
        raise UsageError(f"ARCH: {found.name}: {found.unsupported}")
    return found



def host() -> Arch:
    """The record of the machine osbuilder runs on."""
    machine = platform.machine()
    found = of_machine(machine)
    if found is not None and not found.unsupported:
        return found
    raise UsageError(f"ARCH: this host is {machine!r}, which osbuilder has no record of; set ARCH to one of "
                     f"{', '.join(names())}")


def of_machine(machine: str) -> Arch | None:
    """The record whose ELF/uname machine is `machine`."""
    return next((a for a in ARCHES.values() if a.machine == machine), None)
