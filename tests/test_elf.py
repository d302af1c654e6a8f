"""elf.py and the agent checks built on it: an AGENT_SOURCE_BIN the guest could not start is refused in
one line (exit 2) at rootfs or image time, naming the library and the package that ships it."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from osbuilder import cli, elf
from osbuilder.arch import ARM64, X86_64
from osbuilder.errors import UsageError
from osbuilder.rootfs.build import check_agent_runs, check_machine
from osbuilder.rootfs.debian import Debian

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
CC_AGENT = PEERS / "cc-agent-3.x" / "cc-agent"
KATA_AGENT = PEERS / "kata-agent-1.x" / "kata-agent"
needs_peers = pytest.mark.skipif(not CC_AGENT.is_file(), reason=f"the real runtime agents are not here ({PEERS})")


def elf_header(machine: int) -> bytes:
    """The first 64 bytes of a 64-bit little-endian executable for `machine`, no program headers."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, 0, 64, 56, 0, 64, 0, 0)


def test_the_host_programs_read_back_as_the_loader_sees_them() -> None:
    ls = elf.read_elf(Path(shutil.which("ls") or "/bin/ls"))
    assert ls.machine == "x86_64" and ls.interpreter == "/lib64/ld-linux-x86-64.so.2" and "libc.so.6" in ls.needed
    assert not ls.static


@needs_peers
def test_the_real_agents() -> None:
    cc = elf.read_elf(CC_AGENT)
    assert (cc.machine, cc.needed) == ("x86_64", ("libudev.so.1", "libc.so.6"))
    kata = elf.read_elf(KATA_AGENT)
    assert kata.machine == "x86_64" and kata.static


def test_what_is_not_elf(tmp_path: Path) -> None:
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\nexec sleep 1\n")
    with pytest.raises(elf.NotElf):
        elf.read_elf(script)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(elf_header(62)[:40])
    with pytest.raises(elf.NotElf):
        elf.read_elf(truncated)


def guest_tree(root: Path, *libs: str) -> Path:
    """A tree with Debian's merged /usr: /lib -> usr/lib, the loader and `libs` in the multiarch directory."""
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib64").mkdir()
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").symlink_to("usr/lib64")
    (root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").write_bytes(b"")
    (root / "usr/lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    for lib in libs:
        (root / "usr/lib/x86_64-linux-gnu" / lib).write_bytes(b"")
    (root / "usr/bin").mkdir()
    return root


def test_libraries_are_looked_up_inside_the_tree(tmp_path: Path) -> None:
    info = elf.ElfInfo("x86_64", "/lib64/ld-linux-x86-64.so.2", ("libudev.so.1", "libc.so.6"))
    tree = guest_tree(tmp_path / "tree", "libc.so.6")
    assert elf.missing_libraries(info, tree) == ["libudev.so.1"]
    (tree / "usr/lib/x86_64-linux-gnu/libudev.so.1").symlink_to("/usr/lib/x86_64-linux-gnu/libudev.so.1.7.5")
    assert elf.missing_libraries(info, tree) == ["libudev.so.1"]  # a dangling link inside the tree is missing
    (tree / "usr/lib/x86_64-linux-gnu/libudev.so.1.7.5").write_bytes(b"")
    assert elf.missing_libraries(info, tree) == []
    (tree / "usr/lib64/ld-linux-x86-64.so.2").unlink()
    assert elf.missing_libraries(info, tree) == ["/lib64/ld-linux-x86-64.so.2"]


@needs_peers
def test_an_agent_whose_library_the_rootfs_lacks_is_refused_naming_it(tmp_path: Path) -> None:
    tree = guest_tree(tmp_path / "tree", "libc.so.6")
    shutil.copy2(CC_AGENT, tree / "usr/bin/cc-agent")
    with pytest.raises(UsageError) as e:
        check_agent_runs(tree, "cc-agent", Debian(), X86_64)
    assert e.value.message == ("AGENT_SOURCE_BIN: the agent cc-agent needs libudev.so.1, which the rootfs does not "
                               "have (debian's libudev1 ships libudev.so.1: add libudev1 to EXTRA_PKGS)")
    (tree / "usr/lib/x86_64-linux-gnu/libudev.so.1").write_bytes(b"")
    check_agent_runs(tree, "cc-agent", Debian(), X86_64)  # now it can start


def test_an_agent_for_another_machine_is_refused_before_anything_is_built(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    arm = tmp_path / "kata-agent"
    arm.write_bytes(elf_header(183))
    arm.chmod(0o755)
    wd = tmp_path / "wd"
    assert cli.main(["rootfs", "--workdir", str(wd), "--agent-source-bin", str(arm)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "osbuilder: error: AGENT_SOURCE_BIN: the agent kata-agent is built for aarch64, but the guest is x86_64 "
        "(ARCH=x86_64)")
    check_machine(elf.read_elf(arm), "kata-agent", ARM64)  # the guest it is built for takes it
    assert not (wd / "rootfs").exists()
