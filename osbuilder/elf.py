"""What an executable needs to run in the guest, read from its ELF headers (no tool, no execution).

`read_elf` gives the machine it was built for, its program interpreter (a dynamically linked binary's
`ld.so`) and the shared libraries it names (`DT_NEEDED`); `missing_libraries` looks those up inside a
guest tree the way the dynamic linker would. The rootfs and image steps use it to refuse an agent
(AGENT_SOURCE_BIN) that the guest could not start: another architecture, or a library the rootfs lacks.
"""

from __future__ import annotations

import posixpath
import struct
from dataclasses import dataclass
from pathlib import Path

from osbuilder.fs import resolve_in

MACHINES = {3: "i386", 62: "x86_64", 40: "arm", 183: "aarch64", 21: "ppc64", 22: "s390x", 243: "riscv64"}
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RUNPATH, DT_RPATH = 0, 1, 5, 29, 15
MAX_HEADERS = 4096  # program headers and dynamic entries read at most: a real binary has a few dozen

# Where the guest's dynamic linker looks (Debian's multiarch directories, then the classic ones).
LIBRARY_DIRS = ("lib/{triplet}", "usr/lib/{triplet}", "lib64", "usr/lib64", "lib", "usr/lib",
                "usr/local/lib")
TRIPLETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "i386": "i386-linux-gnu",
            "ppc64": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu", "arm": "arm-linux-gnueabihf",
            "riscv64": "riscv64-linux-gnu"}


class NotElf(ValueError):
    """The file is not an ELF executable this reader understands."""


@dataclass(frozen=True)
class ElfInfo:
    machine: str  # "x86_64", "aarch64", ... ("machine N" for one not in MACHINES)
    interpreter: str | None  # the program interpreter a dynamically linked binary names
    needed: tuple[str, ...]  # DT_NEEDED: the shared libraries it asks for, in order
    runpath: tuple[str, ...] = ()  # DT_RUNPATH / DT_RPATH directories

    @property
    def static(self) -> bool:
        return self.interpreter is None and not self.needed


def read_elf(path: Path) -> ElfInfo:
    """The ELF facts of `path`. Raises NotElf for anything else (a script, a truncated file)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise NotElf(f"{path} is not an ELF executable")
    bits, order = data[4], data[5]
    if bits not in (1, 2) or order not in (1, 2):
        raise NotElf(f"{path}: unknown ELF class or byte order")
    end = "<" if order == 1 else ">"
    wide = bits == 2
    try:
        (machine,) = struct.unpack_from(end + "H", data, 18)
        if wide:
            phoff, = struct.unpack_from(end + "Q", data, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
        else:
            phoff, = struct.unpack_from(end + "I", data, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
        segments = [_segment(data, end, wide, phoff + i * phentsize) for i in range(min(phnum, MAX_HEADERS))]
        interpreter = next((_cstring(data, off, size) for kind, off, _, size in segments if kind == PT_INTERP), None)
        dynamic = next(((off, size) for kind, off, _, size in segments if kind == PT_DYNAMIC), None)
        needed, runpath = _dynamic(data, end, wide, dynamic, segments) if dynamic else ((), ())
    except struct.error:
        raise NotElf(f"{path}: truncated ELF headers") from None
    return ElfInfo(MACHINES.get(machine, f"machine {machine}"), interpreter, needed, runpath)


def _segment(data: bytes, end: str, wide: bool, at: int) -> tuple[int, int, int, int]:
    """(type, file offset, virtual address, file size) of one program header."""
    if wide:
        kind, _, offset, vaddr, _, filesz = struct.unpack_from(end + "IIQQQQ", data, at)
    else:
        kind, offset, vaddr, _, filesz = struct.unpack_from(end + "IIIII", data, at)
    return kind, offset, vaddr, filesz


def _dynamic(data: bytes, end: str, wide: bool, where: tuple[int, int],
             segments: list[tuple[int, int, int, int]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    entry = struct.Struct(end + ("qQ" if wide else "iI"))
    offset, size = where
    tags: list[tuple[int, int]] = []
    for i in range(min(size // entry.size, MAX_HEADERS)):
        tag, value = entry.unpack_from(data, offset + i * entry.size)
        if tag == DT_NULL:
            break
        tags.append((tag, value))
    strtab = next((value for tag, value in tags if tag == DT_STRTAB), None)
    if strtab is None:
        return (), ()
    base = _file_offset(strtab, segments)

    def string(value: int) -> str:
        return _cstring(data, base + value, len(data) - base - value)

    needed = tuple(string(v) for t, v in tags if t == DT_NEEDED)
    runpath = tuple(d for t, v in tags if t in (DT_RUNPATH, DT_RPATH) for d in string(v).split(":") if d)
    return needed, runpath


def _file_offset(vaddr: int, segments: list[tuple[int, int, int, int]]) -> int:
    for kind, offset, start, size in segments:
        if kind == PT_LOAD and start <= vaddr < start + size:
            return offset + vaddr - start
    raise struct.error("the string table is in no loaded segment")


def _cstring(data: bytes, offset: int, size: int) -> str:
    raw = data[offset:offset + max(0, size)]
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def missing_libraries(info: ElfInfo, tree: Path) -> list[str]:
    """The libraries `info` needs (and its interpreter) that the guest tree `tree` does not have where
    the dynamic linker looks (symlinks followed inside the tree)."""
    triplet = TRIPLETS.get(info.machine, "")
    dirs = [*info.runpath, *(d.format(triplet=triplet) for d in LIBRARY_DIRS if triplet or "{" not in d)]
    missing = [lib for lib in info.needed if not any(resolve_in(tree, posixpath.join(d, lib)) for d in dirs)]
    if info.interpreter and resolve_in(tree, info.interpreter) is None:
        missing.insert(0, info.interpreter)
    return missing
