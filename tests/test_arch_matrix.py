"""`pytest --osbuilder-arch`: which tests run once per architecture, with which settings (ARCH, WORKDIR/<arch>),
and the xdist groups that keep each architecture's module-scoped guest on one worker. Inner pytest runs of
small test files (nothing is built here; boot_tests/test_arm64.py builds and boots both architectures)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import inner_pytest

TESTS = '''
import json
import os
from pathlib import Path

import pytest


def test_settings(osbuilder_settings, osbuilder_arch):
    out = Path(os.environ["RESULTS"]) / f"settings-{osbuilder_arch}.json"
    out.write_text(json.dumps({"arch": osbuilder_settings.arch, "workdir": str(osbuilder_settings.workdir)}))


def test_no_fixture(tmp_path):
    pass


@pytest.mark.xdist_group("guest")
@pytest.mark.parametrize("n", [1, 2])
def test_grouped(osbuilder_settings, n):
    out = Path(os.environ["RESULTS"]) / f"{osbuilder_settings.arch}-{n}"
    out.write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
'''


def pytest_in(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return inner_pytest.pytest_in(project, TESTS, *args, drop=("WORKDIR", "ARCH"), env={"WORKDIR": str(project / "wd")})


def collected(project: Path, *args: str) -> list[str]:
    return inner_pytest.collected(project, TESTS, *args, drop=("WORKDIR", "ARCH"), env={"WORKDIR": str(project / "wd")})


def test_tests_of_the_fixtures_run_once_per_architecture(tmp_path: Path) -> None:
    assert collected(tmp_path) == ["test_settings", "test_no_fixture", "test_grouped[1]", "test_grouped[2]"]
    assert collected(tmp_path, "--osbuilder-arch", "arm64") == collected(tmp_path)  # one: ARCH, no ids
    ids = collected(tmp_path, "--osbuilder-arch", "x86_64", "--osbuilder-arch", "aarch64", "--osbuilder-arch", "arm64")
    assert sorted(ids) == ["test_grouped[arm64-1]", "test_grouped[arm64-2]", "test_grouped[x86_64-1]",
                           "test_grouped[x86_64-2]", "test_no_fixture", "test_settings[arm64]", "test_settings[x86_64]"]


def test_each_architecture_has_its_arch_and_workdir(tmp_path: Path) -> None:
    proc = pytest_in(tmp_path, "-k", "test_settings", "--osbuilder-arch", "x86_64", "--osbuilder-arch", "arm64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("x86_64", "arm64"):
        seen = json.loads((tmp_path / f"settings-{name}.json").read_text())
        assert seen == {"arch": name, "workdir": str(tmp_path / "wd" / name)}
    proc = pytest_in(tmp_path, "-k", "test_settings", "--osbuilder-arch", "aarch64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "settings-arm64.json").read_text()) == {"arch": "arm64",
                                                                         "workdir": str(tmp_path / "wd")}


def test_an_unknown_or_unsupported_architecture_is_a_usage_error(tmp_path: Path) -> None:
    for name, said in (("mips", "--osbuilder-arch: unknown architecture 'mips'; known: x86_64, arm64"),
                       ("s390x", "--osbuilder-arch: s390x: not supported yet")):
        proc = pytest_in(tmp_path, "--osbuilder-arch", name)
        assert proc.returncode == 4 and said in proc.stderr, proc.stderr


def test_each_architectures_group_stays_on_one_worker(tmp_path: Path) -> None:
    proc = pytest_in(tmp_path, "-n", "2", "--dist", "loadgroup", "-v", "-k", "test_grouped",
                     "--osbuilder-arch", "x86_64", "--osbuilder-arch", "arm64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"test_grouped\[arm64-1\]@guest_guest-arm64\b", proc.stdout), proc.stdout
    workers = {a: {(tmp_path / f"{a}-{n}").read_text() for n in (1, 2)} for a in ("x86_64", "arm64")}
    assert len(workers["x86_64"]) == len(workers["arm64"]) == 1, workers
