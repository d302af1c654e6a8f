"""The base tree (issue 18): rootfs that differ only in osbuilder's files share one mmdebstrap run.

Real builds against the Debian archive (marker `build`), with one SOURCE_DATE_EPOCH:

- the rootfs `osbuilder rootfs` makes from a copy of the cached base is, path for path, the tree one
  mmdebstrap run with the overlay's `tar-in` hook makes (how osbuilder built it before the base tree, kept
  here as `one_run_rootfs`, with the excludes as mmdebstrap's --dpkgopt, as before the extract hook); the
  records of the copies (the rootfs entry's, WORKDIR's) are what hashing every file gives; the base is
  built in a CACHE_DIR below a 0700 directory (as root's own ~/.cache is), which apt's _apt cannot reach,
  the one-run tree in a WORKDIR it can;
- a second rootfs with another agent, in a fresh WORKDIR, reuses the base: one mmdebstrap run in all, and
  the second takes seconds; the two trees differ only in the agent's files.

Faults, with a distribution plugin that writes its tree in Python (no network): a torn base entry is
rebuilt, a full WORKDIR while the base is copied leaves nothing behind, and two processes that need the
same base build it once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
from fakes import workdir_entries
from trees import listing

from osbuilder import cli
from osbuilder import settings as S
from osbuilder.cache import MANIFEST, describe_tree, inspect_entry, tree_record
from osbuilder.deps import Tool
from osbuilder.layout import Workdir
from osbuilder.rootfs import base, distros, policy
from osbuilder.rootfs.build import OVERLAY_DIR, AgentChoice, pack_overlay, packages, stage_overlay, suites
from osbuilder.rootfs.debian import DPKG_FILTER, Debian, hook_word
from osbuilder.rootfs.distro import Distro

EPOCH = "1700000000"
MiB = 1 << 20
MMDEBSTRAP_RUN = re.compile(r"^\+ mmdebstrap --mode=unshare ", re.M)


# -- the one-run build: how osbuilder made a rootfs before the base tree -----------------------------


class OneRunDebian(Debian):
    """Debian, with the overlay unpacked by mmdebstrap's `tar-in` in a customize hook of the same run, and
    the excludes given as mmdebstrap's own --dpkgopt (Debian's extract hook must make the same tree)."""

    def __init__(self, overlay_tar: Path) -> None:
        self.overlay_tar = overlay_tar

    def filter_options(self) -> list[str]:
        return [f"--dpkgopt={line}" for line in DPKG_FILTER]

    def customize_hooks(self) -> list[str]:
        return [*super().customize_hooks(), f"tar-in {hook_word(str(self.overlay_tar))} /"]


def one_run_rootfs(settings: S.Settings, dest: Path, logfile: Path) -> Path:
    """The rootfs as one mmdebstrap run made it: the overlay staged and packed as the rootfs step does, unpacked
    by mmdebstrap's tar-in after the packages, then the image policy."""
    choice = AgentChoice.from_settings(settings)
    overlay, overlay_tar = dest.parent / "overlay", dest.parent / "overlay.tar"
    stage_overlay(settings, choice, packages(settings), overlay, logfile)
    pack_overlay(overlay, overlay_tar, settings.source_date_epoch)
    OneRunDebian(overlay_tar).build(suites(settings), packages(settings), dest, logfile=logfile, verbose=False,
                                    source_date_epoch=settings.source_date_epoch, architecture="amd64")
    policy.apply(dest, logfile)
    policy.verify(dest)
    return dest


def osb(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME or k == "REPO_URL"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=1800)


def mmdebstrap_runs(workdir: Path) -> int:
    return len(MMDEBSTRAP_RUN.findall((workdir / "logs/rootfs.log").read_text()))


