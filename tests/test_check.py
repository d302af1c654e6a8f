"""check.py: what a boot runs with, the order of phases, the KVM fallback, and what `osbuilder boot` boots."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from vmstubs import (
    load_settings,
    stub_guest,
)

from osbuilder import settings as settings_mod
from osbuilder.errors import InfrastructureError, UsageError
from osbuilder.layout import UserCache, Workdir
from osbuilder.vm import accel, attachments, check, phases, profiles
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import Accel, BootKernel, BootOptions, Budget, Budgets
from osbuilder.vm.profiles import AGENT_INIT, SYSTEMD, Outcome, Pid1, Profile


def test_budgets_scale_with_timeout_down_to_floors() -> None:
    """One setting: the silence a phase tolerates, the boot's ceiling and the power-off's, from BOOT_TIMEOUT."""
    b = Budgets.from_timeout(120)
    assert b.boot == Budget(silence=30, ceiling=180, from_start=True)
    assert b.agent_grace == 18 and b.powerdown == Budget(silence=30, ceiling=60, from_start=False)
    short = Budgets.from_timeout(40)  # a short BOOT_TIMEOUT still leaves the agent and the power-off time
    assert short.boot == Budget(10, 60) and short.agent_grace == 15 and short.powerdown == Budget(20, 40, False)
    assert Budgets.from_timeout(1).boot.silence == 0.25  # named as such ("0.25s"), not rounded up


def test_guest_options_come_from_the_settings(tmp_path: Path) -> None:
    s = load_settings(tmp_path, VM_MEMORY="2048", VM_CPUS="2", BOOT_TIMEOUT="90", BOOT_APPEND="quiet",
                      AGENT_INIT="yes")
    kernel = BootKernel(tmp_path / "k", None, "path")
    opts = check.guest_options(s, image=tmp_path / "i.img", kernel=kernel, accel=Accel("tcg", "t", False),
                               name="my test[1]", append="loglevel=7")
    assert (opts.memory, opts.cpus, opts.timeout, opts.append) == (2048, 2, 90, "quiet loglevel=7")
    assert opts.profile == profiles.NVDIMM_AGENT_INIT and opts.ssh_key is None  # no image yet: no DAX header
    assert opts.log_dir == Workdir.of(s).boot_log("my test[1]") and opts.log_dir.is_relative_to(s.workdir)
    assert check.guest_options(s, image=opts.image, kernel=kernel, accel=opts.accel, name="x", timeout=30).timeout == 30


@pytest.mark.parametrize("profile, has_key, ran, skipped", [
    (SYSTEMD, True, ["kernel", "root", "init", "agent", "running", "exec", "ssh"], []),
    (SYSTEMD, False, ["kernel", "root", "init", "agent", "running", "exec"], []),  # no key: ssh "not run"
    (AGENT_INIT, False, ["kernel", "root", "init", "agent", "exec"], ["running", "ssh"]),
    (Profile(dataclasses.replace(attachments.VIRTIO_BLK, skipped={"root": "no disk"}), Pid1.SYSTEMD), True,
     ["kernel", "init", "agent", "running", "exec", "ssh"], ["root"]),
], ids=["systemd", "systemd-no-key", "agent-init", "a-new-attachment-skips-its-own"])
def test_boot_to_ready_runs_the_profile(tmp_path: Path, profile: Profile, has_key: bool, ran: list[str],
                                        skipped: list[str]) -> None:
    calls: list[str] = []

    def check_for(name: str):
        def record(guest: Guest) -> None:
            calls.append(name)
            guest.phases[name] = Outcome.passed()
        return record

    checks = {name: check_for(name) for name in profiles.PHASES}
    guest = stub_guest(tmp_path, profile)
    if has_key:
        guest.opts = dataclasses.replace(guest.opts, ssh_key=SimpleNamespace(public="ssh-ed25519 AAAA"))
    check.boot_to_ready(guest, checks)
    assert calls == ran
    assert [p for p, o in guest.phases.items() if o == profile.skip(p)] == skipped
    phases.run(guest, "powerdown", checks)
    assert guest.passed is (has_key or profile.skip("ssh") is not None)  # no key, no login, no pass


def test_kvm_failure_falls_back_to_tcg(tmp_path: Path) -> None:
    s = load_settings(tmp_path)
    opts = stub_guest(tmp_path).opts
    calls = []

    def fn(o: BootOptions) -> str:
        calls.append((o.accel.name, o.log_dir.name))
        if o.accel.name == "kvm":
            raise InfrastructureError("KVM internal error")
        return "ok"

    assert check.with_kvm_fallback(opts, s, fn) == "ok"
    assert calls == [("kvm", tmp_path.name), ("tcg", tmp_path.name + "-tcg")]
    assert json.loads(UserCache.of(s).accel_verdict.read_text())["kvm"] is False  # KVM distrusted from now on
    calls.clear()
    with pytest.raises(InfrastructureError):  # KVM asked for by name: no fallback
        check.with_kvm_fallback(dataclasses.replace(opts, accel=Accel("kvm", "ACCEL=kvm", False)), s, fn)
    assert calls == [("kvm", tmp_path.name)]


def test_boot_kernel_and_image_selection(tmp_path: Path) -> None:
    s = load_settings(tmp_path)
    with pytest.raises(UsageError, match="BOOT_IMAGE: .* does not exist; run `osbuilder rootfs"):
        check.boot_image(s)
    with pytest.raises(UsageError, match="BOOT_KERNEL=built"):
        check.boot_kernel(s.with_values(BOOT_KERNEL="built"))
    Workdir.of(s).kernel.vmlinuz.parent.mkdir(parents=True)
    Workdir.of(s).kernel.vmlinuz.write_bytes(b"k")
    assert check.boot_kernel(s).name == "built"  # auto prefers the built kernel
    custom = tmp_path / "bzImage"
    custom.write_bytes(b"k")
    assert check.boot_kernel(s.with_values(BOOT_KERNEL=str(custom))).kernel == custom
    assert check.boot_kernel(s, custom) == BootKernel(custom, None, "path")  # --kernel PATH first
    assert check.boot_kernel(s.with_values(BOOT_KERNEL="built"), built=custom).kernel == custom
    with pytest.raises(UsageError):
        check.boot_kernel(s, tmp_path / "nope")


def test_format_timings() -> None:
    text = check.format_timings({"passed": True, "image": "/i", "log_dir": "/l",
                                 "kernel": {"kind": "debian", "version": "6.1", "path": "/k"},
                                 "accel": {"name": "tcg", "reason": "ACCEL=tcg"}, "profile": "nvdimm-dax",
                                 "timings": {"qemu_start": 0.0, "agent_ready": 9.5},
                                 "guest_startup": {"kernel": 1.25, "total": 17.6}})
    assert text == ("boot check PASSED: /i\n"
                    "  kernel: debian 6.1\n"
                    "  accel:  tcg (ACCEL=tcg)\n"
                    "  profile: nvdimm-dax\n"
                    "  phase timings (seconds since QEMU start):\n"
                    "    qemu_start                 0.00\n"
                    "    agent_ready                9.50\n"
                    "  systemd-analyze: kernel 1.25s, total 17.60s\n"
                    "  logs: /l")



def test_a_vsock_agent_needs_the_hosts_vhost_vsock() -> None:
    """The `kata` protocol (Kata 2.x/3.x, vsock port 1024) gets a guest address only where the host can give
    one; elsewhere its boot check is the machine's failure (exit 125), not the image's."""
    from osbuilder.agent import protocol
    from osbuilder.errors import InfrastructureError
    from osbuilder.vm import check

    assert check.vsock_cid(protocol.get("kata1")) is None  # a virtio-serial protocol needs no vsock
    if os.access("/dev/vhost-vsock", os.R_OK | os.W_OK):
        cid = check.vsock_cid(protocol.get("kata"))
        assert cid is not None and 3 <= cid < 2**31
        return
    with pytest.raises(InfrastructureError, match=r"^AGENT_PROTOCOL=kata: the agent listens on vsock port 1024, "
                                                  r"and this host has no usable /dev/vhost-vsock") as e:
        check.vsock_cid(protocol.get("kata"))
    assert e.value.exit_code == 125


def test_the_kvm_probe_runs_while_the_kernel_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fresh machine `osbuilder boot` needs both Debian's boot kernel and the KVM verdict: neither waits
    for the other. A kernel that cannot be had is still the error reported."""
    s = load_settings(tmp_path, BOOT_KERNEL="debian", ACCEL="auto")
    overlap = {"probing": False, "seen": False}

    def choose(settings: settings_mod.Settings) -> Accel:
        overlap["probing"] = True
        time.sleep(0.5)
        overlap["probing"] = False
        return Accel("tcg", "probe failed", True)

    def make_kernel(settings: settings_mod.Settings) -> BootKernel:
        time.sleep(0.2)
        overlap["seen"] = overlap["probing"]
        return BootKernel(tmp_path / "vmlinuz", tmp_path / "initrd.img", "debian")

    monkeypatch.setattr(accel, "choose", choose)
    monkeypatch.setattr(check, "debian_kernel", make_kernel)
    kernel, chosen = check.kernel_and_accel(s)
    assert kernel.name == "debian" and chosen.reason == "probe failed" and overlap["seen"]
    with pytest.raises(UsageError, match="BOOT_KERNEL: .*/no-such-kernel does not exist"):
        check.kernel_and_accel(s, tmp_path / "no-such-kernel")
