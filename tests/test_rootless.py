"""A rootless build, for real: an ordinary user runs `osbuilder rootfs` and `osbuilder image`, and the
image's files have the owners a root-built image gives them (root, the shadow group), not the
user's subordinate ids that the tree has on the host.

The user is named by OSBUILDER_ROOTLESS_USER and needs /etc/subuid and /etc/subgid entries
(`.ci/run` creates `osbuilder-ci`). The test itself runs as root, to act as that user and to look
at the results from outside. The user runs Debian's /usr/bin/python3 with a copy of osbuilder and
its two pure-Python dependencies: the test's own interpreter may live where the user cannot go.
The user's per-user cache is kept from one run to the next (KEPT), as a build host keeps it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import filelock
import pytest
import yaml

import osbuilder
from osbuilder.readback import stat_path

USER = os.environ.get("OSBUILDER_ROOTLESS_USER", "")
SYSTEM_PYTHON = Path("/usr/bin/python3")

pytestmark = [
    pytest.mark.build,
    pytest.mark.xdist_group("rootless"),  # one worker: the user's rootfs and image are built once, not per worker
    pytest.mark.skipif(not USER, reason="set OSBUILDER_ROOTLESS_USER to a user with /etc/subuid and "
                                        "/etc/subgid entries to test rootless builds (.ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="acts as OSBUILDER_ROOTLESS_USER: needs root"),
    pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3 for the user to run"),
]

# Paths whose owner and mode an image must get right; most were made by root in the namespace.
CHECKED = ["/etc/shadow", "/root", "/usr/bin/osbuilder-agent", "/var/lib/osbuilder/osbuilder.yaml",
           "/etc/ssh/sshd_config.d/osbuilder.conf", "/usr/lib/systemd/system/osbuilder-agent.service",
           "/var/log/journal", "/usr/bin/passwd",
           "/etc/systemd/system/multi-user.target.wants/osbuilder-slirp-network.service"]


# The user's per-user cache (~/.cache/osbuilder: its base trees, apt's downloads) from one run to the next, as
# a build host keeps it: the first rootfs takes the base tree from it, while mmdebstrap still runs in the
# namespace for `rootfs -f` and for the unshared CACHE_DIR below. On home's filesystem: moved by a rename.
KEPT = Path("/var/tmp/osbuilder-test-rootless-cache")


def user_ids() -> str:
    """The user's uid and first subordinate ids: a kept cache is the user's only while they stay the same."""
    return f"{pwd.getpwnam(USER).pw_uid} {first_subordinate_id('/etc/subuid')} {first_subordinate_id('/etc/subgid')}\n"


def bring_back_cache(home: Path) -> None:
    """The cache the user's last run kept, as the user's ~/.cache/osbuilder (if the user has the same ids)."""
    kept = KEPT / USER
    with filelock.FileLock(f"{KEPT}.lock"):  # another test session's keep_cache
        if (kept / "ids").is_file() and (kept / "ids").read_text() == user_ids() and (kept / "osbuilder").is_dir():
            pw = pwd.getpwnam(USER)
            (home / ".cache").mkdir()
            os.chown(home / ".cache", pw.pw_uid, pw.pw_gid)
            (kept / "osbuilder").rename(home / ".cache/osbuilder")
        subprocess.run(["rm", "-rf", "--one-file-system", str(kept)], check=True)


def keep_cache(home: Path) -> None:
    """A copy of the user's cache in KEPT, as root: hard links, with the owners, modes and times it has (the base
    trees' files belong to the user's subordinate ids)."""
    kept = KEPT / USER
    with filelock.FileLock(f"{KEPT}.lock"):
        subprocess.run(["rm", "-rf", "--one-file-system", str(kept)], check=True)
        kept.mkdir(parents=True)
        KEPT.chmod(0o700)
        subprocess.run(["cp", "-al", str(home / ".cache/osbuilder"), str(kept / "osbuilder")], check=True)
        (kept / "ids").write_text(user_ids())  # last: a copy without it is not brought back


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A directory the user owns, with a copy of osbuilder the user can import, and the cache its last run kept."""
    pw = pwd.getpwnam(USER)
    base = Path(tempfile.mkdtemp(prefix="osbuilder-rootless-", dir="/var/tmp"))
    base.chmod(0o755)  # mkdtemp's 0700 would keep the namespace out (see test_unreachable_workdir...)
    py = base / "python"
    ignore = shutil.ignore_patterns("__pycache__")
    for module in (osbuilder, yaml, filelock):
        src = Path(module.__file__).parent
        shutil.copytree(src, py / src.name, symlinks=True, ignore=ignore)
    for path in [base, *base.rglob("*")]:
        os.lchown(path, pw.pw_uid, pw.pw_gid)
    bring_back_cache(base)
    yield base
    if not (KEPT / USER).exists() and (base / ".cache/osbuilder").is_dir():  # the prune test keeps it before
        keep_cache(base)
    shutil.rmtree(base)  # as root: the namespace's files too


