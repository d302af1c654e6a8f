"""Images broken on purpose must be caught fast, in the right phase, with the evidence, and leave no QEMU.

Each broken image is a sparse copy of the session image changed with debugfs (no mounts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boot_tests import imagetools
from osbuilder.layout import Workdir
from osbuilder.vm.check import boot_to_ready
from osbuilder.vm.guest import BOOT_JSON, BootFailure

pytestmark = pytest.mark.boot

FAILING_UNIT = "osbuilder-test-fails.service"


def assert_no_qemu(pid: int | None) -> None:
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_missing_init_is_caught_by_cli(osbuilder_image, osbuilder_settings, tmp_path: Path) -> None:
    broken = imagetools.copy_image(osbuilder_image.path, tmp_path / "no-init.img")
    imagetools.remove_file(broken, "/usr/sbin/init")
    assert not imagetools.exists(broken, "/usr/sbin/init")
    env = {**os.environ, "WORKDIR": str(osbuilder_settings.workdir), "BOOT_IMAGE": str(broken),
           "BOOT_KERNEL": osbuilder_settings.boot_kernel, "ACCEL": osbuilder_settings.accel}
    if osbuilder_settings.cache_dir:  # the same Debian kernel and KVM verdict as the session's
        env["CACHE_DIR"] = str(osbuilder_settings.cache_dir)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "osbuilder", "boot", "--check"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "phase 'init'" in proc.stderr and "no init to run" in proc.stderr
    # Debian's initramfs says so; a kernel without initrd falls back to /etc/init, /bin/init, /bin/sh
    assert any(line in proc.stderr for line in ("doesn't have requested /sbin/init", "No working init found",
                                                "Run /etc/init as init process"))
    assert "console tail:" in proc.stderr and "logs: " in proc.stderr
    assert time.monotonic() - started < osbuilder_settings.boot_timeout
    record = json.loads((Workdir.of(osbuilder_settings).boot_log("osbuilder-boot-check") / BOOT_JSON).read_text())
    assert record["passed"] is False and record["phases"]["init"] == "failed: no init to run"
    assert_no_qemu(record["qemu_pid"])


def test_missing_agent_is_caught(osbuilder_image, osbuilder_boot_guest, tmp_path: Path) -> None:
    broken = imagetools.copy_image(osbuilder_image.path, tmp_path / "no-agent.img")
    imagetools.remove_file(broken, "/usr/bin/osbuilder-agent")
    guest = osbuilder_boot_guest(broken)
    with pytest.raises(BootFailure) as info:
        boot_to_ready(guest)
    assert info.value.phase == "agent"
    assert "osbuilder-agent" in str(info.value)
    # named as soon as systemd said so on the console, not after waiting for an answer (about 20 s more)
    assert "status 203/EXEC, the program is missing" in info.value.reason, info.value.reason
    guest.close()
    assert_no_qemu(guest.vm.pid)


def test_failing_unit_degrades_and_is_named(osbuilder_image, osbuilder_boot_guest, tmp_path: Path) -> None:
    broken = imagetools.copy_image(osbuilder_image.path, tmp_path / "failing-unit.img")
    imagetools.add_file(broken, f"/etc/systemd/system/{FAILING_UNIT}",
                        "[Unit]\nDescription=osbuilder test: a unit that fails\n\n"
                        "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo failing on purpose; exit 3'\n\n"
                        "[Install]\nWantedBy=multi-user.target\n")
    imagetools.add_symlink(broken, f"/etc/systemd/system/multi-user.target.wants/{FAILING_UNIT}",
                           f"/etc/systemd/system/{FAILING_UNIT}")
    guest = osbuilder_boot_guest(broken)
    with pytest.raises(BootFailure) as info:
        boot_to_ready(guest)
    assert info.value.phase == "running"
    assert "degraded" in info.value.message and FAILING_UNIT in info.value.message
    assert "failing on purpose" in info.value.detail  # the unit's journal lines
    guest.close()
    assert_no_qemu(guest.vm.pid)


def test_wrong_root_is_caught(osbuilder_image, osbuilder_boot_guest) -> None:
    # rootdelay: the initramfs gives up after 5 s instead of 30 (the later root= wins)
    guest = osbuilder_boot_guest(osbuilder_image.path, append="root=/dev/vdz1 rootdelay=5")
    started = time.monotonic()
    with pytest.raises(BootFailure) as info:
        boot_to_ready(guest)
    # Debian's kernel drops to its initramfs shell; osbuilder's own kernel (no initrd) panics
    assert info.value.phase == "root" and "root filesystem not found" in info.value.reason
    assert "vdz1" in str(info.value)
    assert time.monotonic() - started < 60
    guest.close()
    assert_no_qemu(guest.vm.pid)
