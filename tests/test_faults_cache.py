"""Faults of the cache and its keys (issue 10): corrupt manifests, other builds' temporaries, torn
entries, `--osbuilder-rebuild` under pytest-xdist, inputs the keys missed, and a full WORKDIR.

The record side (a boot record's hash taken before the boot) is in test_vm.py, the kernel's keys
in test_kernel_config.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fakes import make_tree, workdir_entries
from trees import record_attrs

from osbuilder import cache as cache_mod
from osbuilder import readback
from osbuilder import settings as S
from osbuilder.cache import MANIFEST, TORN_LOG, Cache, Manifest
from osbuilder.errors import InfrastructureError
from osbuilder.rootfs import build as rootfs_build
from osbuilder.rootfs import distros

MiB = 1 << 20


def fill(tmp: Path, counter: Path | None = None) -> None:
    """A small entry: a file, a directory with a file and a symlink."""
    if counter is not None:
        with open(counter, "a") as f:
            f.write("x")
    (tmp / "artifact").write_bytes(b"payload " * 512)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "small").write_text("small\n")
    (tmp / "sub" / "link").symlink_to("../artifact")


def misses(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache miss")]


# -- corrupt manifests and other builds' temporaries --------------------------------------------


def test_a_corrupt_manifest_does_not_break_later_misses(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache = Cache(tmp_path)
    cache.get_or_build(Manifest("rootfs", {"packages": "a", "os": "bookworm"}), fill)
    kind = tmp_path / "rootfs"
    for name, data in (("0bad", b"{not json"), ("1list", b"[1, 2]"), ("2binary", b"\xff\xfe\x00"),
                       ("3noinputs", b'{"kind": "rootfs"}')):
        (kind / name).mkdir()
        (kind / name / MANIFEST).write_bytes(data)
    (kind / "4empty").mkdir()  # a directory without a manifest
    (kind / "5gone").mkdir()
    (kind / "5gone" / MANIFEST).symlink_to("vanished")  # removed between the listing and the read
    caplog.set_level(logging.INFO, "osbuilder")
    entry = cache.get_or_build(Manifest("rootfs", {"packages": "a b", "os": "bookworm"}), fill)
    assert (entry / "artifact").is_file()
    assert misses(caplog) == ["cache miss: rootfs: packages changed: a -> a b"]
    assert Cache(tmp_path / "none").explain_miss(Manifest("rootfs", {})) == ["no earlier build"]


def test_the_miss_explanation_skips_other_builds_temporaries(tmp_path: Path):
    cache = Cache(tmp_path)
    cache.get_or_build(Manifest("k", {"a": "1", "b": "1"}), fill)
    wanted = Manifest("k", {"a": "2", "b": "2"})
    # another worker's build in progress: its manifest is the closest, but it is not an entry yet
    busy = tmp_path / "k" / f".{wanted.key}.tmp-99999"
    busy.mkdir()
    (busy / MANIFEST).write_text(json.dumps({"kind": "k", "key": wanted.key, "inputs": wanted.inputs}))
    vanishing = tmp_path / "k" / ".0000.tmp-99998"
    vanishing.mkdir()
    (vanishing / MANIFEST).symlink_to("removed-by-its-worker")
    assert cache.explain_miss(wanted) == ["a changed: 1 -> 2", "b changed: 1 -> 2"]


# -- torn entries ---------------------------------------------------------------------------------


def _truncate(entry: Path) -> str:
    (entry / "artifact").write_bytes(b"payload ")
    return "artifact: 8 bytes, recorded 4096"


def _delete(entry: Path) -> str:
    (entry / "sub" / "small").unlink()
    return "sub/small: missing"


def _rewrite(entry: Path) -> str:
    data = (entry / "artifact").read_bytes()
    (entry / "artifact").write_bytes(data[:-1] + b"!")
    os.utime(entry / "artifact", ns=(1, 1))  # whatever the clock, the mtime moved
    return "artifact: content changed"


def _retarget(entry: Path) -> str:
    (entry / "sub" / "link").unlink()
    (entry / "sub" / "link").symlink_to("elsewhere")
    return "sub/link: link target changed"


def _extra(entry: Path) -> str:
    (entry / "stray").write_text("left over")
    return "stray: not in its content record"


def _chmod(entry: Path) -> str:
    """What made a base tree's hwdb.bin 0644 where it was built 0444, through a rootfs's hard link to it."""
    before = stat.S_IMODE((entry / "artifact").stat().st_mode)
    os.utime(entry / "artifact", ns=(1, 1))  # as a hit sees it whether or not the mtime moved
    (entry / "artifact").chmod(0o444)
    return f"artifact: mode 0444, recorded {before:04o}"


def _chown(entry: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another owner needs root")
    st = (entry / "sub").stat()
    os.chown(entry / "sub", st.st_uid, 4242)
    return f"sub: owner {st.st_uid}:4242, recorded {st.st_uid}:{st.st_gid}"


def _no_modes(entry: Path) -> str:
    record = json.loads((entry / MANIFEST).read_text())
    del record["record"]  # a record written before modes and owners were recorded
    (entry / MANIFEST).write_text(json.dumps(record))
    return "its content record has no file modes or owners (made by an older osbuilder)"


def _torn_manifest(entry: Path) -> str:
    text = (entry / MANIFEST).read_text()
    (entry / MANIFEST).write_text(text[: len(text) // 2])
    return f"{MANIFEST} is missing or unreadable"


def _old_format(entry: Path) -> str:
    record = json.loads((entry / MANIFEST).read_text())
    del record["contents"]
    (entry / MANIFEST).write_text(json.dumps(record))
    return "no content record (made by an older osbuilder)"


@pytest.mark.parametrize("damage", [_truncate, _delete, _rewrite, _retarget, _extra, _chmod, _chown, _torn_manifest,
                                    _old_format, _no_modes],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_torn_entry_is_a_miss_that_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage):
    cache, counter = Cache(tmp_path / "cache"), tmp_path / "count"
    m = Manifest("thing", {"a": "1"})
    entry = cache.get_or_build(m, lambda t: fill(t, counter))
    why = damage(entry)
    assert readback.cache_entry(cache, m) is None
    caplog.set_level(logging.INFO, "osbuilder")
    assert cache.get_or_build(m, lambda t: fill(t, counter)) == entry
    assert counter.read_text() == "xx"
    torn = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert torn == [f"cache: thing {m.key} is torn ({why}); rebuilding"]
    kept = (cache.root / TORN_LOG).read_text().splitlines()  # when and why, after the warning scrolled by
    assert len(kept) == 1 and kept[0].endswith(f": thing {m.key} is torn ({why}); rebuilt"), kept
    assert (entry / "artifact").read_bytes() == b"payload " * 512 and readback.cache_entry(cache, m) == entry
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


def test_the_manifest_records_every_files_content(tmp_path: Path):
    entry = Cache(tmp_path).get_or_build(Manifest("thing", {"a": "1"}), fill)
    contents = json.loads((entry / MANIFEST).read_text())["contents"]
    st = (entry / "artifact").stat()
    digest = hashlib.sha256(b"payload " * 512).hexdigest()
    assert contents == {"artifact": f"f:{record_attrs(st)}:4096:{st.st_mtime_ns}:{digest}",
                        "sub": f"d:{record_attrs((entry / 'sub').stat())}",
                        "sub/link": "l:../artifact", "sub/small": contents["sub/small"]}
    assert contents["sub/small"].endswith(hashlib.sha256(b"small\n").hexdigest())


def test_a_touched_but_intact_entry_is_a_hit_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache, counter = Cache(tmp_path / "cache"), tmp_path / "count"
    m = Manifest("thing", {"a": "1"})
    entry = cache.get_or_build(m, lambda t: fill(t, counter))
    os.utime(entry / "artifact", ns=(1, 1))  # e.g. a timestamp clamp: the bytes are the same
    hashed: list[str] = []
    real_hash = cache_mod._hash
    monkeypatch.setattr(cache_mod, "_hash", lambda path: hashed.append(path) or real_hash(path))
    assert cache.get_or_build(m, lambda t: fill(t, counter)) == entry
    assert cache.get_or_build(m, lambda t: fill(t, counter)) == entry
    assert counter.read_text() == "x"
    assert hashed == [str(entry / "artifact")]  # read on the first hit only: the record took the new mtime


def test_an_entry_is_on_disk_before_it_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    events: list[str] = []
    monkeypatch.setattr(cache_mod, "_sync_filesystem", lambda path: events.append(f"sync {Path(path).name}"))
    monkeypatch.setattr(cache_mod.fs, "fsync_dir", lambda path: events.append(f"fsync {Path(path).name}"))
    real_publish = cache_mod.publish

    def publish(tmp: Path, dest: Path) -> None:
        assert (tmp / MANIFEST).is_file()  # the record is part of what was synced
        events.append(f"publish {dest.name}")
        real_publish(tmp, dest)

    monkeypatch.setattr(cache_mod, "publish", publish)
    m = Manifest("thing", {"a": "1"})
    Cache(tmp_path).get_or_build(m, fill)
    assert events == [f"sync .{m.key}.tmp-{os.getpid()}", f"publish {m.key}", "fsync thing"]


# -- --osbuilder-rebuild, once per session ------------------------------------------------------------------


def _rebuilding_worker(root: str, counter: str, seen: str) -> None:
    entry = Cache(Path(root)).get_or_build(Manifest("shared", {"k": "v"}), lambda t: fill(t, Path(counter)),
                                           rebuild=True, session="this-run")
    with open(seen, "a") as f:
        f.write(f"{(entry / 'artifact').stat().st_ino}\n")


def test_rebuild_rebuilds_once_per_session_and_keeps_what_the_session_made(tmp_path: Path):
    root, counter, seen = tmp_path / "c", tmp_path / "count", tmp_path / "seen"
    m = Manifest("shared", {"k": "v"})
    Cache(root).get_or_build(m, lambda t: fill(t, counter), session="an-earlier-run")
    procs = [multiprocessing.Process(target=_rebuilding_worker, args=(str(root), str(counter), str(seen)))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "xx"  # the earlier run's entry was rebuilt once, not three times
    inodes = set(seen.read_text().split())
    assert inodes == {str((Cache(root).entry(m) / "artifact").stat().st_ino)}  # nobody's entry was replaced


INNER_CONFTEST = """
import os
from pathlib import Path