def as_user(home: Path, step: str, workdir: Path | None = None, path_first: Path | None = None,
            settings: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`osbuilder <step> [flags]` run by USER (WORKDIR defaults to home/workdir; `path_first` goes first in PATH;
    `settings` in the environment). The per-user cache is the default one, HOME/.cache/osbuilder."""
    path = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    env = [f"PATH={path_first}:{path}" if path_first else f"PATH={path}", f"HOME={home}",
           f"PYTHONPATH={home / 'python'}", "LC_ALL=C.UTF-8", *(f"{k}={v}" for k, v in (settings or {}).items())]
    return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *env, str(SYSTEM_PYTHON), "-m", "osbuilder",
                           step, *flags, "--workdir", str(workdir or home / "workdir")],
                          cwd=home, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def unshared_build(home: Path) -> Iterator[tuple[Future[subprocess.CompletedProcess], Path, Path]]:
    """`rootfs` with a CACHE_DIR below a directory others cannot search (a 0700 ~/.cache), in a WORKDIR of its
    own, started in the background before the module's other builds (rootless_build asks for it when the test
    that looks at it runs), so that its mmdebstrap run overlaps theirs: (the run, that directory, that WORKDIR).
    One after the other, the two mmdebstrap runs of this module took 22-58 s each in CI."""
    closed = home / "closed"
    closed.mkdir(mode=0o700)
    os.chown(closed, pwd.getpwnam(USER).pw_uid, -1)
    workdir = home / "unshared"
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(as_user, home, "rootfs", workdir, settings={"CACHE_DIR": str(closed / "cache")}), \
            closed, workdir


@pytest.fixture(scope="module")
def rootless_build(home: Path, request: pytest.FixtureRequest) -> Path:
    if any(item.name == "test_a_cache_the_namespace_cannot_reach_is_not_shared" for item in request.session.items):
        request.getfixturevalue("unshared_build")  # started first: see there
    for step in ("rootfs", "image"):
        r = as_user(home, step)
        assert r.returncode == 0, f"osbuilder {step} as {USER}:\n{r.stderr[-4000:]}"
    drop_other_bases(home, home / "workdir")
    return home / "workdir"


def drop_other_bases(home: Path, workdir: Path) -> None:
    """Remove the kept base trees this build did not use (another osbuilder's keys), so that the user's cache
    holds the one the tests look at."""
    [entry_tree] = (workdir / "cache/rootfs").glob("*/rootfs")
    used = (entry_tree / "usr/bin/passwd").stat().st_ino
    for entry in base_entries(home / ".cache/osbuilder"):
        passwd = entry / "rootfs/usr/bin/passwd"
        if not passwd.exists() or passwd.stat().st_ino != used:
            subprocess.run(["rm", "-rf", "--one-file-system", str(entry)], check=True)
            entry.with_name(entry.name + ".lock").unlink(missing_ok=True)


def first_subordinate_id(path: str) -> int:
    uid = str(pwd.getpwnam(USER).pw_uid)
    for line in Path(path).read_text().splitlines():
        name, start, _count = line.split(":")
        if name in (USER, uid):
            return int(start)
    raise AssertionError(f"{path} has no entry for {USER}")


def test_the_tree_belongs_to_subordinate_ids_on_the_host(rootless_build: Path):
    shadow = (rootless_build / "rootfs/etc/shadow").stat()
    # the namespace's root and shadow group (42), as the host sees them
    assert (shadow.st_uid, shadow.st_gid) == (first_subordinate_id("/etc/subuid"),
                                              first_subordinate_id("/etc/subgid") + 42)


def test_the_rootfs_entry_links_the_base_files_inside_the_namespace(rootless_build: Path, home: Path):
    """The user's rootfs entry and base tree (in WORKDIR and the per-user cache, one filesystem) share their
    files' inodes: the links were made in the namespace, where the subordinate ids that own the files are
    the namespace's, not copied after a failed link."""
    assert " cp -a --link -- " in (rootless_build / "logs/rootfs.log").read_text()
    [base_tree] = (home / ".cache/osbuilder/artifacts/rootfs-base").glob("*/rootfs")
    [entry_tree] = (rootless_build / "cache/rootfs").glob("*/rootfs")
    for path in ("usr/bin/passwd", "etc/shadow", "usr/lib/systemd/systemd"):
        assert (entry_tree / path).stat().st_ino == (base_tree / path).stat().st_ino, path
        assert (rootless_build / "rootfs" / path).stat().st_ino != (base_tree / path).stat().st_ino, path


def test_the_image_has_the_owners_a_root_build_gives(rootless_build: Path, osbuilder_image):
    rootless_image = rootless_build / "container.img"
    assert rootless_image.stat().st_uid == pwd.getpwnam(USER).pw_uid
    assert oct(rootless_image.stat().st_mode & 0o777) == oct(0o644)
    for path in CHECKED:
        got, want = stat_path(rootless_image, path), stat_path(osbuilder_image.path, path)
        assert want is not None and want.uid == 0, (path, want)
        assert (got.uid, got.gid, got.mode) == (want.uid, want.gid, want.mode), path
    shadow = stat_path(rootless_image, "/etc/shadow")
    assert (shadow.uid, shadow.gid, shadow.mode & 0o777) == (0, 42, 0o640)


def test_a_rebuild_replaces_the_tree_and_leaves_nothing_behind(rootless_build: Path, home: Path):
    """`rootfs -f` builds the rootfs and its base tree again (without -f: "up to date") and replaces their cache
    entries; the old ones, owned by subordinate ids, are removed in the namespace: nothing is left behind.
    (WORKDIR/rootfs itself stays: it is already the rebuilt entry's content.)"""
    runs = mmdebstrap_runs(rootless_build)
    entries = [rootless_build / "cache/rootfs", home / ".cache/osbuilder/artifacts/rootfs-base"]
    created = {p: json.loads((p / "manifest.json").read_text())["created"] for kind in entries
               for p in kind.iterdir() if not p.name.endswith(".lock")}
    assert len(created) == 2
    r = as_user(home, "rootfs", flags=("-f",))
    assert r.returncode == 0, r.stderr[-4000:]
    assert mmdebstrap_runs(rootless_build) == runs + 1
    for entry, before in created.items():
        assert json.loads((entry / "manifest.json").read_text())["created"] > before, entry
    for directory in (rootless_build, *entries):
        assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == [], directory


def test_no_other_user_can_write_the_image_while_mke2fs_fills_it(rootless_build: Path, home: Path):
    """mke2fs runs in the tree's namespace, where the user's own files are nobody's: the image file must
    be reachable there without being made writable for every other user (who could change the image
    between mke2fs and the boot check). A stand-in mke2fs first in PATH records what the real one is given."""
    spy = home / "spy"
    spy.mkdir(mode=0o755)
    mke2fs = shutil.which("mke2fs", path="/usr/sbin:/sbin")
    (spy / "mke2fs").write_text(
        "#!/bin/sh\n"
        'for a; do image=$last; last=$a; done\n'  # mke2fs ... IMAGE BLOCKS
        'stat -c "osbuilder-spy: mode %a owner %u" "$image" >&2\n'
        f'exec {mke2fs} "$@"\n')
    (spy / "mke2fs").chmod(0o755)
    r = as_user(home, "image", path_first=spy)
    assert r.returncode == 0, r.stderr[-4000:]
    seen = re.findall(r"osbuilder-spy: mode (\d+) owner (\d+)", (rootless_build / "logs/image.log").read_text())
    assert seen, "the stand-in mke2fs did not run"
    for mode, _owner in seen:
        assert int(mode, 8) & 0o022 == 0, f"the image file was mode {mode} while mke2fs ran"
    image = (rootless_build / "container.img").stat()
    assert (image.st_uid, oct(image.st_mode & 0o777)) == (pwd.getpwnam(USER).pw_uid, oct(0o644))
    assert not [p.name for p in rootless_build.iterdir() if ".tmp-" in p.name]


def mmdebstrap_runs(workdir: Path) -> int:
    return len(re.findall(r"^\+ mmdebstrap --mode=unshare ", (workdir / "logs/rootfs.log").read_text(), re.M))


def base_entries(cache: Path) -> list[Path]:
    kind = cache / "artifacts/rootfs-base"
    return [p for p in kind.iterdir() if not p.name.endswith(".lock")] if kind.is_dir() else []


def test_a_second_agent_reuses_the_users_base_tree(rootless_build: Path, home: Path):
    """The base tree (built by the first rootfs, by -f's rebuild, or kept from the last run) is in the user's cache,
    its files the user's subordinate ids'; a rootfs with another agent in a fresh WORKDIR copies it in the
    namespace instead of running mmdebstrap."""
    [entry] = base_entries(home / ".cache/osbuilder")
    shadow = (entry / "rootfs/etc/shadow").stat()
    assert (shadow.st_uid, shadow.st_gid) == (first_subordinate_id("/etc/subuid"),
                                              first_subordinate_id("/etc/subgid") + 42)
    agent = home / "kata-agent"
    agent.write_text("#!/bin/sh\nexec sleep infinity\n")
    agent.chmod(0o755)
    os.chown(agent, pwd.getpwnam(USER).pw_uid, -1)
    second = home / "second"
    r = as_user(home, "rootfs", second, settings={"AGENT_SOURCE_BIN": str(agent), "AGENT_PROTOCOL": "kata1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert mmdebstrap_runs(second) == 0 and base_entries(home / ".cache/osbuilder") == [entry]
    copied = (second / "rootfs/etc/shadow").stat()
    assert (copied.st_uid, copied.st_gid, copied.st_mode) == (shadow.st_uid, shadow.st_gid, shadow.st_mode)
    unit = second / "rootfs/usr/lib/systemd/system/kata-agent.service"
    assert unit.stat().st_uid == first_subordinate_id("/etc/subuid")  # the overlay's root is the namespace's


def test_a_cache_the_namespace_cannot_reach_is_not_shared(unshared_build):
    """A CACHE_DIR below a directory others cannot search (a 0700 ~/.cache): the namespace could not copy from
    it, so the base is built for the rootfs alone, with one warning saying how to share it."""
    run, closed, workdir = unshared_build
    r = run.result()
    assert r.returncode == 0, r.stderr[-4000:]
    assert (f"rootfs: the base tree is built for this rootfs alone, not shared through CACHE_DIR: {closed} is not "
            "searchable by other users (mode 700)") in r.stderr
    assert mmdebstrap_runs(workdir) == 1 and base_entries(closed / "cache") == []
    assert (workdir / "rootfs/usr/bin/osbuilder-agent").is_file()
    assert not [p.name for p in workdir.rglob(".*tmp-*")]


def test_unreachable_workdir_is_named(home: Path):
    private = home / "private"
    private.mkdir(mode=0o700)
    os.chown(private, pwd.getpwnam(USER).pw_uid, -1)
    r = as_user(home, "rootfs", private / "workdir")
    assert r.returncode == 2, r.stderr
    assert f"WORKDIR: {private} is not searchable by other users (mode 700)" in r.stderr


def test_debian_boot_kernel_without_root(home: Path):
    """Debian's boot kernel and initrd need no root: apt (its own configuration and state in the
    user's cache), dpkg-deb -x, depmod and the compiler run as the user, and what they make is the
    user's."""
    cache = home / "cache"
    vm_deps = home / "python-vm"  # osbuilder.vm imports paramiko (ssh.py): a copy the user can import
    pw = pwd.getpwnam(USER)
    for name in ("paramiko", "cryptography", "bcrypt", "nacl", "cffi", "_cffi_backend", "pycparser"):
        origin = Path(importlib.util.find_spec(name).origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, vm_deps / source.name)
        for info in source.parent.glob(f"{'pynacl' if name == 'nacl' else name}-*.dist-info"):
            shutil.copytree(info, vm_deps / info.name)  # paramiko asks for its own version
    for path in [vm_deps, *vm_deps.rglob("*")]:
        os.lchown(path, pw.pw_uid, pw.pw_gid)
    code = ("from osbuilder import settings; from osbuilder.vm.debian_kernel import debian_kernel; "
            "k = debian_kernel(settings.load({})); print(k.kernel, k.initrd)")
    env = ["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", f"HOME={home}",
           f"PYTHONPATH={home / 'python'}:{vm_deps}", "LC_ALL=C.UTF-8", f"CACHE_DIR={cache}",
           f"WORKDIR={home / 'kernel-workdir'}"]
    r = subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *env, str(SYSTEM_PYTHON), "-c", code],
                       cwd=home, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    kernel, initrd = (Path(p) for p in r.stdout.split())
    uid = pw.pw_uid
    for path in (kernel, initrd):
        assert path.is_relative_to(cache) and path.stat().st_uid == uid and path.stat().st_size > 1 << 20
    commands = (cache / "logs/debian-kernel.log").read_text()
    assert "+ apt-get download linux-image-" in commands and "+ dpkg-deb -x" in commands


def test_cache_prune_removes_the_users_base_trees(rootless_build: Path, home: Path):
    """The user's base trees belong to subordinate ids, which the user's own `rm -rf` cannot remove:
    `osbuilder cache prune --all` removes them, in the namespace (run last: it empties the user's caches)."""
    cache = home / ".cache/osbuilder"
    assert base_entries(cache)
    keep_cache(home)  # for the next run (links: what the prune removes stays there)
    r = as_user(home, "cache", flags=("prune", "--all"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert base_entries(cache) == []  # no entry, no temporary, none renamed away