@pytest.fixture(scope="module")
def builds() -> Iterator[dict[str, Path]]:
    """`osbuilder rootfs` twice, in two fresh WORKDIRs sharing one CACHE_DIR (osbuilder's agent, then a
    script agent), and the one-run rootfs; every build with SOURCE_DATE_EPOCH. Also the seconds each took."""
    home = Path(tempfile.mkdtemp(prefix="osbuilder-base-", dir="/var/tmp"))
    home.chmod(0o755)  # searchable by apt's _apt user, as the fixtures' WORKDIR
    private = home / "private"
    private.mkdir(mode=0o700)  # ... but not the cache: as root's own ~/.cache (/root is 0700)
    agent = home / "kata-agent"
    agent.write_text("#!/bin/sh\nexec sleep infinity\n")
    agent.chmod(0o755)
    env = {"CACHE_DIR": str(private / "cache"), "SOURCE_DATE_EPOCH": EPOCH}
    found: dict[str, Path] = {"home": home, "cache": private / "cache"}
    one_run = home / "one-run"
    one_run.mkdir()
    s = S.load({}, env={"WORKDIR": str(one_run), "SOURCE_DATE_EPOCH": EPOCH,
                        **({"REPO_URL": os.environ["REPO_URL"]} if os.environ.get("REPO_URL") else {})},
               cwd=home)
    # The one-run tree is made while osbuilder builds its own: the two mmdebstrap runs read the archive at
    # the same time (one after the other, their downloads and the worker's wait were twice as long).
    with ThreadPoolExecutor(max_workers=1) as pool:
        one_run_made = pool.submit(one_run_rootfs, s, one_run / "rootfs", one_run / "rootfs.log")
        try:
            for name, extra in (("first", {}),
                                ("second", {"AGENT_SOURCE_BIN": str(agent), "AGENT_PROTOCOL": "kata1"})):
                started = time.monotonic()
                result = osb("rootfs", "--workdir", str(home / name), env={**env, **extra}, cwd=home)
                assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
                (home / f"{name}.seconds").write_text(f"{time.monotonic() - started:.1f}")
                found[name] = home / name
            one_run_made.result()
            found["one-run"] = one_run
            yield found
        finally:
            one_run_made.cancel()
            wait([one_run_made])
            shutil.rmtree(home)


@pytest.mark.build
@pytest.mark.xdist_group("base-tree")
def test_the_rootfs_is_the_tree_one_mmdebstrap_run_makes(builds):
    """Every path with its type, mode, owner, link target, device and content: the copy of the base with the
    overlay over it is the tree mmdebstrap made when it unpacked the overlay itself."""
    ours, one_run = listing(builds["first"] / "rootfs"), listing(builds["one-run"] / "rootfs")
    assert sorted(set(ours) ^ set(one_run)) == []
    assert {p: (ours[p], one_run[p]) for p in ours if ours[p] != one_run[p]} == {}
    # the base was built where _apt could not reach it (so apt downloaded as root), the one-run tree where it
    # could: apt's download directories are _apt's in both
    base_log = (builds["first"] / "logs/rootfs.log").read_text()
    assert "Download is performed unsandboxed as root" in base_log
    assert "Download is performed unsandboxed as root" not in (builds["one-run"] / "rootfs.log").read_text()
    apt_uid = next(int(line.split(":")[2]) for line in (builds["first"] / "rootfs/etc/passwd").read_text().splitlines()
                   if line.startswith("_apt:"))
    for partial in ("/var/lib/apt/lists/partial", "/var/cache/apt/archives/partial"):
        assert ours[partial][:3] == ("drwx------", apt_uid, 0), partial


