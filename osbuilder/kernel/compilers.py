"""The kernel build's two compilers, through ccache-gcc (see there) when ccache is installed: CC, the
guest architecture's gcc that compiles the kernel, and HOSTCC, this host's gcc that compiles the programs
kbuild runs while it builds (Kconfig's conf, fixdep, modpost, kallsyms, ...). Every new object tree
compiles those programs again, even to configure a kernel; through ccache they are hits like the
kernel's own files."""

from __future__ import annotations

import shutil
from pathlib import Path

from osbuilder.arch import Arch
from osbuilder.run import tool_version

CCACHE_GCC = Path(__file__).with_name("ccache-gcc")  # `ccache gcc` with the source tree's path made relative


def through_ccache(gcc: str) -> str:
    """How make is to call `gcc`: through ccache-gcc when ccache is installed, else as it is."""
    return f"bash {CCACHE_GCC} {gcc}" if shutil.which("ccache") else gcc


def compiler(guest: Arch | None = None) -> tuple[str, str]:
    """The CC make variable for a kernel of `guest` (default: this host's), and that gcc's version line."""
    gcc = guest.gcc() if guest is not None else "gcc"
    return through_ccache(gcc), tool_version(gcc)


def host_compiler() -> str:
    """The HOSTCC make variable: this host's gcc (kbuild's default), whatever the guest's architecture."""
    return through_ccache("gcc")
