"""Real kernel builds: the session `kernel` fixture's, and a second build of the same inputs.

The error tests stop before anything compiles, so they cost seconds. The reproducibility test runs
last: it compares the session's kernel byte for byte with another build of the same inputs from an empty
object tree, an earlier run's where one is on record, else one it makes now with ccache warm.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fakes import lock_held_elsewhere
from filelock import FileLock

from osbuilder import arch
from osbuilder.cache import MANIFEST
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import write_atomically
from osbuilder.kernel import build
from osbuilder.kernel.fragments import merge, resolve_fragments, verify
from osbuilder.kernel.kconfig import KconfigIndex, read_config
from osbuilder.kernel.source import ensure_source
from osbuilder.layout import KernelFiles, UserCache, Workdir

pytestmark = pytest.mark.build


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(directory.iterdir()) if p.is_file()}


def linux_banner(vmlinux: Path) -> str:
    """The kernel's own `Linux version ...` line, as /proc/version would show it."""
    found = re.search(rb"Linux version [^\n\0]+", vmlinux.read_bytes())
    assert found, "no Linux version banner in vmlinux"
    return found.group(0).decode()


def test_kernel_outputs(osbuilder_kernel):
    files = KernelFiles(osbuilder_kernel.path)
    for path in files.all():
        assert path.is_file(), path.name
    vmlinuz = files.vmlinuz.read_bytes()
    assert vmlinuz[0x202:0x206] == b"HdrS"  # x86 boot protocol header of a bzImage
    vmlinux = files.vmlinux.read_bytes()
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2  # 64-bit ELF
    assert b"(osbuilder@osbuilder)" in vmlinux


def test_kernel_metadata(osbuilder_kernel, osbuilder_settings):
    files = KernelFiles(osbuilder_kernel.path)
    meta = json.loads(files.metadata.read_text())
    banner = linux_banner(files.vmlinux)
    # what the metadata says matches what the kernel itself says, for any KERNEL_SOURCE
    assert banner.startswith(f"Linux version {meta['kernel_version']} (osbuilder@osbuilder)")
    assert meta["kernel_version"] == ensure_source(osbuilder_settings).version
    assert meta["compiler"] and meta["compiler"] in banner
    # The cache is keyed by content, so the entry may come from another checkout (tox's copy of
    # the package): fragments match by file name and content, not by absolute path.
    assert [(Path(f["path"]).name, f["sha256"]) for f in meta["fragments"]] == \
        [(p.name, sha(p)) for p in resolve_fragments(osbuilder_settings)]
    assert meta["config_sha256"] == sha(files.config)
    assert meta["duration_seconds"] > 0
    assert meta["reproduce"]["osbuilder"].startswith("osbuilder kernel --workdir ")
    assert "KBUILD_BUILD_USER=osbuilder" in meta["reproduce"]["make"]
    assert meta["reproduce"]["make"].endswith(" bzImage")
    outputs = [files.vmlinuz, files.vmlinux, files.config, files.system_map]
    assert meta["outputs"] == {p.name: sha(p) for p in outputs}
    # the fixed build timestamp is the one the kernel carries, and it is SOURCE_DATE_EPOCH
    stamp = meta["build_env"]["KBUILD_BUILD_TIMESTAMP"]
    assert banner.endswith(stamp)
    epoch = calendar.timegm(time.strptime(stamp, "%a %b %d %H:%M:%S UTC %Y"))
    assert epoch == int(meta["build_env"]["SOURCE_DATE_EPOCH"])


def test_nm_is_given_gccs_lto_plugin_and_lists_the_same_symbols(osbuilder_kernel, tmp_path):
    """kbuild runs nm on every object; the build names gcc's LTO plugin so that nm does not load every
    plugin in bfd-plugins/ (LLVM's among them). With it, nm must list what it lists without it: for plain
    objects, and for gcc's LTO objects, which only that plugin reads."""
    meta = json.loads(KernelFiles(osbuilder_kernel.path).metadata.read_text())
    nm = build.lto_plugin_nm(arch.host())
    assert nm, "gcc has no liblto_plugin.so (package gcc)"
    plugin = nm[0].split("--plugin ", 1)[1]
    assert Path(plugin).is_file() and f"'{nm[0]}'" in meta["reproduce"]["make"]
    objects = [tmp_path / "a.o", tmp_path / "b.o"]
    (tmp_path / "a.c").write_text("int shared = 1; static int hidden(void) { return shared; }\n"
                                   "int visible(void) { return hidden() + 1; }\n")
    (tmp_path / "b.c").write_text("extern int visible(void); int main(void) { return visible(); }\n")
    for source, obj in zip(("a.c", "b.c"), objects, strict=True):
        subprocess.run(["gcc", "-O2", "-c", "-o", str(obj), str(tmp_path / source)], check=True)
    lto = tmp_path / "lto.o"  # an object only the plugin can read: gcc's LTO bytecode
    subprocess.run(["gcc", "-O2", "-flto", "-c", "-o", str(lto), str(tmp_path / "a.c")], check=True)
    for obj in [*objects, lto]:
        plain = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
        given = subprocess.run(["nm", "--plugin", plugin, str(obj)], capture_output=True, text=True,
                               check=True).stdout
        assert given == plain and "visible" in plain, (obj.name, plain, given)