from osbuilder.rootfs import build


def fake_build_rootfs(settings, dest, **kw):
    dest.mkdir()
    (dest / "marker").write_text(str(os.getpid()))
    with open(os.environ["OSB_TEST_COUNTER"], "a") as f:
        f.write("x")
    return {}  # nothing copied from a base tree


build.build_rootfs = fake_build_rootfs
"""

INNER_TESTS = """
def test_one(osbuilder_rootfs):
    assert (osbuilder_rootfs.path / "marker").is_file()


def test_two(osbuilder_rootfs):
    assert (osbuilder_rootfs.path / "marker").is_file()
"""


def test_pytest_xdist_rebuild_builds_each_artifact_once(tmp_path: Path):
    """`pytest -n 2 --osbuilder-rebuild`: both workers ask for the rootfs; it is built once, and the entry the
    first worker made is not deleted by the second."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(INNER_CONFTEST)
    (suite / "test_inner.py").write_text(INNER_TESTS)
    counter = tmp_path / "count"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OSB_TEST_COUNTER=str(counter), CACHE_DIR=str(tmp_path / "user-cache"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           f"--osbuilder-workdir={tmp_path / 'wd'}", str(suite)]

    def run(*args: str) -> None:
        out = subprocess.run([*cmd, *args], cwd=suite, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr

    run()  # an earlier session's entry
    assert counter.read_text() == "x"
    run("-n", "2", "--dist", "each", "--osbuilder-rebuild")
    assert counter.read_text() == "xx"


class Publishing(ThreadingHTTPServer):
    """A mirror that publishes a new Release of every suite between any two requests: each InRelease it
    serves has a Date one minute later than the one before."""

    def __init__(self) -> None:
        self.served = 0
        lock = threading.Lock()
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
                if not self.path.endswith("/InRelease"):
                    self.send_error(404)
                    return
                with lock:
                    mirror.served += 1
                    minute = mirror.served
                body = (f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\n"
                        f"Date: Sat, 10 Jan 2026 10:{minute:02d}:00 UTC\nMD5Sum:\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_pytest_xdist_workers_key_the_rootfs_on_one_archive_state(tmp_path: Path):
    """`pytest -n 2` while the archive publishes: the workers of one run key the rootfs on the archive state
    the first of them read, so it is built once (each asking for itself, they built and booted a rootfs
    each, and the image WORKDIR published was not the one the other worker's gate booted). The next run
    reads the archive again and builds from its new state."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(INNER_CONFTEST)
    (suite / "test_inner.py").write_text(INNER_TESTS)
    counter = tmp_path / "count"
    mirror = Publishing()
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OSB_TEST_COUNTER=str(counter), CACHE_DIR=str(tmp_path / "user-cache"),
               REPO_URL=f"http://127.0.0.1:{mirror.server_address[1]}/debian")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "2",
           "--dist", "each", f"--osbuilder-workdir={tmp_path / 'wd'}", str(suite)]
    try:
        for runs in ("x", "xx"):
            out = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "4 passed" in out.stdout, out.stdout
            assert counter.read_text() == runs, f"after {mirror.served} requests to the mirror"
        assert mirror.served == 6  # a run's first worker reads the release, -updates and -security once
    finally:
        mirror.shutdown()
        mirror.server_close()


# -- keys that missed inputs ----------------------------------------------------------------------


def key_settings(tmp_path: Path, **env: str) -> S.Settings:
    return S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "user-cache"), **env},
                  cwd=tmp_path)


@pytest.fixture
def archive(tmp_path: Path, fresh_archive_reads: None) -> Iterator[tuple[str, Path]]:
    """A local mirror with dists/bookworm/InRelease: (REPO_URL, the InRelease file)."""
    root = tmp_path / "mirror"
    release = root / "debian" / "dists" / "bookworm" / "InRelease"
    for path in (release, root / "debian/dists/bookworm-updates/InRelease",
                 root / "debian-security/dists/bookworm-security/InRelease"):
        path.parent.mkdir(parents=True)
        path.write_text("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\n"
                        "Codename: bookworm\nDate: Sat, 10 Jan 2026 10:00:00 UTC\nMD5Sum:\n")

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, directory=str(root), **kw)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/debian", release
    finally:
        server.shutdown()
        server.server_close()


def test_rootfs_key_follows_the_archives_release(tmp_path: Path, archive, caplog: pytest.LogCaptureFixture):
    from osbuilder.rootfs import inputs

    url, release = archive
    s = key_settings(tmp_path, REPO_URL=url)
    first = rootfs_build.manifest(s)
    assert first.inputs["archive_date"] == "Sat, 10 Jan 2026 10:00:00 UTC"
    release.write_text(release.read_text().replace("10 Jan", "17 Jan"))  # a point release
    inputs._SEEN.clear()  # a new process
    second = rootfs_build.manifest(s)
    assert second.key != first.key and second.inputs["archive_date"] == "Sat, 17 Jan 2026 10:00:00 UTC"
    release.unlink()  # the mirror cannot be asked: the date last seen stands in, saying so
    inputs._SEEN.clear()
    caplog.set_level(logging.WARNING, "osbuilder")
    assert rootfs_build.manifest(s).inputs["archive_date"] == second.inputs["archive_date"]
    assert any("keying the cached rootfs on the archive state last seen: Sat, 17 Jan" in r.getMessage()
               for r in caplog.records)


def test_a_mirror_node_that_lags_behind_does_not_move_the_key_back(tmp_path: Path, archive,
                                                                   caplog: pytest.LogCaptureFixture):
    """deb.debian.org is a CDN: for a while after a Release is published one request may reach a node that
    has it and the next one a node that has not. The older Date does not key a new rootfs (the next
    session would build it, and the one after would build the newer one again); a newer one still does."""
    from osbuilder.rootfs import inputs

    url, release = archive
    s = key_settings(tmp_path, REPO_URL=url)
    release.write_text(release.read_text().replace("10 Jan", "17 Jan"))
    seen = rootfs_build.manifest(s)
    release.write_text(release.read_text().replace("17 Jan", "10 Jan"))  # a node not updated yet
    inputs._SEEN.clear()  # the next process
    caplog.set_level(logging.INFO, "osbuilder")
    lagging = rootfs_build.manifest(s)
    assert lagging.key == seen.key and lagging.inputs["archive_date"] == "Sat, 17 Jan 2026 10:00:00 UTC"
    assert any("says its Release is of Sat, 10 Jan 2026 10:00:00 UTC, older than the Sat, 17 Jan 2026 10:00:00 "
               "UTC already seen" in r.getMessage() for r in caplog.records)
    release.write_text(release.read_text().replace("10 Jan", "24 Jan"))  # the next point release
    inputs._SEEN.clear()
    assert rootfs_build.manifest(s).inputs["archive_date"] == "Sat, 24 Jan 2026 10:00:00 UTC"


def test_rootfs_key_follows_the_security_and_updates_suites(tmp_path: Path, archive):
    """A security update (a new bookworm-security Release) makes a new rootfs, and the miss says which
    suite moved; with SECURITY_UPDATES=no only the release counts."""
    from osbuilder.rootfs import inputs

    url, release = archive
    security = release.parents[3] / "debian-security/dists/bookworm-security/InRelease"
    s = key_settings(tmp_path, REPO_URL=url)
    first = rootfs_build.manifest(s)
    assert first.inputs["archive_updates"] == ("bookworm-updates Sat, 10 Jan 2026 10:00:00 UTC; "
                                               "bookworm-security Sat, 10 Jan 2026 10:00:00 UTC")
    assert first.inputs["suites"] == f"bookworm@{url} bookworm-updates@{url} bookworm-security@{url}-security"
    pinned = rootfs_build.manifest(s.with_values(SECURITY_UPDATES="no"))
    assert pinned.inputs["archive_updates"] == "none" and pinned.key != first.key
    security.write_text(security.read_text().replace("10 Jan", "12 Jan"))  # a DSA was published
    inputs._SEEN.clear()
    second = rootfs_build.manifest(s)
    assert second.key != first.key and "bookworm-security Sat, 12 Jan" in second.inputs["archive_updates"]
    assert rootfs_build.manifest(s.with_values(SECURITY_UPDATES="no")).key == pinned.key


def test_rootfs_key_follows_the_distribution_plugins_code(tmp_path: Path, archive,
                                                            monkeypatch: pytest.MonkeyPatch):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("from osbuilder.rootfs.debian import Debian\n\n\nclass Plugin(Debian):\n    pass\n")
    spec = importlib.util.spec_from_file_location("my_plugin", plugin)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_plugin", module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(distros.DISTROS, "debian", module.Plugin())
    s = key_settings(tmp_path, REPO_URL=archive[0])
    before = rootfs_build.manifest(s).key
    plugin.write_text(plugin.read_text() + "    # the way packages are installed changed\n")
    assert rootfs_build.manifest(s).key != before


def test_rootfs_key_follows_the_guest_architecture(tmp_path: Path, archive):
    """ARCH, not the host, decides the tree's architecture and the agent's compiler: both are in the key."""
    host = rootfs_build.manifest(key_settings(tmp_path, REPO_URL=archive[0]))
    other = "x86_64" if os.uname().machine == "aarch64" else "arm64"
    foreign = rootfs_build.manifest(key_settings(tmp_path, REPO_URL=archive[0], ARCH=other))
    assert foreign.key != host.key
    assert (host.inputs["arch"], foreign.inputs["arch"]) in (("amd64", "arm64"), ("arm64", "amd64"))
    assert foreign.inputs["agent_toolchain"].startswith(("aarch64-linux-gnu-gcc", "x86_64-linux-gnu-gcc"))


def test_rootfs_key_follows_the_agents_toolchain(tmp_path: Path, archive, monkeypatch: pytest.MonkeyPatch):
    libc = tmp_path / "libc.a"
    libc.write_bytes(b"!<arch>\none\n")
    cc = tmp_path / "fake-cc"

    def compiler(version: str) -> None:
        cc.write_text(f'#!/bin/sh\ncase "$1" in\n  --version) echo "{version}";;\n'
                      f'  -print-file-name=libc.a) echo "{libc}";;\nesac\n')
        cc.chmod(0o755)

    compiler("gcc (Debian 12.2.0-14) 12.2.0")
    monkeypatch.setenv("CC", str(cc))
    s = key_settings(tmp_path, REPO_URL=archive[0])
    first = rootfs_build.manifest(s)
    compiler("gcc (Debian 12.2.0-14+deb12u1) 12.2.0")
    second = rootfs_build.manifest(s)
    libc.write_bytes(b"!<arch>\ntwo, a security update\n")
    third = rootfs_build.manifest(s)
    assert first.key != second.key != third.key != first.key
    assert second.inputs["agent_toolchain"].startswith("gcc (Debian 12.2.0-14+deb12u1) 12.2.0; libc.a ")
    agent = tmp_path / "kata-agent"  # a binary of the user's: the host's toolchain plays no part
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    own = key_settings(tmp_path, REPO_URL=archive[0], AGENT_SOURCE_BIN=str(agent), AGENT_PROTOCOL="kata1")
    before = rootfs_build.manifest(own).inputs
    compiler("gcc 99")
    assert rootfs_build.manifest(own).inputs["agent_toolchain"] == before["agent_toolchain"]


# -- a full WORKDIR -------------------------------------------------------------------------------


def big_tree(root: Path) -> Path:
    """A bootable-looking tree with 48 MiB of data that does not compress into holes."""
    make_tree(root)
    (root / "usr/lib/data").write_bytes(os.urandom(48 * MiB))
    return root


@pytest.mark.parametrize("fill_first", [False, True], ids=["fills-during-mke2fs", "already-full"])
def test_image_on_a_full_workdir_fails_cleanly(tmp_path: Path, small_workdir: Path, fill_first: bool):
    big_tree(small_workdir.parent / "tree")
    (small_workdir / "rootfs").symlink_to(small_workdir.parent / "tree")
    earlier = small_workdir / "container.img"
    earlier.write_bytes(b"the earlier image")
    if fill_first:  # nothing left at all: sfdisk fails without a word
        subprocess.run(["dd", "if=/dev/zero", f"of={small_workdir / 'filler'}", "bs=1M"], capture_output=True)
    before = sorted(p.name for p in small_workdir.iterdir())
    out = subprocess.run([sys.executable, "-m", "osbuilder", "image", "--workdir", str(small_workdir)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("osbuilder: error:")]
    assert out.returncode == 125, out.stderr
    assert errors == [f"osbuilder: error: WORKDIR: no space left on device in {small_workdir} while making "
                      "container.img (nothing was replaced)"]
    assert "Traceback" not in out.stderr
    assert earlier.read_bytes() == b"the earlier image"
    assert workdir_entries(small_workdir) == sorted({*before, "logs"})  # no temporary left, in the cache neither


def test_a_cache_fill_on_a_full_workdir_fails_cleanly(tmp_path: Path, small_workdir: Path):
    from osbuilder.pytest_plugin import Artifact, Artifacts

    cache = Cache(small_workdir / "cache")
    earlier = cache.get_or_build(Manifest("image", {"an": "earlier image"}), fill)
    s = key_settings(tmp_path, WORKDIR=str(small_workdir))
    rootfs = Artifact(big_tree(tmp_path / "tree"), Manifest("rootfs", {"a": "tree"}))
    with pytest.raises(InfrastructureError) as e:
        Artifacts(cache).image(s, rootfs)
    assert e.value.message.startswith(f"WORKDIR: no space left on device in {small_workdir} while making")

    def python_fill(tmp: Path) -> None:  # a build step that writes itself (OSError, not a tool's output)
        (tmp / "big").write_bytes(os.urandom(40 * MiB))

    with pytest.raises(InfrastructureError) as e:
        cache.get_or_build(Manifest("image", {"a": "python"}), python_fill)
    assert e.value.message.startswith(f"WORKDIR: no space left on device in {small_workdir}/cache while caching")
    assert "\n" not in e.value.message
    entries = sorted(p.name for p in (small_workdir / "cache" / "image").iterdir() if not p.name.endswith(".lock"))
    assert entries == [earlier.name]  # no temporary, no half-written entry
    assert readback.cache_entry(cache, Manifest("image", {"an": "earlier image"})) == earlier  # intact


def test_debians_boot_kernel_on_a_full_cache_dir_fails_cleanly(tmp_path: Path, small_workdir: Path):
    """Debian's boot kernel is made in CACHE_DIR: apt's lists alone outgrow a 32 MiB one. One line naming
    CACHE_DIR (exit 125), and neither an entry nor a temporary left."""
    image = tmp_path / "container.img"
    image.write_bytes(bytes(1 << 20))
    env = {**os.environ, "CACHE_DIR": str(small_workdir), "WORKDIR": str(tmp_path / "wd"), "BOOT_IMAGE": str(image),
           "BOOT_KERNEL": "debian", "BOOT_PROFILE": "virtio-blk", "ACCEL": "tcg"}
    out = subprocess.run([sys.executable, "-m", "osbuilder", "boot", "--check"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    errors = [line for line in out.stderr.splitlines() if line.startswith("osbuilder: error:")]
    assert out.returncode == 125, out.stderr
    assert errors == [f"osbuilder: error: CACHE_DIR: no space left on device in {small_workdir} while making "
                      "Debian's boot kernel (nothing was kept)"], out.stderr
    entries = small_workdir / "artifacts/debian-kernel"
    assert [p.name for p in entries.iterdir() if not p.name.endswith(".lock")] == []
