"""accel.py: the KVM probe's verdict, per host and per user, and the accelerator boots run under."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from vmstubs import (
    load_settings,
)

from osbuilder.errors import InfrastructureError
from osbuilder.layout import UserCache, Workdir
from osbuilder.vm import accel
from osbuilder.vm.options import BootKernel


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
    kernel = BootKernel(tmp_path / "k", None, "path")
    first = load_settings(tmp_path, WORKDIR=str(tmp_path / "first"), ACCEL="auto")
    fresh = first.with_values(WORKDIR=str(tmp_path / "fresh"))
    probes: list[Path] = []
    verdicts = iter([(True, "reached init in 1.0s"), (False, "KVM internal error")])

    def probe(k: BootKernel, log_dir: Path) -> tuple[bool, str]:
        probes.append(log_dir)
        return next(verdicts)

    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    monkeypatch.setattr(accel, "host_key", lambda: {"kernel": "6.1.0-1", "boot_id": "b1", "qemu": "7.2", "cpu": "x"})
    assert accel.choose(first, kernel).name == "kvm" and len(probes) == 1
    assert accel.choose(fresh, kernel).name == "kvm" and len(probes) == 1  # a fresh WORKDIR does not probe
    assert not (tmp_path / "fresh").exists()
    assert UserCache.of(fresh).accel_verdict.is_file()
    # after a reboot (another boot id) the verdict no longer holds: probed again, in that WORKDIR's logs
    monkeypatch.setattr(accel, "host_key", lambda: {"kernel": "6.1.0-1", "boot_id": "b2", "qemu": "7.2", "cpu": "x"})
    chosen = accel.choose(fresh, kernel)
    assert chosen.name == "tcg" and "KVM internal error" in chosen.reason and len(probes) == 2
    assert probes[1].parent == Workdir.of(fresh).boot_logs


def test_choose_accel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = BootKernel(tmp_path / "k", None, "path")
    s = load_settings(tmp_path, ACCEL="tcg")
    assert accel.choose(s, kernel).name == "tcg"
    monkeypatch.setattr(accel, "kvm_usable", lambda: "no /dev/kvm")
    auto = accel.choose(s.with_values(ACCEL="auto"), kernel)
    assert auto.name == "tcg" and "no /dev/kvm" in auto.reason
    with pytest.raises(InfrastructureError):
        accel.choose(s.with_values(ACCEL="kvm"), kernel)
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    accel.save_verdict(UserCache.of(s).accel_verdict, True, "probe passed")
    assert accel.choose(s.with_values(ACCEL="auto"), kernel).name == "kvm"



def test_accel_kvm_on_a_kvm_that_runs_nothing_is_an_infrastructure_failure(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """ACCEL=kvm proves KVM with the probe ACCEL=auto uses: KVM that runs no code is the machine's fault
    (exit 125, bisection's skip), not the artifact's; the verdict is kept, so the next boot asks no probe."""
    kernel = BootKernel(tmp_path / "k", None, "debian")
    s = load_settings(tmp_path, ACCEL="kvm")
    probes = []

    def probe(k: BootKernel, log_dir: Path) -> tuple[bool, str]:
        probes.append(log_dir)
        return False, "the kernel did not reach its init within 15s under KVM (no console output)"

    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    for _ in range(2):
        with pytest.raises(InfrastructureError, match=r"^ACCEL=kvm: KVM does not run guests on this host \(probe: the "
                                                      r"kernel did not reach its init .*\); use ACCEL=auto") as e:
            accel.choose(s, kernel)
        assert e.value.exit_code == 125
    assert len(probes) == 1
    assert accel.choose(s.with_values(ACCEL="auto"), kernel).name == "tcg"


@pytest.mark.parametrize("under_tcg,verdict", [(True, False), (False, None)], ids=["kvm-broken", "kernel-broken"])
def test_a_kernel_under_test_that_fails_the_probe_is_booted_under_tcg_too(tmp_path: Path, under_tcg: bool,
                                                                          verdict: bool | None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A built kernel (one a bisection tests) that does not reach its init under KVM is tried under TCG:
    if it fails there too, the kernel is at fault and KVM is not blamed (no verdict kept; ACCEL=kvm boots
    it under KVM, and the boot fails as the kernel's)."""
    runs = []

    def fake_probe(kernel: BootKernel, log_dir: Path, how: str, timeout: float) -> tuple[bool, str]:
        runs.append(how)
        return (how == "tcg" and under_tcg), f"{how} result"

    monkeypatch.setattr(accel, "_probe", fake_probe)
    ok, _ = accel.probe_kvm(BootKernel(tmp_path / "k", None, "built"), tmp_path)
    assert (ok, runs) == (verdict, ["kvm", "tcg"])
    runs.clear()
    assert accel.probe_kvm(BootKernel(tmp_path / "k", None, "debian"), tmp_path)[0] is False and runs == ["kvm"]
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    s = load_settings(tmp_path, ACCEL="kvm")
    chosen = None
    try:
        chosen = accel.choose(s, BootKernel(tmp_path / "k", None, "built"))
    except InfrastructureError:
        assert under_tcg
    else:
        assert not under_tcg and chosen.name == "kvm"
        assert not UserCache.of(s).accel_verdict.exists()  # inconclusive: nothing kept
