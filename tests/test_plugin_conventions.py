"""The pytest plugin behaves as pytest plugins do: its fixtures and options are prefixed (an unrelated
`image` fixture request is not a Debian build), a bad setting is a usage error before anything runs,
markers come from the fixtures a test asks for, and failure reports name the boot logs.

Each case runs an inner pytest on a small test file in a project of its own (no conftest of ours)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from osbuilder.settings import TABLE


def inner_pytest(project: Path, test_source: str, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_user.py").write_text(test_source)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PYTEST_") and k not in {s.name for s in TABLE}}
    clean["WORKDIR"] = str(project / "workdir")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_an_unrelated_image_fixture_is_not_ours(tmp_path: Path) -> None:
    result = inner_pytest(tmp_path, "def test_mine(image):\n    pass\n")
    assert result.returncode == 1
    assert "fixture 'image' not found" in result.stdout
    assert not (tmp_path / "workdir").exists()  # nothing was built


def test_a_bad_setting_is_a_usage_error_before_anything_runs(tmp_path: Path) -> None:
    source = "def test_build(osbuilder_image):\n    pass\n"
    result = inner_pytest(tmp_path, source, env={"IMG_SIZE": "big"})
    assert result.returncode == 4, result.stdout + result.stderr
    assert "ERROR: IMG_SIZE: expected a whole number, got 'big'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and not (tmp_path / "workdir").exists()
    # a session that asks for no osbuilder fixture is not concerned
    other = inner_pytest(tmp_path, "def test_other():\n    pass\n", env={"IMG_SIZE": "big"})
    assert other.returncode == 0, other.stdout


def test_markers_follow_the_fixtures_a_test_asks_for(tmp_path: Path) -> None:
    source = ("def test_builds(osbuilder_rootfs):\n    pass\n\n"
              "def test_boots(osbuilder_guest):\n    pass\n\n"
              "def test_plain():\n    pass\n")
    build = inner_pytest(tmp_path, source, "--collect-only", "-q", "-m", "build")
    boot = inner_pytest(tmp_path, source, "--collect-only", "-q", "-m", "boot")
    neither = inner_pytest(tmp_path, source, "--collect-only", "-q", "-m", "not build and not boot")
    assert [line for line in build.stdout.splitlines() if "::" in line] == ["test_user.py::test_builds",
                                                                            "test_user.py::test_boots"]
    assert [line for line in boot.stdout.splitlines() if "::" in line] == ["test_user.py::test_boots"]
    assert [line for line in neither.stdout.splitlines() if "::" in line] == ["test_user.py::test_plain"]


GROUPS_CONFTEST = """
import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    for item in items:
        groups = [m.args[0] for m in item.iter_markers("xdist_group")]
        print(f"GROUP {item.name} {groups}")
"""


def test_a_module_sharing_a_guest_stays_on_one_worker(tmp_path: Path) -> None:
    source = ("import pytest\n\n"
              "def test_a(osbuilder_booted_guest):\n    pass\n\n"
              "def test_b(osbuilder_guest):\n    pass\n\n"
              "@pytest.mark.xdist_group('mine')\n"
              "def test_c(osbuilder_guest):\n    pass\n\n"
              "def test_d():\n    pass\n")
    (tmp_path / "conftest.py").write_text(GROUPS_CONFTEST)
    result = inner_pytest(tmp_path, source, "--collect-only", "-q", "-s")
    groups = [line for line in result.stdout.splitlines() if line.startswith("GROUP ")]
    assert groups == ["GROUP test_a ['osbuilder-guest-test_user']", "GROUP test_b ['osbuilder-guest-test_user']",
                      "GROUP test_c ['mine']", "GROUP test_d []"], result.stdout


def test_a_failure_names_the_boot_logs(tmp_path: Path) -> None:
    source = ("from osbuilder.pytest_plugin import note_logs\n\n"
              "def test_fails(request, tmp_path):\n"
              "    note_logs(request.node, tmp_path / 'boot-logs' / 'my-guest')\n"
              "    assert False, 'the guest said no'\n")
    result = inner_pytest(tmp_path, source)
    assert result.returncode == 1
    section = result.stdout.split("boot logs", 1)[1]
    assert "boot-logs/my-guest" in section.splitlines()[1]


def test_the_agent_bin_option_builds_with_the_users_agent(tmp_path: Path) -> None:
    """--osbuilder-agent-bin is AGENT_SOURCE_BIN for the session's fixtures (the boot tests then prove that
    agent over the protocol it records); a missing file is a usage error before anything runs."""
    agent = tmp_path / "bin" / "kata-agent"
    agent.parent.mkdir()
    agent.write_bytes(b"#!/bin/sh\n")
    agent.chmod(0o755)
    source = ("def test_settings(osbuilder_settings):\n"
              "    print('AGENT', osbuilder_settings.agent_source_bin, osbuilder_settings.agent_protocol)\n")
    result = inner_pytest(tmp_path, source, "-s", f"--osbuilder-agent-bin={agent}", env={"AGENT_PROTOCOL": "kata1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"AGENT {agent} kata1" in result.stdout
    missing = inner_pytest(tmp_path, "def test_build(osbuilder_image):\n    pass\n",
                           f"--osbuilder-agent-bin={tmp_path / 'nope'}")
    assert missing.returncode == 4, missing.stdout + missing.stderr
    assert f"--osbuilder-agent-bin: {tmp_path / 'nope'}: no such file" in missing.stderr
    assert not (tmp_path / "workdir").exists()