def test_config_has_every_requested_option(osbuilder_kernel, osbuilder_settings):
    tree = ensure_source(osbuilder_settings)
    merged = merge(resolve_fragments(osbuilder_settings))
    final = read_config(KernelFiles(osbuilder_kernel.path).config)
    assert verify(merged, final, KconfigIndex.load(tree.path)) == []
    for name in ("VIRTIO_CONSOLE", "VIRTIO_BLK", "VIRTIO_PCI", "VIRTIO_NET", "VIRTIO_VSOCKETS", "EXT4_FS"):
        assert final[name] == "y", name
    assert final.get("MODULES", "n") == "n"


def test_unchanged_inputs_are_a_cache_hit(osbuilder_kernel, osbuilder_settings, osbuilder_cache):
    def must_not_build(tmp: Path) -> None:
        raise AssertionError("cache miss for unchanged inputs")

    started = time.monotonic()
    entry = osbuilder_cache.get_or_build(build.kernel_manifest(osbuilder_settings), must_not_build)
    elapsed = time.monotonic() - started
    assert entry == osbuilder_kernel.path
    assert elapsed < 2.0, f"cache hit took {elapsed:.1f}s"


# --- failures: each stops before compiling and leaves the previous outputs alone -----------------


@pytest.fixture
def previous(osbuilder_kernel, tmp_path) -> Path:
    """An output directory holding a previous good build."""
    out = tmp_path / "out"
    shutil.copytree(osbuilder_kernel.path, out)
    return out


def fragment(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "extra.config"
    path.write_text(text)
    return path


def failed_build(settings, out: Path, logfile: Path, error: type[Exception]) -> Exception:
    before = snapshot(out)
    with pytest.raises(error) as e:
        build.build_kernel(settings, out, logfile=logfile)
    assert snapshot(out) == before, "a failed build changed the previous outputs"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name], "temporary files left behind"
    return e.value


def test_unknown_option_fails_before_make(osbuilder_settings, previous, tmp_path):
    frag = fragment(tmp_path, "CONFIG_VIRTIO_BLKK=y\n")
    s = osbuilder_settings.with_values(KERNEL_FRAGMENTS=str(frag))
    log = tmp_path / "kernel.log"
    error = failed_build(s, previous, log, UsageError)
    release = ".".join(ensure_source(s).version.split(".")[:2])  # from `make kernelversion`
    assert error.message == f"KERNEL_FRAGMENTS: CONFIG_VIRTIO_BLKK in {frag}: no such option in Linux {release}"
    assert "did you mean CONFIG_VIRTIO_BLK?" in error.detail
    assert not log.exists() or "merge_config" not in log.read_text()


def test_unmet_dependency_names_option_and_dependency(osbuilder_settings, previous, tmp_path):
    frag = fragment(tmp_path, "# CONFIG_BLK_DEV is not set\n")
    s = osbuilder_settings.with_values(KERNEL_FRAGMENTS=str(frag))
    log = tmp_path / "kernel.log"
    error = failed_build(s, previous, log, UsageError)
    assert error.message.startswith("KERNEL_FRAGMENTS: CONFIG_VIRTIO_BLK from block.config:")
    assert "(unmet: BLK_DEV=n)" in error.message
    assert "unmet dependency: BLK_DEV=n in `depends on BLK_DEV && VIRTIO`" in error.detail
    assert " bzImage" not in log.read_text()  # verification failed before compiling


def test_missing_fragment_names_kernel_fragments(osbuilder_settings, previous, tmp_path):
    s = osbuilder_settings.with_values(KERNEL_FRAGMENTS=str(tmp_path / "missing.config"))
    error = failed_build(s, previous, tmp_path / "kernel.log", UsageError)
    assert error.message == f"KERNEL_FRAGMENTS: {tmp_path / 'missing.config'}: no such file"


def raised_within(seconds: float, fn, *args, **kwargs) -> BaseException | None:
    """What `fn` raised, if it returned or raised within `seconds`; None if it was still running."""
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)
        else:
            outcome.append(AssertionError(f"{fn.__name__} returned"))

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    return outcome[0] if outcome else None


