"""`pytest --osbuilder-kernel-config`: which tests run once per config, their ids, and the xdist groups that send
each config's module-scoped guest to one worker. Inner pytest runs of small test files that use the
fixture the option parametrises (no kernel is built here; boot_tests/test_config_gates.py builds and boots)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import inner_pytest

TESTS = '''
import os
from pathlib import Path

import pytest


def test_boots(osbuilder_boot_kernel):
    pass


def test_guest(osbuilder_guest):
    pass


def test_no_kernel(tmp_path):
    pass


def test_accel_alone(osbuilder_accel):
    pass


@pytest.mark.xdist_group("guest")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_grouped(osbuilder_kernel_config, n):
    out = Path(os.environ["RESULTS"]) / f"{getattr(osbuilder_kernel_config, 'id', 'none')}-{n}"
    out.write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
'''


def pytest_in(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return inner_pytest.pytest_in(project, TESTS, *args, drop=("WORKDIR",))


def collected(project: Path, *args: str) -> list[str]:
    return inner_pytest.collected(project, TESTS, *args, drop=("WORKDIR",))


def configs(tmp_path: Path, *names: str) -> list[str]:
    args = []
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("CONFIG_64BIT=y\n")
        args += ["--osbuilder-kernel-config", str(path)]
    return args


def test_without_the_option_nothing_is_parametrised(tmp_path: Path) -> None:
    assert collected(tmp_path) == ["test_boots", "test_guest", "test_no_kernel", "test_accel_alone",
                                   "test_grouped[1]", "test_grouped[2]", "test_grouped[3]"]


def test_tests_that_boot_run_once_per_config(tmp_path: Path) -> None:
    ids = collected(tmp_path, *configs(tmp_path, "a.config", "b.config"))
    # boot_kernel, directly or through a guest, is the config's; boot_accel alone is the host's
    for test in ("test_boots", "test_guest"):
        assert {i for i in ids if i.startswith(test + "[")} == {f"{test}[a]", f"{test}[b]"}
    assert "test_no_kernel" in ids and "test_accel_alone" in ids
    assert {i for i in ids if i.startswith("test_grouped")} == {f"test_grouped[{c}-{n}]" for c in "ab"
                                                                for n in (1, 2, 3)}


def test_ids_are_unique_and_safe(tmp_path: Path) -> None:
    args = configs(tmp_path, "x/gate.config", "y/gate.config", "z/my gate@2[1].config")
    args += ["--osbuilder-kernel-config", args[1]]  # the same file twice counts once
    ids = collected(tmp_path, *args)
    assert [i for i in ids if i.startswith("test_boots")] == ["test_boots[gate]", "test_boots[gate-2]",
                                                              "test_boots[my_gate_2_1_]"]


def test_a_missing_config_is_a_usage_error(tmp_path: Path) -> None:
    proc = pytest_in(tmp_path, "--osbuilder-kernel-config", str(tmp_path / "nope.config"))
    assert proc.returncode == 4
    assert f"--osbuilder-kernel-config: {tmp_path / 'nope.config'}: no such file" in proc.stderr


def test_each_configs_group_stays_on_one_worker(tmp_path: Path) -> None:
    proc = pytest_in(tmp_path, "-n", "2", "--dist", "loadgroup", "-v", "-k", "test_grouped",
                     *configs(tmp_path / "configs", "a.config", "b.config"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the group is the test's own, extended by the config id
    assert re.search(r"test_grouped\[a-1\]@guest_guest-a\b", proc.stdout), proc.stdout
    workers = {c: {(tmp_path / f"{c}-{n}").read_text() for n in (1, 2, 3)} for c in "ab"}
    assert len(workers["a"]) == len(workers["b"]) == 1, workers
    assert workers["a"] != workers["b"], workers


def test_without_configs_the_group_is_unchanged(tmp_path: Path) -> None:
    proc = pytest_in(tmp_path, "-n", "2", "--dist", "loadgroup", "-v", "-k", "test_grouped")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"test_grouped\[1\]@guest\b", proc.stdout), proc.stdout
    assert len({(tmp_path / f"none-{n}").read_text() for n in (1, 2, 3)}) == 1