@pytest.mark.build
@pytest.mark.xdist_group("base-tree")
def test_a_second_agent_reuses_the_base_in_seconds(builds):
    """A fresh WORKDIR, another AGENT_SOURCE_BIN: no mmdebstrap run, seconds instead of a minute, and a tree that
    differs from the first only in the agent's files."""
    assert mmdebstrap_runs(builds["first"]) == 1
    assert mmdebstrap_runs(builds["second"]) == 0
    first, second = (float((builds["home"] / f"{name}.seconds").read_text()) for name in ("first", "second"))
    print(f"first rootfs (base built) {first:.1f}s, second (base reused) {second:.1f}s")
    assert second < 30 and second < first / 2, (first, second)
    one, two = listing(builds["first"] / "rootfs"), listing(builds["second"] / "rootfs")
    wants = "/etc/systemd/system/multi-user.target.wants/"
    units = "/usr/lib/systemd/system/"
    agent_files = {"/usr/bin/osbuilder-agent", f"{units}osbuilder-agent.service", f"{wants}osbuilder-agent.service",
                   "/usr/bin/kata-agent", f"{units}kata-agent.service", f"{wants}kata-agent.service",
                   "/var/lib/osbuilder/osbuilder.yaml"}
    differ = {p for p in set(one) | set(two) if one.get(p) != two.get(p)}
    assert differ == agent_files
    entries = [p for p in (builds["cache"] / "artifacts" / base.KIND).iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()
    assert not list(entries[0].rglob("ssh_host_*"))  # the image policy holds in the cache too


@pytest.mark.build
@pytest.mark.xdist_group("base-tree")
def test_the_records_of_the_copies_are_what_hashing_every_file_gives(builds):
    """The rootfs entry and WORKDIR's rootfs are copies: their content records take the copied files' hashes
    from the record they were copied from (cache.Copied), and must be what reading every file gives."""
    for name in ("first", "second"):
        wd = Workdir(builds[name])
        published = json.loads(wd.published("rootfs").read_text())
        assert published["contents"]["rootfs"] == describe_tree(wd.rootfs), name
        entry = wd.cache / "rootfs" / published["key"]
        assert tree_record(entry, "rootfs") == describe_tree(entry / "rootfs"), name


# -- faults, with a distribution written in Python ----------------------------------------------------


class PythonDistro(Distro):
    """A distribution whose packages are files written by Python: `big` MiB of random data in one, and each
    build counted in the file the environment names (OSB_TEST_BUILDS)."""

    name = "pydistro"
    releases = ("one",)
    default_release = "one"
    default_mirror = "http://py.invalid/"
    tools = (Tool("tar", "tar", "stands in for the installer"),)
    architectures = {"x86_64": "py64", "aarch64": "pyarm"}
    big = 0
    pause = 0.0
    files: dict[str, bytes] = {}  # more files of the tree: path -> content

    def default_packages(self, agent_init: bool) -> list[str]:
        return ["py-base"]

    def build(self, suites, packages, dest, *, logfile, verbose, source_date_epoch, architecture) -> None:
        with open(os.environ["OSB_TEST_BUILDS"], "a") as f:
            f.write("x")
        time.sleep(self.pause)
        for d in ("usr/sbin", "usr/bin", "usr/lib/systemd", "etc"):
            (dest / d).mkdir(parents=True, exist_ok=True)
        (dest / "usr/lib/systemd/systemd").write_bytes(b"\x7fELF systemd")
        (dest / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
        (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (dest / "usr/lib/data").write_bytes(os.urandom(self.big * MiB))
        for rel, data in self.files.items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)

    def archive_state(self, mirror: str, release: str) -> str:
        return "state 1"

    def package_files(self, tree: Path, package: str) -> list[str]:
        return []


@pytest.fixture
def pydistro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PythonDistro]:
    monkeypatch.setenv("OSB_TEST_BUILDS", str(tmp_path / "builds"))
    (tmp_path / "builds").write_text("")
    with distros.registered(PythonDistro()) as d:
        yield d  # type: ignore[misc]


def script_agent(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexec sleep infinity\n")
    path.chmod(0o755)
    return path


def rootfs_argv(workdir: Path, cache: Path, agent: Path | None = None) -> list[str]:
    argv = ["rootfs", "--distro", "pydistro", "--workdir", str(workdir), "--cache-dir", str(cache)]
    return argv + (["--agent-source-bin", str(agent), "--agent-protocol", "osbuilder"] if agent else [])


def builds_counted(tmp_path: Path) -> int:
    return len((tmp_path / "builds").read_text())


def base_entry(cache: Path) -> Path:
    [entry] = [p for p in (cache / "artifacts" / base.KIND).iterdir() if not p.name.endswith(".lock")]
    return entry


def test_a_torn_base_entry_is_rebuilt(tmp_path: Path, pydistro: PythonDistro, caplog: pytest.LogCaptureFixture):
    cache = tmp_path / "cache"
    assert cli.main(rootfs_argv(tmp_path / "a", cache)) == 0
    assert cli.main(rootfs_argv(tmp_path / "b", cache, script_agent(tmp_path / "kata-agent"))) == 0
    assert builds_counted(tmp_path) == 1  # the second agent reused the base
    entry = base_entry(cache)
    data = entry / "rootfs/usr/lib/data"
    data.write_bytes(b"half")  # what a power loss leaves
    caplog.set_level(logging.INFO, "osbuilder")
    assert cli.main(rootfs_argv(tmp_path / "c", cache, script_agent(tmp_path / "cc-agent"))) == 0
    assert builds_counted(tmp_path) == 2
    assert any(r.getMessage() == f"cache: {base.KIND} {entry.name} is torn (rootfs/usr/lib/data: 4 bytes, "
               f"recorded 0); rebuilding" for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert inspect_entry(entry, base.manifest(S.load({}, env={"DISTRO": "pydistro", "CACHE_DIR": str(cache)},
                                                     cwd=tmp_path)))[1] is None


def test_a_chmod_through_a_rootfs_entrys_link_rebuilds_the_base(tmp_path: Path, pydistro: PythonDistro,
                                                                caplog: pytest.LogCaptureFixture):
    """A cached rootfs's files are hard links to the base's: a chmod of one there (0444 made 0644, as a
    Debian base's usr/lib/udev/hwdb.bin was found) is a chmod of the base, and the next rootfs that needs
    the base sees it and builds the base again, where a record without modes took it as a hit."""
    pydistro.files = {"usr/lib/udev/hwdb.bin": b"hwdb\n"}
    cache = tmp_path / "cache"
    assert cli.main(rootfs_argv(tmp_path / "a", cache)) == 0
    entry = base_entry(cache)
    hwdb = rootfs_entry(tmp_path / "a") / "usr/lib/udev/hwdb.bin"
    assert hwdb.stat().st_ino == (entry / "rootfs/usr/lib/udev/hwdb.bin").stat().st_ino
    built = stat.S_IMODE(hwdb.stat().st_mode)
    hwdb.chmod(built ^ 0o200)
    caplog.set_level(logging.INFO, "osbuilder")
    assert cli.main(rootfs_argv(tmp_path / "b", cache, script_agent(tmp_path / "kata-agent"))) == 0
    assert builds_counted(tmp_path) == 2
    assert any(r.getMessage() == f"cache: {base.KIND} {entry.name} is torn (rootfs/usr/lib/udev/hwdb.bin: mode "
               f"{built ^ 0o200:04o}, recorded {built:04o}); rebuilding" for r in caplog.records), caplog.text
    assert stat.S_IMODE((rootfs_entry(tmp_path / "b") / "usr/lib/udev/hwdb.bin").stat().st_mode) == built


def test_a_full_workdir_while_copying_the_base_leaves_nothing(tmp_path: Path, small_workdir: Path,
                                                              pydistro: PythonDistro,
                                                              capsys: pytest.CaptureFixture[str]):
    """The base (48 MiB) is in CACHE_DIR, the copy does not fit in WORKDIR: one line naming WORKDIR (exit 125), no
    temporary and no rootfs in WORKDIR, the earlier rootfs as it was, the base entry intact."""
    pydistro.big = 48
    cache = tmp_path / "cache"
    earlier = small_workdir / "rootfs"
    earlier.mkdir()
    (earlier / "marker").write_text("the earlier rootfs")
    before = workdir_entries(small_workdir)
    assert cli.main(rootfs_argv(small_workdir, cache)) == 125
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("osbuilder: error:")] == [
        f"osbuilder: error: WORKDIR: no space left on device in {small_workdir} while copying the base tree "
        "(nothing was replaced)"], err
    assert (earlier / "marker").read_text() == "the earlier rootfs" and list(earlier.iterdir()) == [earlier / "marker"]
    assert workdir_entries(small_workdir) == sorted({*before, "logs"})  # no temporary, in the cache neither
    entry = base_entry(cache)
    s = S.load({}, env={"DISTRO": "pydistro", "CACHE_DIR": str(cache)}, cwd=tmp_path)
    assert inspect_entry(entry, base.manifest(s))[1] is None
    assert (entry / "rootfs/usr/lib/data").stat().st_size == 48 * MiB


def test_a_full_cache_dir_while_building_the_base_leaves_nothing(tmp_path: Path, small_workdir: Path,
                                                                 pydistro: PythonDistro,
                                                                 capsys: pytest.CaptureFixture[str]):
    """The base (48 MiB) does not fit in CACHE_DIR: one line naming CACHE_DIR (exit 125), neither an entry nor a
    temporary in it, no rootfs in WORKDIR."""
    pydistro.big = 48
    wd = tmp_path / "wd"
    assert cli.main(rootfs_argv(wd, small_workdir)) == 125
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("osbuilder: error:")] == [
        f"osbuilder: error: CACHE_DIR: no space left on device in {small_workdir} while building the base tree "
        "(nothing was kept)"], err
    assert [p.name for p in (small_workdir / "artifacts" / base.KIND).iterdir() if not p.name.endswith(".lock")] == []
    assert workdir_entries(wd) == ["logs"]


def rootfs_entry(workdir: Path) -> Path:
    wd = Workdir(workdir)
    return wd.cache / "rootfs" / json.loads(wd.published("rootfs").read_text())["key"] / "rootfs"


SSHD_CONF = "etc/ssh/sshd_config.d/osbuilder.conf"  # in osbuilder's overlay


def test_the_rootfs_entry_links_the_base_files_and_never_writes_into_them(tmp_path: Path, pydistro: PythonDistro,
                                                                         caplog: pytest.LogCaptureFixture):
    """The rootfs entry's files are hard links to the cached base's (no file's data is written again:
    bench_rootfs.py), and the step never writes into one: the overlay's file that the base has too replaces
    it in the rootfs only. WORKDIR's rootfs, which a user edits in place, is a copy that shares nothing."""
    pydistro.files = {SSHD_CONF: b"the base's\n", "usr/lib/other": b"other\n"}
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, "osbuilder")
    assert cli.main(rootfs_argv(tmp_path / "wd", cache)) == 0
    assert "rootfs: linking the base tree's files" in caplog.text
    base_tree, entry_tree = base_entry(cache) / "rootfs", rootfs_entry(tmp_path / "wd")
    workdir_tree = tmp_path / "wd/rootfs"
    for rel in ("usr/lib/data", "usr/lib/other", "usr/lib/systemd/systemd", "etc/passwd"):
        assert (entry_tree / rel).stat().st_ino == (base_tree / rel).stat().st_ino, rel
        assert (workdir_tree / rel).stat().st_ino != (entry_tree / rel).stat().st_ino, rel
        assert (workdir_tree / rel).stat().st_nlink == 1, rel
    assert (base_tree / SSHD_CONF).read_bytes() == b"the base's\n"
    overlay_conf = (OVERLAY_DIR / SSHD_CONF).read_bytes()
    assert (entry_tree / SSHD_CONF).read_bytes() == (workdir_tree / SSHD_CONF).read_bytes() == overlay_conf
    with open(workdir_tree / "usr/lib/other", "r+b") as f:  # the user's edit, in place
        f.write(b"EDITED")
    assert (base_tree / "usr/lib/other").read_bytes() == (entry_tree / "usr/lib/other").read_bytes() == b"other\n"
    s = S.load({}, env={"DISTRO": "pydistro", "CACHE_DIR": str(cache)}, cwd=tmp_path)
    assert inspect_entry(base_entry(cache), base.manifest(s))[1] is None


