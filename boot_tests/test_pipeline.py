"""The README's pipeline, as a user runs it in a project of their own: `pytest -n 2 -m build`, then the
boot gate (`tox -e boot` runs `pytest -n 2 --dist loadgroup -m boot`), then `osbuilder install-image`, all
with the runtime's agent in the environment (AGENT_SOURCE_BIN: the Kata 1.x agent from ../shared/peers,
so the install needs no --force) and one fresh WORKDIR. The bytes installed are the bytes the gate
booted: the published image's, whose boot record the gate's guest wrote when it powered off. The workers of
each session key the rootfs on one archive state; should the archive publish a Release between the two
sessions, the boot session builds, boots and publishes a rootfs from it, and that image is the one the
install must match (`archive_moved`)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from boot_tests.agent_peers import KATA_AGENT, peer
from boot_tests.scratch import remove_later
from boot_tests.user_env import without_settings
from osbuilder.vm import records

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("pipeline")]

USER_BUILD_TESTS = '''
def test_the_image_builds(osbuilder_image):
    assert osbuilder_image.path.stat().st_size > 0
'''

USER_BOOT_TESTS = '''
def test_systemd_is_running(osbuilder_guest):
    assert osbuilder_guest.exec(["systemctl", "is-system-running"]).stdout.strip() == "running"


def test_the_agent_is_the_runtimes(osbuilder_guest):
    assert osbuilder_guest.record()["agent"]["protocol"] == "kata1"
'''


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


ARCHIVE_INPUTS = ("archive_date", "archive_updates")


def archive_moved(workdir: Path) -> bool:
    """Whether WORKDIR's cache holds rootfs entries whose inputs differ in the archive's state only."""
    inputs = [json.loads(m.read_text())["inputs"] for m in (workdir / "cache/rootfs").glob("*/manifest.json")]
    rest = [{k: v for k, v in i.items() if k not in ARCHIVE_INPUTS} for i in inputs]
    return len(inputs) > 1 and all(r == rest[0] for r in rest)


def test_the_image_installed_is_the_image_the_gates_booted(osbuilder_settings) -> None:
    agent = peer(KATA_AGENT)
    # searchable by _apt (mmdebstrap downloads as _apt), like the fixtures' WORKDIR
    home = Path(tempfile.mkdtemp(prefix="osbuilder-pipeline-", dir="/var/tmp"))
    home.chmod(0o755)
    project, workdir, dest = home / "project", home / "workdir", home / "pkg"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_build.py").write_text(USER_BUILD_TESTS)
    (project / "test_boot.py").write_text(USER_BOOT_TESTS)
    env = without_settings()
    env.update(WORKDIR=str(workdir), AGENT_SOURCE_BIN=str(agent), ACCEL=osbuilder_settings.accel,
               CACHE_DIR=str(osbuilder_settings.cache_dir or ""))

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, *argv], cwd=project, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, f"{argv}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    try:
        run("-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-m", "build")
        image = workdir / "container.img"
        built = sha256(image)
        booted = run("-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-m", "boot")
        assert "2 passed" in booted.stdout, booted.stdout
        if archive_moved(workdir):  # rare: a Release was published between the two sessions
            # the boot session keyed its rootfs on the new Release, as every new session does, built and
            # booted it and published its image; that one is what the gate vouches for
            print("the archive published between the build and the boot sessions")
            built = sha256(image)
        record = records.passing_record_of(workdir, built)
        assert record is not None and "nvdimm" in records.passed_attachments(record), record
        installed = run("-m", "osbuilder", "install-image", "--destdir", str(dest))
        assert "--force" not in installed.stdout + installed.stderr
        link = dest / "usr/share/kata-containers/container.img"
        assert sha256(link.resolve()) == built == sha256(image)
        assert image.stat().st_ino in {p.stat().st_ino for p in (workdir / "cache/image").glob("*/container.img")}
    finally:
        remove_later(home)
