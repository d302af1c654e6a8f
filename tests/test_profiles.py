"""profiles.py: outcomes, which phases a profile skips, and the profile the settings choose."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from vmstubs import (
    KATA_DAX_ROOT,
    load_settings,
    stub_guest,
)

from osbuilder import runtimes
from osbuilder import settings as settings_mod
from osbuilder.errors import UsageError
from osbuilder.vm import attachments, profiles
from osbuilder.vm.options import Accel, BootKernel, BootOptions
from osbuilder.vm.profiles import AGENT_INIT, SYSTEMD, Outcome, Pid1, Profile


def test_outcomes_are_recorded_as_boot_json_spells_them() -> None:
    assert str(Outcome.passed()) == "passed"
    assert str(Outcome.failed("kernel panic")) == "failed: kernel panic"
    assert str(Outcome.skipped("agent is init (no systemd)")) == "skipped: agent is init (no systemd)"
    assert Outcome.skipped("x") != Outcome.failed("x") and Outcome.passed() == Outcome.passed()


def test_a_skip_counts_only_for_its_own_profile_and_phase() -> None:
    no_sshd = Outcome.skipped("agent is init (no sshd)")
    assert AGENT_INIT.counts("ssh", no_sshd) and AGENT_INIT.counts("ssh", Outcome.passed())
    assert not SYSTEMD.counts("ssh", no_sshd)  # a systemd image must log in
    assert not AGENT_INIT.counts("running", no_sshd)  # the skip must be the phase's own
    for phase in ("kernel", "root", "init", "agent", "exec", "powerdown"):  # never skipped by agent-init
        assert AGENT_INIT.skip(phase) is None and not AGENT_INIT.counts(phase, no_sshd)
    assert not AGENT_INIT.counts("ssh", None) and not AGENT_INIT.counts("ssh", Outcome.failed("x"))


def test_the_profile_follows_agent_init(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="virtio-blk")
    assert profiles.for_settings(s) == SYSTEMD and profiles.for_settings(s.with_values(AGENT_INIT="yes")) == AGENT_INIT
    auto = load_settings(tmp_path)  # the runtime's attachment: Kata and Clear Containers map an NVDIMM
    assert profiles.for_settings(auto, dax_header=True) == profiles.NVDIMM_DAX_SYSTEMD
    assert profiles.for_settings(auto.with_values(RUNTIME="clear-containers", AGENT_INIT="yes"), dax_header=True) \
        == profiles.NVDIMM_DAX_AGENT_INIT
    initrd = load_settings(tmp_path, BOOT_PROFILE="initrd")  # the initrd's init is the agent, whatever AGENT_INIT says
    assert profiles.for_settings(initrd) == profiles.INITRD
    assert profiles.for_settings(initrd.with_values(AGENT_INIT="yes")) == profiles.INITRD
    with pytest.raises(ValueError, match="no such phase: sshd"):
        Profile(dataclasses.replace(attachments.VIRTIO_BLK, skipped={"sshd": "no"}), Pid1.SYSTEMD)
    with pytest.raises(ValueError, match="runs the agent as init"):
        Profile(attachments.INITRD, Pid1.SYSTEMD)


def test_profile_names_are_what_boot_json_has_always_recorded() -> None:
    assert [p.name for p in ALL] == ["systemd", "agent-init", "nvdimm", "nvdimm-agent-init", "nvdimm-dax",
                                     "nvdimm-dax-agent-init", "initrd"]


ALL = (SYSTEMD, AGENT_INIT, profiles.NVDIMM_SYSTEMD, profiles.NVDIMM_AGENT_INIT, profiles.NVDIMM_DAX_SYSTEMD,
       profiles.NVDIMM_DAX_AGENT_INIT, profiles.INITRD)


@pytest.mark.parametrize("profile", ALL, ids=[p.name for p in ALL])
def test_command_line_mounts_the_root_the_console_watches_for(profile: Profile, tmp_path: Path) -> None:
    """The root= a profile boots with is the device whose mount message its root phase waits for,
    read-only; extra parameters come last, so the kernel takes them over the profile's."""
    if profile.skip("root"):
        pytest.skip(f"{profile.name} mounts no root: {profile.skip('root')}")
    (tmp_path / "i.img").touch()
    opts = BootOptions(image=tmp_path / "i.img", kernel=BootKernel(tmp_path / "k", None, "path"), log_dir=tmp_path,
                       accel=Accel("tcg", "test", False), append="quiet root=/dev/vdz1", profile=profile)
    words = opts.cmdline.split()
    assert words[-2:] == ["quiet", "root=/dev/vdz1"]
    assert {"ro", "console=ttyS0", "panic=-1", "osbuilder.net=slirp"} <= set(words)
    device = next(w for w in words if w.startswith("root=")).removeprefix("root=/dev/")
    mounted = f"[    1.9] EXT4-fs ({device}): mounted filesystem 9c1e ro with ordered data mode. Quota mode: none."
    for line, seen in ((mounted.replace(device, "vdz1"), False), (mounted, True)):
        guest = stub_guest(tmp_path, profile)  # the console table's milestones, and the attachment's own
        guest.vm.console.feed(line)
        assert (profile.attach.root_milestone in guest.vm.console.milestones) is seen, line
    assert opts.spec().cmdline == opts.cmdline


def test_boot_profile_setting_chooses_the_attachment(tmp_path: Path) -> None:
    s = load_settings(tmp_path, BOOT_PROFILE="nvdimm")
    assert profiles.for_settings(s) == profiles.NVDIMM_SYSTEMD
    assert profiles.for_settings(s, dax_header=True) == profiles.NVDIMM_DAX_SYSTEMD
    assert profiles.for_settings(s.with_values(AGENT_INIT="yes"), dax_header=True) == profiles.NVDIMM_DAX_AGENT_INIT
    assert profiles.NVDIMM_DAX_AGENT_INIT.skip("running") and profiles.NVDIMM_DAX_SYSTEMD.skip("running") is None
    assert attachments.NVDIMM_DAX.root_params == KATA_DAX_ROOT  # the runtime's own root parameters
    assert attachments.NVDIMM_DAX.dax and not attachments.NVDIMM.dax and "dax" not in attachments.NVDIMM.root_params
    virtio = load_settings(tmp_path, BOOT_PROFILE="virtio-blk")
    assert profiles.for_settings(virtio, dax_header=True) == SYSTEMD  # a disk cannot do DAX
    auto = load_settings(tmp_path)
    assert auto.boot_profile == "auto"
    assert profiles.for_settings(auto).attach.name == runtimes.get("kata").attachment == "nvdimm"
    # every BOOT_PROFILE the setting accepts is a registered attachment, and the other way round
    assert set(settings_mod.BY_NAME["BOOT_PROFILE"].choices()) == {"auto", *attachments.ATTACHMENTS}


@pytest.mark.parametrize("value", ["nvdim", "virtio", "initramfs", "x" * 80])
def test_an_unknown_boot_profile_is_a_one_line_usage_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(UsageError) as e:
        load_settings(tmp_path, BOOT_PROFILE=value)
    assert e.value.message.startswith("BOOT_PROFILE: no boot profile ") and "\n" not in e.value.message
    assert "nvdimm" in e.value.message and "virtio-blk" in e.value.message


def test_cli_exits_2_on_an_unknown_boot_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from osbuilder import cli

    assert cli.main(["boot", "--check", "--workdir", str(tmp_path), "--boot-profile", "pmem"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("osbuilder: BOOT_PROFILE: no boot profile 'pmem'") or
               "BOOT_PROFILE: no boot profile 'pmem'" in line for line in err), err