def test_cache_list_counts_the_shared_files_once(tmp_path: Path, pydistro: PythonDistro,
                                                capsys: pytest.CaptureFixture[str]):
    """`cache list`: the rootfs entry's 4 MiB that are the base's files are "hard-linked elsewhere" (removing
    the entry does not free them), and the total counts them once."""
    pydistro.big = 4
    cache = tmp_path / "cache"
    assert cli.main(rootfs_argv(tmp_path / "wd", cache)) == 0
    capsys.readouterr()
    assert cli.main(["cache", "list", "--json", "--workdir", str(tmp_path / "wd"), "--cache-dir", str(cache)]) == 0
    data = json.loads(capsys.readouterr().out)
    entries = {e["kind"]: e["usage"] for c in data["caches"] for e in c["entries"]}
    assert set(entries) == {"rootfs", base.KIND}
    assert entries["rootfs"]["shared_bytes"] >= 4 * MiB and entries[base.KIND]["shared_bytes"] >= 4 * MiB
    both = entries["rootfs"]["disk_bytes"] + entries[base.KIND]["disk_bytes"]
    assert 4 * MiB <= data["totals"]["entries_disk_bytes"] <= both - 4 * MiB


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file immutable (chattr +i) needs root")
def test_a_base_file_that_cannot_be_linked_makes_a_copy(tmp_path: Path, pydistro: PythonDistro,
                                                       caplog: pytest.LogCaptureFixture):
    """A file of the base that cannot be linked (here immutable; elsewhere a file with too many links): the
    half-linked tree is removed and the base copied, and the rootfs is built all the same."""
    cache = tmp_path / "cache"
    assert cli.main(rootfs_argv(tmp_path / "a", cache)) == 0
    stuck = base_entry(cache) / "rootfs/usr/lib/data"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        caplog.set_level(logging.INFO, "osbuilder")
        assert cli.main(rootfs_argv(tmp_path / "b", cache, script_agent(tmp_path / "kata-agent"))) == 0
        assert "could not be linked, copying it instead" in caplog.text
        tree = rootfs_entry(tmp_path / "b")
        assert (tree / "usr/lib/data").stat().st_ino != stuck.stat().st_ino
        assert (tree / "etc/passwd").stat().st_ino != (stuck.parents[2] / "etc/passwd").stat().st_ino
        assert (tree / "usr/bin/kata-agent").is_file() and builds_counted(tmp_path) == 1
        assert [p.name for p in tree.parent.parent.iterdir() if ".tmp-" in p.name] == []
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


