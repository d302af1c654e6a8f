"""What a fresh rootfs holds (issue 20, items 8, 9 and 12): the release's security and stable updates,
and nothing of the machine that built it; and a package that is not in the archive fails in seconds.

Real builds against the Debian archive (marker `build`): one as the host is, one in a mount and UTS
namespace where the host has another name and another DNS configuration, both with one
SOURCE_DATE_EPOCH; the two trees must be the same file for file.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from trees import listing, package_versions

from osbuilder import settings as S

EPOCH = "1700000000"
RELEASE = "bookworm"
MIRROR = os.environ.get("REPO_URL") or "http://deb.debian.org/debian"

pytestmark = [pytest.mark.build, pytest.mark.xdist_group("rootfs-contents")]


def osb(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME or k == "REPO_URL"}
    full_env.update(env or {})
    return subprocess.run([*(prefix or []), sys.executable, "-m", "osbuilder", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=1800)


@pytest.fixture(scope="module")
def builds() -> Iterator[tuple[Path, Path]]:
    """Two rootfs from the same inputs: (as this host is, on a host called other-builder with its own DNS)."""
    home = Path(tempfile.mkdtemp(prefix="osbuilder-contents-", dir="/var/tmp"))
    home.chmod(0o755)  # searchable by apt's _apt user, as the fixtures' WORKDIR
    fake = home / "fake-host"
    fake.mkdir()
    (fake / "hostname").write_text("other-builder\n")
    # another host's DNS configuration (that still resolves the mirror: apt runs outside the chroot)
    (fake / "resolv.conf").write_text(Path("/etc/resolv.conf").read_text() + "search builders.example\n")
    (fake / "resolv.conf").chmod(0o755)  # the host's mode reached the image too
    elsewhere = ["unshare", "--mount", "--uts", "--", "sh", "-c",
                 f'mount --bind {fake}/hostname /etc/hostname && mount --bind {fake}/resolv.conf /etc/resolv.conf '
                 '&& hostname other-builder && exec "$@"', "sh"]
    # Here: the user's CACHE_DIR, whose base tree for these inputs one mmdebstrap run on this host made (in
    # this run or an earlier one; the container test's host build shares it). Elsewhere: a CACHE_DIR of its
    # own, so its base is a second mmdebstrap run, on a host with another name and DNS. The two build at the
    # same time, as two hosts would: they read the archive in the same minute.
    hosts = {"here": (None, {}), "elsewhere": (elsewhere, {"CACHE_DIR": str(home / "cache")})}
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        runs = {name: pool.submit(osb, "rootfs", "--workdir", str(home / name), prefix=prefix, cwd=home,
                                  env={"SOURCE_DATE_EPOCH": EPOCH, **cache})
                for name, (prefix, cache) in hosts.items()}
    for name, run in runs.items():
        result = run.result()
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    yield home / "here/rootfs", home / "elsewhere/rootfs"
    shutil.rmtree(home)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="gives the build another host name with unshare and mount "
                                                        "(root); CI runs as root")


@needs_root
def test_the_rootfs_is_installed_with_the_releases_security_and_stable_updates(builds):
    tree, _ = builds
    sources = (tree / "etc/apt/sources.list").read_text()
    security = MIRROR.rstrip("/").rpartition("/")[0] + "/debian-security"
    for line in (f"{MIRROR} {RELEASE} main", f"{MIRROR} {RELEASE}-updates main",
                 f"{security} {RELEASE}-security main"):
        assert line in sources, sources
    meta = yaml.safe_load((tree / "var/lib/osbuilder/osbuilder.yaml").read_text())
    assert [s["suite"] for s in meta["distro"]["suites"]] == [RELEASE, f"{RELEASE}-updates", f"{RELEASE}-security"]
    installed = package_versions((tree / "var/lib/dpkg/status").read_text())
    released = release_versions()
    newer = {p: (released[p], v) for p, v in installed.items() if p in released and newer_than(v, released[p])}
    assert newer, "every installed package is at its release version: no update was installed"
    print(f"newer than {RELEASE}'s own: {newer}")


def release_versions() -> dict[str, str]:
    """Package -> version in the release suite itself (its main Packages index)."""
    url = f"{MIRROR.rstrip('/')}/dists/{RELEASE}/main/binary-amd64/Packages.xz"
    with urllib.request.urlopen(url, timeout=120) as response:
        text = lzma.decompress(response.read()).decode()
    versions = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if "Package" in fields:
            versions[fields["Package"]] = fields["Version"]
    return versions


def newer_than(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


@needs_root
def test_two_hosts_build_the_same_tree(builds):
    """Every path, type, mode, owner, link target and content hash; the host's name and DNS nowhere."""
    here, elsewhere = listing(builds[0]), listing(builds[1])
    assert sorted(set(here) ^ set(elsewhere)) == []
    assert {p: (here[p], elsewhere[p]) for p in here if here[p] != elsewhere[p]} == {}
    assert (builds[0] / "etc/hostname").read_text() == "localhost\n"
    assert (builds[0] / "etc/resolv.conf").read_text() == ""
    assert here["/etc/hostname"][0] == here["/etc/resolv.conf"][0] == "-rw-r--r--"
    host_name = os.uname().nodename.encode()
    for path in ("etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mailname"):
        for tree in builds:
            if (tree / path).is_file():
                assert b"other-builder" not in (tree / path).read_bytes()
                assert host_name not in (tree / path).read_bytes() or host_name == b"localhost"


def test_a_package_that_is_not_in_the_archive_fails_in_seconds(tmp_path: Path):
    started = time.monotonic()
    result = osb("rootfs", "--workdir", str(tmp_path / "wd"), "--extra-pkgs", "no-such-package-osbuilder",
                 cwd=tmp_path)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("osbuilder: error:")]
    assert line == (f"osbuilder: error: EXTRA_PKGS: package(s) not found in {RELEASE}, {RELEASE}-updates, "
                    f"{RELEASE}-security: no-such-package-osbuilder")
    assert took < 45, f"took {took:.0f}s: apt knew at once, the build went on"
    assert not (tmp_path / "wd/rootfs").exists()
