"""The artifact cache: hits, misses that explain themselves, one build across processes."""

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
from trees import record_attrs

from osbuilder import readback
from osbuilder.cache import Cache, Copied, Manifest, describe_tree, tree_record


def _build_counting(tmp: Path, counter: Path) -> None:
    with open(counter, "a") as f:
        f.write("x")
    (tmp / "artifact").write_text("payload")


def test_second_lookup_is_a_hit_without_building(tmp_path: Path):
    cache, counter = Cache(tmp_path / "cache"), tmp_path / "count"
    m = Manifest("thing", {"a": "1"})
    first = cache.get_or_build(m, lambda t: _build_counting(t, counter))
    second = cache.get_or_build(m, lambda t: _build_counting(t, counter))
    assert first == second and (first / "artifact").read_text() == "payload"
    assert counter.read_text() == "x"


def test_rebuild_builds_again(tmp_path: Path):
    cache, counter = Cache(tmp_path / "cache"), tmp_path / "count"
    m = Manifest("thing", {"a": "1"})
    cache.get_or_build(m, lambda t: _build_counting(t, counter))
    cache.get_or_build(m, lambda t: _build_counting(t, counter), rebuild=True)
    assert counter.read_text() == "xx"


def test_failed_build_leaves_no_entry(tmp_path: Path):
    cache = Cache(tmp_path / "cache")
    m = Manifest("thing", {"a": "1"})

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("half-written")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build(m, broken)
    assert readback.cache_entry(cache, m) is None
    left = [p for p in (tmp_path / "cache").rglob("*")]  # neither the half-built entry nor its temporary
    assert [p.name for p in left if not p.is_dir()] == [p.name for p in left if p.name.endswith(".lock")]
    assert [p.name for p in left if p.is_dir()] == ["thing"]
    counter = tmp_path / "count"  # the next build is not fooled by the failed one
    entry = cache.get_or_build(m, lambda t: _build_counting(t, counter))
    assert counter.read_text() == "x" and sorted(p.name for p in entry.iterdir()) == ["artifact", "manifest.json"]


def test_miss_explains_which_input_changed(tmp_path: Path):
    cache = Cache(tmp_path / "cache")
    cache.get_or_build(Manifest("rootfs", {"packages": "a b", "os_version": "bookworm"}), lambda t: None)
    reasons = cache.explain_miss(Manifest("rootfs", {"packages": "a b c", "os_version": "bookworm"}))
    assert reasons == ["packages changed: a b -> a b c"]
    assert Cache(tmp_path / "empty").explain_miss(Manifest("rootfs", {})) == ["no earlier build"]


def _worker(root: str, counter: str) -> None:
    import time

    def slow(tmp: Path) -> None:
        time.sleep(0.5)
        _build_counting(tmp, Path(counter))

    Cache(Path(root)).get_or_build(Manifest("shared", {"k": "v"}), slow)


def test_parallel_processes_build_once(tmp_path: Path):
    counter = tmp_path / "count"
    procs = [multiprocessing.Process(target=_worker, args=(str(tmp_path / "c"), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "x"


def test_a_copied_tree_is_recorded_from_its_source_record_where_size_and_mtime_hold(tmp_path: Path):
    """A file copied with its mtime keeps the source record's hash; a file changed after the copy (another
    mtime, even at the same size) and a new file are read. Hashing everything gives the same record."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/same").write_text("same bytes")
    (src / "etc/edited").write_text("old bytes!")
    os.symlink("same", src / "etc/link")
    cache = Cache(tmp_path / "cache")
    base = cache.get_or_build(Manifest("base", {}), lambda t: subprocess.run(["cp", "-a", str(src), str(t / "tree")],
                                                                               check=True))
    base_record = tree_record(base, "tree")
    assert set(base_record) == {"etc", "etc/same", "etc/edited", "etc/link"}

    def build(tmp: Path) -> Copied:
        subprocess.run(["cp", "-a", str(base / "tree"), str(tmp / "rootfs")], check=True)
        (tmp / "rootfs/etc/edited").write_text("new bytes!")  # the same size, a new mtime
        (tmp / "rootfs/etc/added").write_text("added")
        return Copied.under("rootfs", base_record)

    entry = cache.get_or_build(Manifest("rootfs", {}), build)
    record = tree_record(entry, "rootfs")
    assert record == describe_tree(entry / "rootfs")  # what reading every file gives
    assert record["etc/same"] == base_record["etc/same"] and record["etc/edited"] != base_record["etc/edited"]


def test_a_hint_is_taken_only_where_size_and_mtime_match(tmp_path: Path):
    """The hint's hash is believed for an unchanged size and mtime (the trust a cache hit gives a file), and
    never otherwise: a wrong hint with another mtime is not copied into the record."""
    (tmp_path / "f").write_text("content")
    st = os.stat(tmp_path / "f")
    fake = "0" * 64
    attrs = record_attrs(st)
    believed = describe_tree(tmp_path, {"f": f"f:{attrs}:{st.st_size}:{st.st_mtime_ns}:{fake}"})
    assert believed["f"].endswith(fake)
    for other in (f"f:{attrs}:{st.st_size}:{st.st_mtime_ns + 1}:{fake}",
                  f"f:{attrs}:{st.st_size + 1}:{st.st_mtime_ns}:{fake}",
                  f"f:{attrs}:1{st.st_size}:{st.st_mtime_ns}:{fake}"):
        assert describe_tree(tmp_path, {"f": other}) == describe_tree(tmp_path)