def test_a_workdir_on_another_filesystem_gets_a_copy(tmp_path: Path, small_workdir: Path, pydistro: PythonDistro,
                                                     caplog: pytest.LogCaptureFixture):
    """CACHE_DIR and WORKDIR on two filesystems: no link can be made, so the base is copied (not tried file by
    file)."""
    caplog.set_level(logging.INFO, "osbuilder")
    assert cli.main(rootfs_argv(small_workdir, tmp_path / "cache")) == 0
    assert "rootfs: copying the base tree" in caplog.text and "could not be linked" not in caplog.text
    assert (rootfs_entry(small_workdir) / "usr/lib/data").is_file()


def _build_rootfs(argv: list[str]) -> None:
    sys.exit(cli.main(argv))


def test_two_processes_build_the_base_once(tmp_path: Path, pydistro: PythonDistro):
    """Two rootfs with different agents, at once: one waits on the base entry's lock and copies what the other
    built."""
    pydistro.pause = 2.0
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")  # the children inherit the registered distribution
    procs = [ctx.Process(target=_build_rootfs, args=(rootfs_argv(tmp_path / f"wd{i}", cache,
                                                                 script_agent(tmp_path / f"agent{i}")),))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert builds_counted(tmp_path) == 1
    for i in range(2):
        assert (tmp_path / f"wd{i}/rootfs/usr/bin/agent{i}").is_file()
        assert (tmp_path / f"wd{i}/rootfs/usr/lib/data").is_file()
