"""ARCH: the records of guest architectures and what each step takes from them, without building or booting
(boot_tests/test_arm64.py builds and boots an arm64 guest for real)."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import pytest
from vmstubs import load_settings, opt_value, spec

from osbuilder import arch, cli, install
from osbuilder import settings as settings_mod
from osbuilder.arch import ARM64, X86_64
from osbuilder.errors import UsageError
from osbuilder.fs import sha256_file
from osbuilder.image import check_tree
from osbuilder.layout import KernelFiles, Workdir
from osbuilder.rootfs import foreign
from osbuilder.vm import accel, check, qemu

on_x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="written for an x86_64 host")

# What /proc/sys/fs/binfmt_misc/qemu-aarch64 holds once qemu-user-static's handler is registered.
QEMU_AARCH64 = """enabled
interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P
flags: {flags}
offset 0
magic 7f454c460201010000000000000000000200b700
mask ffffffffffffff00fffffffffffffffffeffffff
"""
RULE = (r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:"
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:"
        r"/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF")


def test_arch_takes_the_names_users_know_and_refuses_the_rest_in_one_line() -> None:
    assert arch.lookup("aarch64") is ARM64 and arch.lookup("ARM64") is ARM64
    assert arch.lookup("amd64") is X86_64 and arch.lookup(" x86_64 ") is X86_64
    with pytest.raises(UsageError, match=r"^ARCH: s390x: not supported yet \(osbuilder builds and boots x86_64 and "
                                         r"arm64 guests only so far\)$"):
        arch.lookup("s390x")
    with pytest.raises(UsageError, match=r"^ARCH: unknown architecture 'riscv64'; known: x86_64, arm64$"):
        arch.lookup("riscv64")
    assert arch.names() == ("x86_64", "arm64")
    assert arch.of_machine(platform.machine()) is arch.host()
    assert settings_mod.load({}, env={}).arch == arch.host().name  # the default: the host's
    assert settings_mod.load({}, env={"ARCH": "aarch64"}).guest is ARM64


@on_x86
def test_another_architecture_is_built_with_its_cross_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    assert X86_64.native and X86_64.gcc() == "gcc" and X86_64.cross_compile() == ""
    assert not ARM64.native and ARM64.gcc() == "aarch64-linux-gnu-gcc"
    assert ARM64.cross_compile() == "aarch64-linux-gnu-"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError) as e:
        ARM64.require_compiler("the agent")
    assert e.value.message == ("ARCH: arm64: the agent needs the C compiler aarch64-linux-gnu-gcc, which is not "
                               "installed (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross, or "
                               "`osbuilder check-deps --install`)")


@on_x86
def test_check_deps_asks_for_what_an_arm64_guest_needs(tmp_path: Path) -> None:
    s = load_settings(tmp_path, ARCH="arm64")
    rootfs = {t.program: t.package for t in cli.rootfs_tools(s)}
    assert rootfs["aarch64-linux-gnu-gcc"] == "gcc-aarch64-linux-gnu" and "cc" not in rootfs
    assert rootfs["qemu-aarch64-static"] == "qemu-user-static"
    assert "libc6-dev-arm64-cross" in cli.rootfs_packages(s)
    boot = {t.program: t.package for t in cli.boot_tools(s)}
    assert boot["qemu-system-aarch64"] == "qemu-system-arm" and "qemu-system-x86_64" in boot  # and the probe's
    assert "qemu-efi-aarch64" in cli.boot_packages(s)
    assert "qemu-system-aarch64" not in {t.program for t in cli.boot_tools(load_settings(tmp_path))}
    assert rootfs["arch-test"] == "arch-test"  # mmdebstrap refuses a foreign tree without it
    kernel = {t.program: t.package for t in cli.kernel_tools(s)}
    assert kernel["aarch64-linux-gnu-gcc"] == "gcc-aarch64-linux-gnu" and "make" in kernel
    assert "aarch64-linux-gnu-gcc" not in {t.program for t in cli.kernel_tools(load_settings(tmp_path))}


def binfmt(tmp_path: Path, **entries: str) -> Path:
    root = tmp_path / "binfmt_misc"
    root.mkdir(parents=True)
    (root / "status").write_text("enabled\n")
    (root / "register").write_text("")
    for name, text in entries.items():
        (root / name.replace("_", "-")).write_text(text)
    return root


def test_the_handler_that_runs_arm64_programs_is_found_by_its_magic(tmp_path: Path) -> None:
    root = binfmt(tmp_path, qemu_aarch64=QEMU_AARCH64.format(flags="PF"),
                  python3_11="enabled\ninterpreter /usr/bin/python3.11\nflags: \noffset 0\nmagic a70d0d0a\n")
    found = foreign.handler_for(ARM64, root)
    assert found is not None and found.name == "qemu-aarch64" and found.flags == "PF"
    assert foreign.handler_for(X86_64, root) is None
    (root / "qemu-aarch64").write_text(QEMU_AARCH64.format(flags="PF").replace("enabled", "disabled"))
    assert foreign.handler_for(ARM64, root) is None
    (root / "status").write_text("disabled\n")
    assert foreign.handler_for(ARM64, binfmt(tmp_path / "x", qemu_aarch64=QEMU_AARCH64)) is not None
    assert foreign.handler_for(ARM64, root) is None


@on_x86
def test_a_host_that_cannot_run_arm64_programs_is_told_what_to_do(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "log"
    foreign.ensure(X86_64, log)  # the host's own: nothing to do
    root = binfmt(tmp_path, qemu_aarch64=QEMU_AARCH64.format(flags="P"))
    monkeypatch.setattr(foreign, "BINFMT", root)
    with pytest.raises(UsageError, match="^ARCH: arm64: binfmt_misc's qemu-aarch64 runs aarch64 programs without "
                                         "the F flag"):
        foreign.ensure(ARM64, log)
    (root / "qemu-aarch64").unlink()
    rules = tmp_path / "binfmt.d"
    rules.mkdir()
    monkeypatch.setattr(foreign, "BINFMT_D", (rules,))
    with pytest.raises(UsageError, match=r"no qemu-user handler in binfmt_misc, no qemu-aarch64.conf in "
                                         r"/usr/lib/binfmt.d\); as root, install qemu-user-static"):
        foreign.ensure(ARM64, log)
    (rules / "qemu-aarch64.conf").write_text(f"# qemu-user-static\n{RULE}\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="qemu-user-static is installed but its handler is not registered"):
        foreign.ensure(ARM64, log)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    written: list[str] = []

    def register(a: arch.Arch, rule: str, logfile: Path) -> None:  # what the kernel does on a write to register
        written.append(rule)
        (root / "qemu-aarch64").write_text(QEMU_AARCH64.format(flags="POF"))

    monkeypatch.setattr(foreign, "register", register)
    foreign.ensure(ARM64, log)
    assert written == [RULE]


def test_an_arm64_guest_boots_on_qemus_virt_machine_with_uefi_and_the_pl011_console() -> None:
    cmd = qemu.build_command(spec(arch=ARM64, accel="tcg", cpus=2,
                                  cmdline=qemu.kernel_cmdline("root=/dev/vda1", guest=ARM64)),
                             qemu.VmPaths(Path("/tmp/osb-x")))
    assert cmd[0] == "qemu-system-aarch64"
    # QEMU's max CPU, its pointer authentication by QEMU's own algorithm (QARMA5: 2.7x the CPU under TCG)
    assert opt_value(cmd, "-machine") == ["virt"] and opt_value(cmd, "-cpu") == ["max,pauth-impdef=on"]
    assert opt_value(cmd, "-bios") == ["/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"]
    assert "console=ttyAMA0" in opt_value(cmd, "-append")[0].split()
    x86 = qemu.build_command(spec(), qemu.VmPaths(Path("/tmp/osb-x")))
    assert x86[0] == "qemu-system-x86_64" and opt_value(x86, "-machine") == ["q35"] and "-bios" not in x86
    assert "console=ttyS0" in opt_value(x86, "-append")[0].split()


@on_x86
def test_an_arm64_guest_runs_under_tcg_without_a_kvm_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(*args: object) -> None:
        raise AssertionError("the KVM probe ran for a guest KVM cannot run")

    monkeypatch.setattr(accel, "probe_kvm", no_probe)
    chosen = accel.choose(load_settings(tmp_path, ARCH="arm64"))
    assert (chosen.name, chosen.reason) == ("tcg", "ARCH=arm64 is not this host's architecture")
    with pytest.raises(UsageError, match="^ACCEL=kvm: ARCH=arm64 is not this host's architecture; use ACCEL=auto"):
        accel.choose(load_settings(tmp_path, ARCH="arm64", ACCEL="kvm"))


def test_a_pass_for_one_architecture_does_not_install_an_image_for_another(tmp_path: Path) -> None:
    arm = load_settings(tmp_path, ARCH="arm64")
    x86_pass = {"nvdimm": {"profile": "nvdimm-dax", "with": ["k"], "agent_protocol": "kata1", "arch": "x86_64"}}
    assert install.image_lacks(arm, x86_pass) == "passing boot check for ARCH=arm64 (the one it has is for x86_64)"
    before_arch = {"nvdimm": {"profile": "nvdimm-dax", "with": ["k"], "agent_protocol": "kata1"}}
    assert install.image_lacks(arm, before_arch) is not None  # a record from before ARCH proved an x86_64 guest
    arm_pass = {"nvdimm": {**x86_pass["nvdimm"], "arch": "arm64"}}
    assert install.image_lacks(arm, arm_pass) is None
    assert install.initrd_lacks(arm, {"initrd": arm_pass["nvdimm"]}) is None


def test_a_kernel_is_installed_for_arch_only_with_a_pass_for_arch(tmp_path: Path) -> None:
    """install-kernel: the pass with this WORKDIR's image must also be for ARCH (an arm64 kernel's pass does
    not make it an x86_64 kernel, however the settings name it)."""
    x86 = load_settings(tmp_path)
    image = Workdir.of(x86).image
    image.parent.mkdir(parents=True)
    image.write_bytes(b"an image")
    arm_pass = {"nvdimm": {"profile": "nvdimm", "with": [sha256_file(image)], "arch": "arm64"}}
    assert install.kernel_lacks(x86.with_values(ARCH="arm64"), arm_pass) is None
    assert install.kernel_lacks(x86.with_values(ARCH="x86_64"), arm_pass) == (
        "passing boot check for ARCH=x86_64 (the one it has is for arm64)")


def test_a_kernel_built_for_another_architecture_is_not_booted_for_arm64(tmp_path: Path) -> None:
    s = load_settings(tmp_path, ARCH="arm64", BOOT_KERNEL="built")
    files = KernelFiles(Workdir.of(s).root)
    files.dir.mkdir(parents=True)
    files.vmlinuz.write_bytes(b"MZ a bzImage")
    files.metadata.write_text(json.dumps({"kernel_version": "6.1.0", "arch": "x86_64"}))
    with pytest.raises(UsageError, match=r"^BOOT_KERNEL=built: .* is a kernel for x86_64, not ARCH=arm64"):
        check.boot_kernel(s)
    files.metadata.write_text(json.dumps({"kernel_version": "6.1.0", "arch": "arm64"}))
    assert check.boot_kernel(s).kernel == files.vmlinuz.absolute()
    files.metadata.unlink()  # a build from before ARCH was an x86_64 one
    assert check.built_arch(files.vmlinuz) == "x86_64"


def test_the_image_step_names_arch_for_a_rootfs_of_another_architecture(tmp_path: Path) -> None:
    tree = tmp_path / "rootfs"
    (tree / "usr/sbin").mkdir(parents=True)
    init = tree / "usr/sbin/init"
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    header[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    init.write_bytes(bytes(header))
    (tree / "sbin").symlink_to("usr/sbin")
    other = "x86_64" if platform.machine() == "aarch64" else "arm64"
    mine = "arm64" if other == "x86_64" else "x86_64"
    if mine == "x86_64":
        with pytest.raises(UsageError) as e:
            check_tree(tree, load_settings(tmp_path))
        assert e.value.message == (f"ARCH: the rootfs at {tree} is built for aarch64 (its /sbin/init), but ARCH is "
                                   "x86_64; set ARCH=arm64 (the rootfs's) or rebuild the rootfs with `osbuilder "
                                   "rootfs`")
    with pytest.raises(UsageError, match="^rootfs: agent osbuilder-agent is missing"):  # past the ARCH check
        check_tree(tree, load_settings(tmp_path, ARCH="arm64"))