def test_a_fragment_error_does_not_wait_for_another_build(osbuilder_settings, previous, tmp_path):
    """Another build holds the object tree (another process, for the minutes a compile takes): a fragment
    the build cannot use is still named at once, not after that build."""
    bdir = tmp_path / "kernel-build"
    with lock_held_elsewhere(Path(f"{bdir}.lock")):
        for text, expected in (("CONFIG_VIRTIO_BLKK=y\n", "no such option"), (None, "no such file")):
            frag = fragment(tmp_path, text) if text else tmp_path / "missing.config"
            s = osbuilder_settings.with_values(KERNEL_FRAGMENTS=str(frag))
            error = raised_within(60, build.build_kernel, s, previous, logfile=tmp_path / "kernel.log", build_dir=bdir)
            assert error is not None, f"{expected}: the build waited for the other build's lock"
            assert isinstance(error, UsageError), error
            assert error.message.startswith("KERNEL_FRAGMENTS: ") and expected in error.message, error.message


def test_make_failure_is_one_line_and_keeps_outputs(osbuilder_settings, previous, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "make_vars", lambda cc, guest: ["CC=false"])  # the compile step cannot work
    error = failed_build(osbuilder_settings, previous, tmp_path / "kernel.log", OsbuilderError)
    assert error.message.startswith("kernel: the kernel source in KERNEL_SOURCE=")
    assert "\n" not in error.message and error.detail


def test_full_disk_is_reported_as_such(osbuilder_settings, tmp_path, monkeypatch):
    log = tmp_path / "kernel.log"

    def fake_run(cmd, **kwargs):
        log.write_text("ld: final link failed: No space left on device\n")
        raise OsbuilderError("kernel: `make` failed (exit 2)", "No space left on device")

    monkeypatch.setattr(build, "run", fake_run)
    with pytest.raises(InfrastructureError, match="^WORKDIR: no space left on device while building the kernel in "):
        build._make(osbuilder_settings, ["make"], tmp_path, log, {})


# --- reproducibility: two builds of the same inputs, each from an empty object tree ---------------------
# The session's kernel is one such build when this run made it (CI's clean clone: a new WORKDIR). The
# other is the last one an earlier run verified, recorded in the per-user cache under the kernel's cache
# key (which names every input, osbuilder's kernel code included): a later run in another WORKDIR, as a
# user's rebuild is. Without such a record, or with a session kernel WORKDIR's cache already held, the
# test empties the object tree (under the build lock: other kernel tests may run at the same time on the
# other xdist worker) and builds again now.

COMPARED = ("vmlinux", "vmlinuz", "config")


def clean_build_dir(settings) -> None:
    """Empty the object tree (the next build starts from nothing), under the build lock so a build running
    in another process is never pulled out from under."""
    bdir = Workdir.of(settings).kernel_build
    bdir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bdir) + ".lock"):
        shutil.rmtree(bdir, ignore_errors=True)


def rebuild_record(settings, key: str) -> Path:
    return UserCache.of(settings).root / "test-records" / f"kernel-rebuild-{key}.json"


def kernel_outputs(files: KernelFiles, metadata: dict) -> dict[str, str]:
    return {name: sha(getattr(files, name)) for name in COMPARED} | {"version": metadata["kernel_version"]}


def built_by(entry: Path) -> str:
    """The run that built this cache entry (the fixtures' session id), from its manifest."""
    return str(json.loads((entry / MANIFEST).read_text()).get("session", ""))


def test_rebuild_is_byte_identical(osbuilder_kernel, osbuilder_artifacts, osbuilder_settings, tmp_path):
    session = KernelFiles(osbuilder_kernel.path)
    metadata = json.loads(session.metadata.read_text())
    ours = kernel_outputs(session, metadata)
    record_path = rebuild_record(osbuilder_settings, osbuilder_kernel.key)
    try:
        earlier = json.loads(record_path.read_text())
    except (OSError, ValueError):
        earlier = None
    this_run = osbuilder_artifacts.session
    if earlier and built_by(osbuilder_kernel.path) == this_run and earlier.get("run") != this_run:
        print(f"compared with the build of run {earlier['run']} ({earlier['when']}); this run's: "
              f"ccache {metadata['ccache']}")
        assert ours == earlier["outputs"], (
            f"the kernel built now differs from the one an earlier run built from the same inputs "
            f"(key {osbuilder_kernel.key}, {record_path}): a build is not reproducible, or "
            f"kernel_manifest misses an input")
    else:
        clean_build_dir(osbuilder_settings)
        started = time.monotonic()
        again = build.build_kernel(osbuilder_settings, tmp_path / "again")
        elapsed = time.monotonic() - started
        print(f"ccache-warm rebuild from an empty object tree: {elapsed:.0f}s, ccache {again.metadata['ccache']}")
        assert again.files == KernelFiles(tmp_path / "again") and again.out_dir == tmp_path / "again"
        assert kernel_outputs(again.files, again.metadata) == ours
        if shutil.which("ccache"):
            stats = again.metadata["ccache"]
            assert stats["hits"] > 10 * max(stats["misses"], 1), f"ccache mostly missed: {stats}"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_atomically(record_path, json.dumps({"run": this_run, "when": when, "outputs": ours}, indent=1) + "\n")
