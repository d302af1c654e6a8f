"""Boots that fail for the machine's reasons say so (issue 20, items 5 and 12).

On this kind of host nested KVM opens but runs no guest code: ACCEL=auto falls back to TCG, and
ACCEL=kvm, which insists on KVM, must be an infrastructure failure (exit 125: bisection's skip), not
"boot check failed in phase 'kernel'" (exit 1: a good kernel called bad). A budget under a second is
named as such, not "0s".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from osbuilder import settings as S

pytestmark = pytest.mark.xdist_group("infrastructure")


def osb(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME or k in ("CACHE_DIR", "REPO_URL")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=900)


def error_line(result: subprocess.CompletedProcess) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("osbuilder: error:"))


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm: ACCEL=kvm is refused before any boot")
def test_accel_kvm_on_a_kvm_that_runs_no_code_is_an_infrastructure_failure(tmp_path: Path, osbuilder_image):
    wd = tmp_path / "wd"
    result = osb("boot", "--check", env={"ACCEL": "kvm", "WORKDIR": str(wd), "BOOT_IMAGE": str(osbuilder_image.path)},
                 cwd=tmp_path)
    if result.returncode == 0:
        pytest.skip("KVM runs guests on this host: there is no broken KVM to classify")
    assert result.returncode == 125, result.stderr[-3000:]
    assert error_line(result).startswith("osbuilder: error: ACCEL=kvm: KVM does not run guests on this host (probe: ")
    assert "phase 'kernel'" not in result.stderr
    assert not list((wd / "boot-records").glob("*.json")) if (wd / "boot-records").exists() else True
    for boot_json in wd.glob("boot-logs/*/boot.json"):  # no boot of the image was blamed
        assert json.loads(boot_json.read_text())["passed"] is not False, boot_json


def test_a_budget_under_a_second_is_not_zero_seconds(tmp_path: Path, osbuilder_image):
    """BOOT_TIMEOUT=1 gives the kernel a quarter of a second: the failure says 0.25s."""
    result = osb("boot", "--check", env={"ACCEL": "tcg", "BOOT_TIMEOUT": "1", "WORKDIR": str(tmp_path / "wd"),
                                         "BOOT_IMAGE": str(osbuilder_image.path)}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_line(result).startswith("osbuilder: error: boot check failed in phase 'kernel': timed out after "
                                         "0.25s waiting for the kernel's 'Linux version' banner")
