"""accel.py: the KVM probe's verdict, per host and per user, and the accelerator boots run under."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from vmstubs import load_settings, opt_value

from osbuilder.errors import InfrastructureError
from osbuilder.layout import UserCache, Workdir
from osbuilder.vm import accel, qemu


def test_probe_verdict_cache(tmp_path: Path) -> None:
    path = tmp_path / "verdict.json"
    assert accel.cached_verdict(path) is None
    accel.save_verdict(path, False, "no output")
    assert accel.cached_verdict(path)["kvm"] is False
    assert accel.cached_verdict(path, now=time.time() + accel.PROBE_TTL + 1) is None
    other_qemu = {**accel.host_key(), "qemu": "QEMU emulator version 99.0.0"}
    assert accel.cached_verdict(path, host=other_qemu) is None


def test_host_key_names_kernel_boot_qemu_and_cpu() -> None:
    key = accel.host_key()
    assert key["kernel"] == os.uname().release
    assert key["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert key["qemu"].startswith("QEMU emulator version")
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    assert key["cpu"] == (cpu[1].strip() if cpu else "unknown")


def test_kvm_verdict_is_shared_by_every_workdir_of_one_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_settings(tmp_path, WORKDIR=str(tmp_path / "first"), ACCEL="auto")
    fresh = first.with_values(WORKDIR=str(tmp_path / "fresh"))
    probes: list[Path] = []
    verdicts = iter([(True, "ran in 0.3s"), (False, "did not finish within 1.5s")])

    def probe(log_dir: Path) -> tuple[bool, str]:
        probes.append(log_dir)
        return next(verdicts)

    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    monkeypatch.setattr(accel, "host_key", lambda: {"kernel": "6.1.0-1", "boot_id": "b1", "qemu": "7.2", "cpu": "x"})
    assert accel.choose(first).name == "kvm" and len(probes) == 1
    assert accel.choose(fresh).name == "kvm" and len(probes) == 1  # a fresh WORKDIR does not probe
    assert not (tmp_path / "fresh").exists()
    assert UserCache.of(fresh).accel_verdict.is_file()
    # after a reboot (another boot id) the verdict no longer holds: probed again, in that WORKDIR's logs
    monkeypatch.setattr(accel, "host_key", lambda: {"kernel": "6.1.0-1", "boot_id": "b2", "qemu": "7.2", "cpu": "x"})
    chosen = accel.choose(fresh)
    assert chosen.name == "tcg" and "did not finish" in chosen.reason and len(probes) == 2
    assert probes[1].parent == Workdir.of(fresh).boot_logs


def test_choose_accel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(tmp_path, ACCEL="tcg")
    assert accel.choose(s).name == "tcg"
    monkeypatch.setattr(accel, "kvm_usable", lambda: "no /dev/kvm")
    auto = accel.choose(s.with_values(ACCEL="auto"))
    assert auto.name == "tcg" and "no /dev/kvm" in auto.reason
    with pytest.raises(InfrastructureError):
        accel.choose(s.with_values(ACCEL="kvm"))
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    accel.save_verdict(UserCache.of(s).accel_verdict, True, "probe passed")
    assert accel.choose(s.with_values(ACCEL="auto")).name == "kvm"


def procs_of(path: Path) -> list[int]:
    """Processes whose command line names `path`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_the_probe_guest_runs_to_its_end_under_tcg(tmp_path: Path) -> None:
    """The guest KVM is probed with, run under TCG: it reaches long mode, runs its loop and makes QEMU exit
    with the status the probe expects, so under KVM only the accelerator differs."""
    ok, detail = accel.run_probe("tcg", tmp_path / "probe", timeout=30)
    assert ok, detail
    assert (tmp_path / "probe/kvm-probe.bin").stat().st_size == 64 * 1024


def test_the_probe_guest_is_stopped_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that does not finish in time fails the probe, and no QEMU is left. Here QEMU starts with its
    CPU stopped (`-S`), so the guest never runs: TCG alone finishes the probe in under 0.1 s, which a short
    deadline would not reliably beat."""
    command = accel.probe_command
    monkeypatch.setattr(accel, "probe_command", lambda firmware, name: [*command(firmware, name), "-S"])
    started = time.monotonic()
    ok, detail = accel.run_probe("tcg", tmp_path / "probe", timeout=0.5)
    assert not ok and "did not finish within 0.5s under TCG" in detail
    assert time.monotonic() - started < 5
    assert not procs_of(tmp_path)


def test_the_probe_guest_must_give_its_own_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU exiting with another status than the guest's answer is no proof (here the answer expected is
    changed; the guest still gives the real one)."""
    real = accel.expected_status()
    monkeypatch.setattr(accel, "expected_status", lambda: real ^ 0x02)
    ok, detail = accel.run_probe("tcg", tmp_path / "probe", timeout=30)
    assert not ok and f"QEMU exited with status {real}, not the probe guest's {real ^ 0x02}" in detail


def test_the_kvm_probe_uses_the_cpu_of_real_boots(tmp_path: Path) -> None:
    cmd = accel.probe_command(tmp_path / "fw.bin", "kvm")
    assert opt_value(cmd, "-accel") == ["kvm"] and opt_value(cmd, "-cpu") == [qemu.KVM_CPU]
    assert opt_value(cmd, "-machine") == ["q35"] and opt_value(cmd, "-bios") == [str(tmp_path / "fw.bin")]
    assert cmd[0] == qemu.QEMU and "-cpu" not in accel.probe_command(tmp_path / "fw.bin", "tcg")


@pytest.mark.skipif(accel.kvm_usable() is not None, reason="no usable /dev/kvm on this host")
def test_the_kvm_probe_answers_within_two_seconds(tmp_path: Path) -> None:
    """Whatever this host's KVM does (here nested KVM runs guests slower than TCG; elsewhere it works),
    the probe has its verdict within 2 s."""
    started = time.monotonic()
    ok, detail = accel.probe_kvm(tmp_path / "probe")
    took = time.monotonic() - started
    assert took <= 2.0, (took, ok, detail)


def test_accel_kvm_on_a_kvm_that_runs_nothing_is_an_infrastructure_failure(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ACCEL=kvm proves KVM with the probe ACCEL=auto uses: KVM that runs no code is the machine's fault
    (exit 125, bisection's skip), not the artifact's; the verdict is kept, so the next boot asks no probe."""
    s = load_settings(tmp_path, ACCEL="kvm")
    probes = []

    def probe(log_dir: Path) -> tuple[bool, str]:
        probes.append(log_dir)
        return False, "the probe guest did not finish within 1.5s under KVM"

    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    for _ in range(2):
        with pytest.raises(InfrastructureError, match=r"^ACCEL=kvm: KVM does not run guests on this host \(probe: the "
                                                      r"probe guest did not finish .*\); use ACCEL=auto") as e:
            accel.choose(s)
        assert e.value.exit_code == 125
    assert len(probes) == 1
    assert accel.choose(s.with_values(ACCEL="auto")).name == "tcg"
