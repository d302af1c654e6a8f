"""records.py: boot records, and the hash they carry taken before QEMU read the file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vmstubs import (
    FakeVm,
    load_settings,
)

from osbuilder.layout import Workdir
from osbuilder.vm import check, profiles, qemu, records
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import Accel, BootKernel, BootOptions
from osbuilder.vm.profiles import Outcome


def test_records_round_trip(tmp_path: Path) -> None:
    image, kernel = tmp_path / "container.img", tmp_path / "vmlinuz"
    image.write_bytes(b"image")
    kernel.write_bytes(b"kernel")
    assert records.passing_record(tmp_path, image) is None
    paths = records.write_records(tmp_path, image, kernel, passed=True, kernel={"kind": "debian"},
                                  timings={"agent_ready": 1.0})
    digest = "6105d6cc76af400325e94d588ce511be5bfdbb73b437dc51eca43917d7a43e3d"  # sha256 of b"image"
    assert paths[0] == Workdir(tmp_path).boot_record(digest)
    rec = records.passing_record(Workdir(tmp_path), image)
    assert rec is not None and rec["sha256"] == digest and rec["role"] == "image"
    assert records.passing_record(tmp_path, kernel)["role"] == "kernel"
    os.utime(image, ns=(1, 1))
    image.write_bytes(b"changed")
    assert records.passing_record(tmp_path, image) is None
    assert records.passing_record(tmp_path, tmp_path / "missing") is None


def test_failing_record_never_replaces_passing(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x")
    digest = records.sha256_file(f)
    records.write_record(tmp_path, records.make_record(f, digest, "image", True, {}, {}))
    records.write_record(tmp_path, records.make_record(f, digest, "image", False, {}, {}))
    assert records.passing_record(tmp_path, f) is not None


def _boot_with_fake_qemu(tmp_path: Path, *, at_launch=lambda: None, during=lambda: None) -> dict[str, Any]:
    """The record of a check of real files on a fake QEMU where every phase passes; `at_launch()` runs
    as QEMU starts, `during()` in the middle of the boot (the exec phase)."""
    def check_for(name: str):
        def check_phase(guest: Guest) -> None:
            if name == "exec":
                during()
            guest.phases[name] = Outcome.passed()
        return check_phase

    def vm(spec: qemu.VmSpec, log_dir: Path) -> SimpleNamespace:
        return SimpleNamespace(launch=lambda: at_launch() or FakeVm(tmp_path))

    image, kernel = tmp_path / "container.img", tmp_path / "vmlinuz"
    image.write_bytes(b"the image that was booted")
    kernel.write_bytes(b"the kernel")
    opts = BootOptions(image=image, kernel=BootKernel(kernel, None, "path"), log_dir=tmp_path / "logs",
                       accel=Accel("tcg", "test", False), ssh_key=SimpleNamespace(public="ssh-ed25519 AAAA"),
                       name="pinned")
    return check.run_check(opts, load_settings(tmp_path), launch=vm,  # type: ignore[arg-type]
                           checks={name: check_for(name) for name in profiles.PHASES})


def _replace(path: Path, data: bytes) -> None:
    """What a build does to its output: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_record_carries_the_hash_taken_before_the_boot(tmp_path: Path) -> None:
    record = _boot_with_fake_qemu(tmp_path, during=lambda: _replace(tmp_path / "container.img", b"replaced mid-boot"))
    s, opts = load_settings(tmp_path), SimpleNamespace(image=tmp_path / "container.img")
    assert record["passed"]
    booted = json.loads(Workdir.of(s).boot_record(_sha(b"the image that was booted")).read_text())
    assert booted["role"] == "image" and booted["passed"]
    assert not Workdir.of(s).boot_record(_sha(b"replaced mid-boot")).exists()  # never booted: no record
    assert records.passing_record(s.workdir, opts.image) is None
    assert Workdir.of(s).boot_record(_sha(b"the kernel")).exists()


@pytest.mark.parametrize("when", ["before-qemu-read-it", "written-in-place-during-the-boot"])
def test_no_record_when_the_booted_bytes_are_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      when: str) -> None:
    image = tmp_path / "container.img"
    if when == "before-qemu-read-it":  # hashed, then replaced before QEMU opened it
        record = _boot_with_fake_qemu(tmp_path, at_launch=lambda: _replace(image, b"other"))
    else:  # QEMU read a mix of both
        record = _boot_with_fake_qemu(tmp_path, during=lambda: image.write_bytes(b"other bytes"))
    s = load_settings(tmp_path)
    assert record["passed"]
    assert not list(Workdir.of(s).boot_records.glob("*.json"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    what = "was replaced" if when == "before-qemu-read-it" else "was written to"
    assert warnings == [f"boot: pinned: {image} {what} during the boot check; no boot record written"]


def test_a_file_replaced_by_one_with_the_same_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    f = tmp_path / "container.img"
    f.write_bytes(b"first")
    first = records.sha256_file(f)
    st = f.stat()
    _replace(f, b"other")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # cp -p, rsync -t: size and mtime as before
    assert records.sha256_file(f) == _sha(b"other") != first

