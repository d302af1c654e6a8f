"""arm64 guests, built and boot-checked on this x86 host as users do it from the CLI (`ARCH=arm64 osbuilder
rootfs`, `image`, `kernel`, `boot --check`, `install-image`, `install-kernel`), in a WORKDIR of its own.
(pytest's `--osbuilder-arch x86_64 --osbuilder-arch arm64`, which runs a project's tests once per
architecture, is proven over two hosts in test_multihost.py.)

The rootfs's package scripts run under qemu-user (binfmt_misc), osbuilder's agent is cross-compiled,
and the boots run Debian's arm64 cloud kernel under qemu-system-aarch64 (TCG, UEFI firmware, the
image as an NVDIMM as Kata attaches it on arm64): every phase passes, from the agent's answer and
systemd's `running` to the power-off through the guest's ACPI power button.

The runtime's own agent is the Kata 1.x agent of ../shared/peers, built for arm64 from its vendored
sources with the peer's own build script (Go and the aarch64 cross compiler): the image carrying it is
refused by `install-image` until it passed its arm64 boot check, then installed byte for byte. The same
image then boots osbuilder's own arm64 kernel, cross-built by `ARCH=arm64 osbuilder kernel`, which
`install-kernel` installs only after that boot passed.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from boot_tests.agent_peers import kata_agent_for
from boot_tests.scratch import remove_later
from boot_tests.user_env import without_settings
from osbuilder import elf
from osbuilder.arch import ARM64

pytestmark = [pytest.mark.build, pytest.mark.boot, pytest.mark.xdist_group("arm64"),
              pytest.mark.skipif(platform.machine() != "x86_64", reason="an arm64 guest on an x86_64 host")]

PROGRAMS = ("qemu-system-aarch64", "qemu-aarch64-static", "aarch64-linux-gnu-gcc")
PHASES = ("kernel", "root", "init", "agent", "running", "exec", "ssh", "powerdown")


@pytest.fixture(scope="module")
def home(osbuilder_settings) -> Iterator[Path]:
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing or not Path(ARM64.firmware).is_file():
        pytest.skip(f"no {', '.join(missing) or ARM64.firmware} (`ARCH=arm64 osbuilder check-deps --install`)")
    path = Path(tempfile.mkdtemp(prefix="osbuilder-arm64-", dir="/var/tmp"))  # searchable by _apt, as WORKDIR is
    path.chmod(0o755)
    try:
        yield path
    finally:
        remove_later(path)


def user_env(settings, workdir: Path, **more: str) -> dict[str, str]:
    """A user's environment: no setting but these, the session's per-user cache and accelerator."""
    env = without_settings()
    env.update(WORKDIR=str(workdir), ARCH="arm64", ACCEL=settings.accel, CACHE_DIR=str(settings.cache_dir or ""),
               **more)
    return env


def osbuilder(env: dict[str, str], *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def passed(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def check_arm64_boot(record: dict) -> None:
    assert record["passed"] is True and record["arch"] == "arm64", record.get("failure")
    assert record["kernel"]["kind"] == "debian" and "cloud-arm64" in record["kernel"]["version"]
    assert "console=ttyAMA0" in record["kernel"]["cmdline"]
    assert record["command"][0] == "qemu-system-aarch64" and "virt,nvdimm=on" in record["command"]
    assert record["accel"]["name"] == "tcg"
    assert record["profile"] == "nvdimm"  # as Kata 2.x mounts an arm64 root: without DAX
    for phase in PHASES:
        assert record["phases"][phase] == "passed", (phase, record["phases"])
    check_pointer_authentication(record)


def check_pointer_authentication(record: dict) -> None:
    """Debian's arm64 kernel authenticates pointers, with QEMU's fast algorithm (arch.ARM64_TCG_CPU), as its
    console says."""
    console = (Path(record["log_dir"]) / "console.log").read_text(errors="replace")
    assert "CPU features: detected: Address authentication (IMP DEF algorithm)" in console, console[:3000]


@pytest.fixture(scope="module")
def kata_workdir(home, osbuilder_settings) -> dict[str, str]:
    """The environment of a user's WORKDIR holding an arm64 rootfs and image with the Kata 1.x agent, built
    for arm64 from its vendored sources with the peer's own build script (kept between runs)."""
    agent = kata_agent_for("arm64", "aarch64-linux-gnu-gcc")
    assert elf.read_elf(agent).machine == "aarch64"
    env = user_env(osbuilder_settings, home / "kata", AGENT_SOURCE_BIN=str(agent))
    passed(osbuilder(env, "rootfs"))
    passed(osbuilder(env, "image"))
    return env


def test_the_kata_agent_for_arm64_is_installed_once_its_arm64_image_passed(home, kata_workdir) -> None:
    env = kata_workdir
    dest = home / "pkg"

    refused = osbuilder(env, "install-image", "--destdir", str(dest))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "has no passing boot check" in refused.stderr, refused.stderr[-2000:]
    assert not any(dest.rglob("*.img"))

    record = json.loads(passed(osbuilder({**env, "BOOT_KERNEL": "debian"}, "boot", "--check", "--json")))
    check_arm64_boot(record)
    assert record["agent"]["protocol"] == "kata1"

    passed(osbuilder(env, "install-image", "--destdir", str(dest)))
    images = [p for p in dest.rglob("*.img") if p.is_file() and not p.is_symlink()]
    assert len(images) == 1, sorted(dest.rglob("*"))
    assert images[0].read_bytes() == (home / "kata/container.img").read_bytes()


def test_osbuilder_cross_builds_an_arm64_kernel_that_boots_the_kata_image(home, kata_workdir) -> None:
    """`ARCH=arm64 osbuilder kernel` on this x86 host: the cross-built `Image` boots the image with the
    runtime's agent through UEFI, every phase as with Debian's kernel; `install-kernel` waits for that pass."""
    env = kata_workdir
    workdir = Path(env["WORKDIR"])
    passed(osbuilder(env, "kernel"))
    meta = json.loads((workdir / "kernel-metadata.json").read_text())
    assert meta["arch"] == "arm64" and "ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-" in meta["reproduce"]["make"]
    vmlinuz = (workdir / "vmlinuz.container").read_bytes()
    assert vmlinuz[:2] == b"MZ" and vmlinuz[0x38:0x3C] == b"ARM\x64"  # an EFI-stub arm64 Image
    assert (workdir / "vmlinux.container").read_bytes() == vmlinuz
    config = (workdir / "config.container").read_text()
    assert "CONFIG_SERIAL_AMBA_PL011_CONSOLE=y" in config and "CONFIG_X86" not in config

    dest = home / "kernel-pkg"
    refused = osbuilder(env, "install-kernel", "--destdir", str(dest))
    assert refused.returncode == 2 and "has no passing boot check" in refused.stderr, refused.stderr[-2000:]

    record = json.loads(passed(osbuilder({**env, "BOOT_KERNEL": "built"}, "boot", "--check", "--json")))
    assert record["passed"] is True and record["arch"] == "arm64", record.get("failure")
    assert record["kernel"]["kind"] == "built" and record["command"][0] == "qemu-system-aarch64"
    assert record["agent"]["protocol"] == "kata1"
    for phase in PHASES:
        assert record["phases"][phase] == "passed", (phase, record["phases"])

    passed(osbuilder(env, "install-kernel", "--destdir", str(dest)))
    installed = [p for p in dest.rglob("vmlinuz-*") if p.is_file() and not p.is_symlink()]
    assert len(installed) == 1 and installed[0].read_bytes() == vmlinuz, sorted(dest.rglob("*"))
