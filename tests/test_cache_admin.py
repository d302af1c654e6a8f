"""`osbuilder cache list|verify|prune` (issue 20, item 10): real cache entries made by `Cache.get_or_build`,
WORKDIR's real publish, the real CLI in a subprocess; a second process holds an entry's lock or names it
on its command line. The container engine is a stand-in script (`podman` on PATH) for every test here, so
no test lists or removes the host's real tools images."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import lock_held_elsewhere

import osbuilder.cli  # noqa: F401 - registers the subcommands (the tools image's tag reads their packages)
from osbuilder import artifacts, cache_admin, layout, readback
from osbuilder import settings as S
from osbuilder.cache import MANIFEST, Cache, Manifest, check_entry
from osbuilder.container import engine as engine_mod
from osbuilder.container import tools_image
from osbuilder.settings import TABLE

DAY = 86400

FAKE_ENGINE = '''#!{python}
"""A container engine's image commands, over a JSON state file: images, image inspect, rmi."""
import json, os, sys
state_file = os.environ["FAKE_ENGINE_STATE"]
with open(os.environ["FAKE_ENGINE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
state = json.load(open(state_file))
if state.get("down"):
    sys.exit("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?")
args = sys.argv[1:]
if args[0] == "images":
    print("\\n".join(state["images"]))
elif args[:2] == ["image", "inspect"]:
    fmt, refs = args[3], args[4:]
    for ref in refs:
        if ref in state["images"]:
            image = state["images"][ref]
            print(f"{{image['id']}}\\t{{image['size']}}\\t{{image['created']}}")
        elif ref in state.get("bases", {{}}) and fmt == "{{{{.Id}}}}":
            print(state["bases"][ref])
        else:
            sys.exit(f"Error: {{ref}}: image not known")
elif args[0] == "rmi":
    if args[1] in state.get("in_use", []):
        sys.exit(f"Error: image used by 1f2e3d: image is in use by a container: consider listing external containers")
    del state["images"][args[1]]
    json.dump(state, open(state_file, "w"))
else:
    sys.exit(f"fake engine: {{args}} not understood")
'''


class FakeEngine:
    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.state = root / "engine-state.json"
        self.log = root / "engine-log.jsonl"
        script = self.bin / "podman"
        script.write_text(FAKE_ENGINE.format(python=sys.executable))
        script.chmod(0o755)
        self.set(images={})

    def set(self, **state: object) -> None:
        self.state.write_text(json.dumps(state))

    def images(self) -> list[str]:
        return sorted(json.loads(self.state.read_text())["images"])

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture(autouse=True)
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    """The stand-in engine, first on PATH, and the only one CONTAINER_ENGINE names (here and in the CLI runs)."""
    fake = FakeEngine(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CONTAINER_ENGINE", "podman")
    monkeypatch.setenv("FAKE_ENGINE_STATE", str(fake.state))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(fake.log))
    return fake


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(WORKDIR, CACHE_DIR), for this process and the CLI runs."""
    wd, uc = tmp_path / "wd", tmp_path / "user-cache"
    monkeypatch.setenv("WORKDIR", str(wd))
    monkeypatch.setenv("CACHE_DIR", str(uc))
    return wd, uc


def environment() -> dict[str, str]:
    """This process's environment without osbuilder's settings but the ones the fixtures set."""
    ours = {s.name for s in TABLE} - {"WORKDIR", "CACHE_DIR", "CONTAINER_ENGINE"}
    return {k: v for k, v in os.environ.items() if k not in ours}


def settings() -> S.Settings:
    return S.load({}, env=environment(), cwd=Path(os.environ["WORKDIR"]).parent)


def osb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True, timeout=120,
                          env=environment(), cwd=Path(os.environ["WORKDIR"]).parent)


def fill(tmp: Path, counter: Path | None = None, files: int = 3) -> None:
    """A small entry: a kernel-like file, a directory of files and a symlink."""
    if counter is not None:
        with open(counter, "a") as f:
            f.write("x")
    (tmp / layout.VMLINUZ).write_bytes(bytes(range(256)) * 64)
    (tmp / "sub").mkdir()
    for i in range(files):
        (tmp / "sub" / f"file{i}").write_text(f"file {i}\n")
    (tmp / "sub" / "link").symlink_to(f"../{layout.VMLINUZ}")


def flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def last_used(entry: Path, days_ago: float) -> None:
    t = time.time() - days_ago * DAY
    os.utime(entry / MANIFEST, (t, t))


def hidden(kind_dir: Path) -> list[str]:
    return sorted(p.name for p in kind_dir.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts, killed (by their pid) after it."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


# -- verify: the case ---------------------------------------------------------------------------------


def kernel_files(tmp: Path, counter: Path) -> None:
    """A stand-in kernel build's outputs (every file WORKDIR publishes of a kernel)."""
    with open(counter, "a") as f:
        f.write("x")
    for i, path in enumerate(layout.KernelFiles(tmp).all()):
        path.write_bytes(bytes([i]) * 1000 + bytes(range(256)) * 64)


def test_verify_finds_a_same_size_same_mtime_corruption_that_a_hit_does_not(tmp_path: Path, dirs):
    """The issue's case: a cached kernel corrupted in place, same size, same mtime, was used as a hit."""
    wd, uc = dirs
    s, counter = settings(), tmp_path / "count"
    m = Manifest("kernel", {"version": "6.1", "fragments": "abc"})

    def kernel_step() -> artifacts.Published:  # `osbuilder kernel`, its build a stand-in
        return artifacts.build_and_publish(s, "kernel", m, lambda a: artifacts.Artifact(
            a.cache.get_or_build(m, lambda tmp: kernel_files(tmp, counter)), m), force=False)

    assert kernel_step().fresh
    cache = Cache(wd / "cache")
    entry = cache.entry(m)
    vmlinuz, good = entry / layout.VMLINUZ, (entry / layout.VMLINUZ).read_bytes()
    assert os.path.samefile(vmlinuz, layout.Workdir(wd).kernel.vmlinuz)  # WORKDIR's is a hard link to it
    other = Cache(uc / "artifacts", "CACHE_DIR").get_or_build(Manifest("debian-kernel", {"r": "bookworm"}), fill)
    flip_a_byte_keeping_size_and_mtime(vmlinuz)

    assert not kernel_step().fresh and cache.get_or_build(m, lambda t: kernel_files(t, counter)) == entry
    assert counter.read_text() == "x" and readback.cache_entry(cache, m) == entry  # the hits do not notice ...

    found = osb("cache", "verify")  # ... verify does
    assert found.returncode == 1, found.stderr
    assert (f"corrupt: {entry}: {layout.VMLINUZ}: content changed (same size and mtime); WORKDIR's kernel is "
            "published from it") in found.stdout.splitlines()
    assert str(other) not in found.stdout
    assert "2 entries" in found.stdout and "1 intact, 1 corrupt" in found.stdout
    assert found.stderr.strip().splitlines()[-1] == (
        "osbuilder: error: cache verify: 1 corrupt cache entry (above); `osbuilder cache verify --remove` "
        "removes them, the next use rebuilds")
    assert entry.is_dir() and not kernel_step().fresh  # verify alone changes nothing

    removed = osb("cache", "verify", "--remove")
    assert removed.returncode == 0, removed.stderr
    assert (f"corrupt, removed: {entry}: {layout.VMLINUZ}: content changed (same size and mtime); WORKDIR's kernel "
            "was published from it: `osbuilder kernel` rebuilds it") in removed.stdout.splitlines()
    assert not entry.exists() and other.is_dir()
    assert hidden(entry.parent) == []  # renamed away, then deleted: nothing left beside the entries

    assert kernel_step().fresh  # the next build rebuilds it, and WORKDIR's copy is the good one again
    assert counter.read_text() == "xx"
    assert vmlinuz.read_bytes() == good == layout.Workdir(wd).kernel.vmlinuz.read_bytes()
    clean = osb("cache", "verify")
    assert clean.returncode == 0 and "2 intact, 0 corrupt" in clean.stdout, clean.stdout + clean.stderr


def test_verify_names_each_torn_entry_with_its_first_problem(tmp_path: Path, dirs):
    wd, _ = dirs
    cache = Cache(wd / "cache")
    truncated = cache.get_or_build(Manifest("image", {"a": "1"}), fill)
    (truncated / layout.VMLINUZ).write_bytes(b"short")
    missing = cache.get_or_build(Manifest("image", {"a": "2"}), fill)
    (missing / "sub" / "file1").unlink()
    moved = cache.get_or_build(Manifest("image", {"a": "3"}), fill)  # copied under another key: not its manifest
    impostor = moved.with_name("0" * 20)
    subprocess.run(["cp", "-a", str(moved), str(impostor)], check=True)
    result = osb("cache", "verify")
    assert result.returncode == 1
    corrupt = sorted(line for line in result.stdout.splitlines() if line.startswith("corrupt"))
    assert corrupt == sorted([f"corrupt: {truncated}: {layout.VMLINUZ}: 5 bytes, recorded 16384",
                              f"corrupt: {missing}: sub/file1: missing",
                              f"corrupt: {impostor}: {MANIFEST} describes another entry (image {moved.name})"])
    assert "3 corrupt" in result.stderr


def test_full_check_hashes_every_file_and_a_quick_one_only_moved_ones(tmp_path: Path):
    entry = Cache(tmp_path).get_or_build(Manifest("k", {"a": "1"}), fill)
    flip_a_byte_keeping_size_and_mtime(entry / "sub" / "file0")
    assert check_entry(entry)[1] is None
    assert check_entry(entry, full=True)[1] == "sub/file0: content changed (same size and mtime)"


# -- list -----------------------------------------------------------------------------------------------------


def test_list_shows_sizes_use_publication_temporaries_and_torn_entries(tmp_path: Path, dirs, engine: FakeEngine):
    wd, uc = dirs
    s = settings()
    cache = Cache(wd / "cache")
    image_m = Manifest("image", {"rootfs": "r1"})

    def image(tmp: Path) -> None:
        (tmp / layout.IMAGE).write_bytes(os.urandom(40000))

    published = cache.get_or_build(image_m, image)
    artifacts.publish(s, "image", artifacts.Artifact(published / layout.IMAGE, image_m))  # WORKDIR's hard link
    assert os.path.samefile(wd / layout.IMAGE, published / layout.IMAGE)
    unpublished = cache.get_or_build(Manifest("image", {"rootfs": "r0"}), image)
    kernel = cache.get_or_build(Manifest("kernel", {"v": "1"}), fill)
    last_used(unpublished, 40)
    torn = cache.get_or_build(Manifest("kernel", {"v": "2"}), fill)
    (torn / "sub" / "file2").unlink()
    leftover = wd / "cache" / "kernel" / f".{'1' * 20}.tmp-{dead_pid()}"
    leftover.mkdir()
    (leftover / "part").write_bytes(b"x" * 5000)
    debian = Cache(uc / "artifacts", "CACHE_DIR").get_or_build(Manifest("debian-kernel", {"r": "b"}), fill)
    (uc / "ccache").mkdir(parents=True)
    (uc / "ccache" / "object").write_bytes(os.urandom(100000))
    engine.set(images={"localhost/osbuilder-tools:aaa": {"id": "11", "size": 900_000_000,
                                                         "created": "2026-01-02 10:00:00.5 +0000 UTC"},
                       "localhost/osbuilder-tools:bbb": {"id": "22", "size": 800_000_000,
                                                         "created": "2026-01-01T10:00:00Z"}})
    result = osb("cache", "list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_path = {e["path"]: e for c in data["caches"] for e in c["entries"]}
    assert [c["cache"] for c in data["caches"]] == ["WORKDIR", "CACHE_DIR"]
    assert set(by_path) == {str(p) for p in (published, unpublished, kernel, torn, leftover, debian)}

    pub, unpub = by_path[str(published)], by_path[str(unpublished)]
    assert pub["published"] == ["image"] and unpub["published"] == [] and by_path[str(debian)]["published"] == []
    assert pub["usage"]["bytes"] == 40000 + (published / MANIFEST).stat().st_size  # its files, the manifest too
    assert pub["usage"]["disk_bytes"] >= 40000
    assert pub["usage"]["workdir_bytes"] == pub["usage"]["shared_bytes"] > 0  # WORKDIR's container.img
    assert unpub["usage"]["workdir_bytes"] == unpub["usage"]["shared_bytes"] == 0
    assert abs(unpub["last_used"] - (time.time() - 40 * DAY)) < 60
    assert pub["last_used"] == (published / MANIFEST).stat().st_mtime
    assert pub["created"] == json.loads((published / MANIFEST).read_text())["created"]
    assert by_path[str(kernel)]["usage"]["bytes"] == (16384 + sum(len(f"file {i}\n") for i in range(3))
                                                      + (kernel / MANIFEST).stat().st_size)
    assert by_path[str(torn)]["state"] == "torn" and by_path[str(torn)]["problem"] == "sub/file2: missing"
    assert by_path[str(leftover)]["temporary"] and by_path[str(leftover)]["state"].startswith("leftover (pid ")
    assert data["other_parts"]["ccache"]["bytes"] == 100000
    images = data["tools_images"][0]
    assert images["engine"] == "podman" and images["current"] is None  # TOOLS_BASE_IMAGE is not local
    assert [(i["ref"], i["size"]) for i in images["images"]] == [("localhost/osbuilder-tools:aaa", 900_000_000),
                                                                 ("localhost/osbuilder-tools:bbb", 800_000_000)]
    assert data["totals"]["entries"] == 5 and data["totals"]["temporaries"] == 1
    assert data["totals"]["tools_images_bytes"] == 1_700_000_000

    text = osb("cache", "list")
    assert text.returncode == 0, text.stderr
    row = next(line for line in text.stdout.splitlines() if published.name in line)
    assert "published: WORKDIR's image" in row and "of it are WORKDIR's files too (hard links)" in row
    assert "40 days ago" in next(line for line in text.stdout.splitlines() if unpublished.name in line)
    assert "torn: sub/file2: missing" in text.stdout and "leftover (pid" in text.stdout
    assert text.stdout.splitlines()[-1].startswith("Total: 5 entries and 1 temporaries")


def test_a_hit_is_last_use(dirs):
    wd, _ = dirs
    cache, m = Cache(wd / "cache"), Manifest("k", {"a": "1"})
    entry = cache.get_or_build(m, fill)
    last_used(entry, 10)
    before = json.loads(osb("cache", "list", "--json").stdout)["caches"][0]["entries"][0]["last_used"]
    cache.get_or_build(m, fill)
    after = json.loads(osb("cache", "list", "--json").stdout)["caches"][0]["entries"][0]["last_used"]
    assert before < time.time() - 9 * DAY and after > time.time() - 60


def test_list_without_an_engine_or_with_one_that_does_not_answer(dirs, engine: FakeEngine,
                                                                  monkeypatch: pytest.MonkeyPatch):
    engine.set(images={}, down=True)
    down = osb("cache", "list")
    assert down.returncode == 0, down.stderr
    assert "not listed: podman did not answer (Cannot connect to the Docker daemon" in down.stdout
    monkeypatch.setenv("PATH", str(engine.bin.parent / "empty"))  # no engine at all: nothing said about images
    none = osb("cache", "list", "--json")
    assert none.returncode == 0, none.stderr
    assert json.loads(none.stdout)["tools_images"] == []
    assert not Path(os.environ["WORKDIR"]).exists() and not Path(os.environ["CACHE_DIR"]).exists()  # looked only


# -- prune ----------------------------------------------------------------------------------------------------


def test_prune_by_age_keeps_published_and_recent_entries(dirs):
    wd, uc = dirs
    s = settings()
    cache = Cache(wd / "cache")
    old, recent = (cache.get_or_build(Manifest("kernel", {"v": v}), fill) for v in ("old", "recent"))
    pub_m = Manifest("image", {"rootfs": "published"})
    published = cache.get_or_build(pub_m, lambda t: (t / layout.IMAGE).write_bytes(b"i" * 8192))
    artifacts.publish(s, "image", artifacts.Artifact(published / layout.IMAGE, pub_m))
    shared_old = Cache(uc / "artifacts", "CACHE_DIR").get_or_build(Manifest("debian-kernel", {"r": "old"}), fill)
    for entry, days in ((old, 40), (recent, 1), (published, 400), (shared_old, 31)):
        last_used(entry, days)
    leftover = wd / "cache" / "kernel" / f".{'2' * 20}.tmp-{dead_pid()}"
    leftover.mkdir()
    everything = (old, recent, published, shared_old, leftover)

    dry = osb("cache", "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(p.is_dir() for p in everything)  # nothing removed
    assert f"would remove WORKDIR cache kernel {old.name} (" in dry.stdout
    assert f"would remove CACHE_DIR cache debian-kernel {shared_old.name} (" in dry.stdout
    assert f"would remove {leftover} (" in dry.stdout
    assert recent.name not in dry.stdout
    assert f"kept WORKDIR cache image {published.name}: WORKDIR publishes it (as its image)" in dry.stdout
    assert "would free" in dry.stdout.splitlines()[-1] and "nothing was removed (--dry-run)" in dry.stdout

    done = osb("cache", "prune")
    assert done.returncode == 0, done.stderr
    assert not old.exists() and not shared_old.exists() and not leftover.exists()
    assert recent.is_dir() and published.is_dir()
    assert readback.cache_entry(cache, pub_m) == published  # untouched
    summary = done.stdout.splitlines()[-1]
    assert summary.startswith("cache prune: removed 2 entries and 1 leftovers, freed ") and " 0 B" not in summary
    assert hidden(wd / "cache" / "kernel") == [] and hidden(uc / "artifacts" / "debian-kernel") == []

    younger = osb("cache", "prune", "--older-than", "0.5")
    assert younger.returncode == 0 and not recent.exists() and published.is_dir()


def test_prune_all_dry_run_and_usage_errors(dirs):
    wd, _ = dirs
    cache = Cache(wd / "cache")
    entries = [cache.get_or_build(Manifest("rootfs", {"n": str(i)}), fill) for i in range(3)]
    assert osb("cache", "prune", "--all", "--dry-run").returncode == 0
    assert all(e.is_dir() for e in entries)
    assert osb("cache", "prune").returncode == 0 and all(e.is_dir() for e in entries)  # all recent
    everything = osb("cache", "prune", "--all")
    assert everything.returncode == 0, everything.stderr
    assert not any(e.exists() for e in entries)
    assert "removed 3 entries" in everything.stdout
    for args, line in ((["prune", "--older-than", "-1"], "cache prune: --older-than: expected a number of days, "
                                                          "0 or more, got -1"),
                       (["prune", "--all", "--older-than", "3"], "cache prune: --all removes entries of any age"),
                       (["list", "--remove"], "cache list: --remove is not an option of `cache list`")):
        wrong = osb("cache", *args)
        assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith(f"osbuilder: error: {line}")


def test_prune_skips_an_entry_whose_lock_another_process_holds(dirs):
    wd, _ = dirs
    cache = Cache(wd / "cache")
    busy, idle = (cache.get_or_build(Manifest("kernel", {"v": v}), fill) for v in ("busy", "idle"))
    for entry in (busy, idle):
        last_used(entry, 90)
    with lock_held_elsewhere(Path(f"{busy}.lock")) as other:
        result = osb("cache", "prune")
        assert result.returncode == 0, result.stderr
        assert busy.is_dir() and not idle.exists()
        skipped = f"skipped WORKDIR cache kernel {busy.name}: pid {other.pid} is using it (its lock is held)"
        assert skipped in result.stdout
    assert osb("cache", "prune").returncode == 0 and not busy.exists()  # once the lock is free


def test_prune_keeps_an_entry_a_running_process_names(dirs, holder):
    """A QEMU booting a fixture's image names the cache entry's file on its command line."""
    wd, _ = dirs
    entry = Cache(wd / "cache").get_or_build(Manifest("image", {"in": "use"}), fill)
    last_used(entry, 90)
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             f"file={entry / layout.VMLINUZ},format=raw"])
    holder.append(qemu)
    result = osb("cache", "prune", "--all")
    assert result.returncode == 0, result.stderr
    assert entry.is_dir()
    assert f"in use: pid {qemu.pid} names it on its command line" in result.stdout


def test_a_lookup_during_prune_finds_the_whole_entry_or_none(tmp_path: Path, dirs, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch):
    """A thread looks the entry up (building it when it is gone) and checks what it got, under the entry's lock,
    while prune removes it again and again."""
    wd, _ = dirs
    monkeypatch.setenv("PATH", str(tmp_path / "no-engine"))  # entries only: many prunes a second
    cache, counter = Cache(wd / "cache"), tmp_path / "count"
    m = Manifest("rootfs", {"a": "1"})
    cache.get_or_build(m, lambda t: fill(t, counter, files=400))
    s = settings()
    stop, problems, looked = threading.Event(), [], []
    caplog.set_level(logging.INFO, "osbuilder")

    def lookups() -> None:
        while not stop.is_set():
            try:
                entry = cache.get_or_build(m, lambda t: fill(t, counter, files=400))
                with Cache.lock(entry):
                    if entry.exists():  # removed since the lookup returned: none, which is fine
                        _, problem = check_entry(entry, full=True)
                        if problem:
                            problems.append(problem)
                looked.append(entry)
            except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                problems.append(repr(e))

    thread = threading.Thread(target=lookups)
    thread.start()
    try:
        removed = 0
        deadline = time.monotonic() + 120
        while (removed < 5 or len(looked) < 20) and time.monotonic() < deadline:
            removed += cache_admin.prune(s, everything=True).removed
    finally:
        stop.set()
        thread.join(60)
    assert problems == []
    assert removed >= 5 and len(looked) >= 20
    assert len(counter.read_text()) > 1  # lookups after a removal rebuilt it
    assert not [r for r in caplog.records if "torn" in r.getMessage()]
    assert hidden(wd / "cache" / "rootfs") == []


# -- tools images ---------------------------------------------------------------------------------------------


def images(*tags: str) -> dict[str, dict[str, object]]:
    """Tools images, the first the newest."""
    return {f"{tools_image.REPOSITORY}:{tag}": {"id": f"id-{tag}", "size": 1000 * (i + 1),
                                                "created": f"2026-01-{20 - i:02d} 10:00:00 +0000 UTC"}
            for i, tag in enumerate(tags)}


def test_prune_keeps_the_newest_tools_image_when_the_current_tag_is_unknown(dirs, engine: FakeEngine):
    engine.set(images=images("newest", "older", "busy", "oldest"), in_use=[f"{tools_image.REPOSITORY}:busy"])
    dry = osb("cache", "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not [c for c in engine.calls() if c[0] == "rmi"] and len(engine.images()) == 4
    assert f"would remove podman tools image {tools_image.REPOSITORY}:older" in dry.stdout
    result = osb("cache", "prune")
    assert result.returncode == 0, result.stderr
    assert engine.images() == [f"{tools_image.REPOSITORY}:busy", f"{tools_image.REPOSITORY}:newest"]
    assert f"kept {tools_image.REPOSITORY}:newest: the newest tools image (the current settings' tag is unknown" \
        in result.stdout
    assert f"skipped {tools_image.REPOSITORY}:busy: podman refused (Error: image used by 1f2e3d: image is in use" \
        in result.stdout
    assert "removed 2 tools images (5.9 KiB as the engine counts them" in result.stdout.splitlines()[-1]


def test_prune_keeps_the_current_settings_tools_image(dirs, engine: FakeEngine):
    engine.set(images={}, bases={"debian:bookworm": "sha256:base"})
    current = tools_image.tag_for(engine_mod.Engine("podman", str(engine.bin / "podman")), settings(), pull=False)
    tag = current.split(":", 1)[1]
    engine.set(images=images("newer-than-current", tag, "old"), bases={"debian:bookworm": "sha256:base"})
    listed = json.loads(osb("cache", "list", "--json").stdout)["tools_images"][0]
    assert listed["current"] == current and [i["current"] for i in listed["images"]] == [False, True, False]
    result = osb("cache", "prune")
    assert result.returncode == 0, result.stderr
    assert engine.images() == [current]
