"""`osbuilder kconfig bisect` for real: real builds, real boots, an interruption and a resume.

GOOD is osbuilder's own kernel config; BAD changes eighteen harmless options (initrd decompressors,
CRC libraries, printk settings, ...) and one that keeps the guest from booting: ext4 off, so the
root filesystem cannot be mounted. The bisection is interrupted (SIGINT, as Ctrl-C) after its third
step and run again: it must resume there and name CONFIG_EXT4_FS within ceil(log2 n) + 2 steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boot_tests.object_tree import seed_object_tree
from osbuilder import layout

pytestmark = pytest.mark.build

HARMLESS = {"IKCONFIG": "y", "IKCONFIG_PROC": "y", "PRINTK_TIME": "n", "LOG_BUF_SHIFT": "16",
            "DEFAULT_HOSTNAME": '"bisect"', "RD_BZIP2": "y", "RD_LZMA": "y", "RD_XZ": "y", "RD_LZO": "y",
            "RD_LZ4": "y", "CRC_CCITT": "y", "CRC_ITU_T": "y", "CRC7": "y", "CRC4": "y", "CRC8": "y",
            "PRINTK_CALLER": "y", "CRC64": "y", "SGETMASK_SYSCALL": "y"}
CULPRIT = {"EXT4_FS": "n"}
OSBUILDER = str(Path(sys.executable).parent / "osbuilder")


def with_options(config: str, changes: dict[str, str]) -> str:
    kept = [line for line in config.splitlines()
            if not re.match(rf"^(# )?CONFIG_({'|'.join(changes)})[= ]", line)]
    kept += [f"# CONFIG_{k} is not set" if v == "n" else f"CONFIG_{k}={v}" for k, v in changes.items()]
    return "\n".join(kept) + "\n"


@pytest.fixture(scope="module")
def hunt(osbuilder_kernel, osbuilder_image, osbuilder_settings, tmp_path_factory):
    """A WORKDIR, the GOOD/BAD pair and the environment the CLI runs with. The WORKDIR starts with the
    object tree of the session's kernel (GOOD), as a user's does who bisects where they built it: the
    first step recompiles what its config changed, not the whole kernel from ccache."""
    where = tmp_path_factory.mktemp("kconfig-bisect")
    seed_object_tree(osbuilder_settings, where / "work")
    good_text = layout.KernelFiles(osbuilder_kernel.path).config.read_text()
    good, bad = where / "good.config", where / "bad.config"
    good.write_text(good_text)
    bad.write_text(with_options(good_text, {**HARMLESS, **CULPRIT}))
    env = {**os.environ, "WORKDIR": str(where / "work"), "BOOT_IMAGE": str(osbuilder_image.path),
           "CACHE_DIR": str(layout.UserCache.of(osbuilder_settings).root)}
    return good, bad, env


def bisect_cmd(good: Path, bad: Path) -> list[str]:
    return [OSBUILDER, "kconfig", "bisect", "--good", str(good), "--bad", str(bad), "--json"]


def saved_steps(env: dict[str, str]) -> int:
    try:
        return len(json.loads(layout.Workdir(Path(env["WORKDIR"])).bisect_state.read_text())["steps"])
    except (OSError, ValueError):
        return 0


def test_bisect_names_the_culprit_and_resumes_after_an_interruption(hunt):
    good, bad, env = hunt
    diff = subprocess.run([OSBUILDER, "kconfig", "diff", str(good), str(bad), "--json"], env=env,
                          capture_output=True, text=True, check=True)
    differing = [c for g in json.loads(diff.stdout)["groups"] for c in g]
    settable = [c for c in differing if c["settable"]]
    assert len(settable) >= 16
    bound = math.ceil(math.log2(len(settable))) + 2

    first = subprocess.Popen(bisect_cmd(good, bad), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 1800
    while saved_steps(env) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-3000:]
    assert saved_steps(env) == 3, err[-3000:]

    second = subprocess.run(bisect_cmd(good, bad), env=env, capture_output=True, text=True, timeout=3600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after 3 steps" in second.stderr
    assert "step 1 of" not in second.stderr and "step 4 of" in second.stderr
    result = json.loads(second.stdout)
    assert [c["name"] for c in result["culprits"]] == ["EXT4_FS"]
    assert (result["culprits"][0]["good"], result["culprits"][0]["bad"]) == ("y", "n")
    assert "ext4" in result["culprits"][0]["help"].lower()
    steps = result["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert len(steps) <= bound, [(s["role"], s["verdict"]) for s in steps]
    confirm_bad = steps[1]
    assert confirm_bad["role"] == "confirm BAD" and confirm_bad["verdict"] == "bad"
    assert confirm_bad["phase"] in ("kernel", "root") and confirm_bad["evidence"], confirm_bad
    assert all(set(s["seconds"]) >= {"configure", "compile", "total"} for s in steps)

    third = subprocess.run(bisect_cmd(good, bad), env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and json.loads(third.stdout)["steps"] == steps  # nothing built again
    assert "already finished" in third.stderr
