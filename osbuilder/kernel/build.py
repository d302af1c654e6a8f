"""Build the guest kernel: configure, verify, compile out of tree, publish the outputs atomically.

`build_kernel(settings, out_dir)` is shared by `osbuilder kernel` (out_dir = WORKDIR) and the
pytest fixture (out_dir = a cache entry being filled); `kernel_manifest(settings)` is that entry's
key, computed from the source's identity without unpacking it. With `config=` a complete .config is
built as it is (normalised by `olddefconfig`, no fragments): what `kconfig bisect`, `bisect-run` and
`pytest --osbuilder-kernel-config` build; `tree=` builds a source tree in place (a user's git checkout).
For another ARCH (arm64 on x86) the kernel is cross-compiled (ARCH=, CROSS_COMPILE=, the architecture's
own fragments and boot image, arch.py). The object tree lives in WORKDIR/kernel-build (kernel-build-<arch>
for a cross build) and ccache in the per-user cache (depend mode, see build_env), so a rebuild after one
option change only recompiles what depends on it, and another WORKDIR or another source tree of the same
kernel (compiled through ccache-gcc, which names sources relative to the object tree) reuses the compiled
objects. Fixed KBUILD_BUILD_* values make two builds of the same inputs byte-identical.
Outputs are copied to temporary names and renamed only after `make` succeeded.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from osbuilder import errors, layout
from osbuilder.arch import Arch
from osbuilder.cache import Manifest
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.fs import discard, file_hash, publish, sha256_file, temp_beside
from osbuilder.kernel.compilers import CCACHE_GCC, compiler
from osbuilder.kernel.fragments import Merged, check_fragments, configure, make_vars, resolve_fragments
from osbuilder.kernel.source import SourceTree, ensure_source, origin
from osbuilder.layout import KernelFiles, UserCache, Workdir
from osbuilder.run import format_command, run, tool_version
from osbuilder.settings import Settings

# the code that turns the inputs into a kernel: a change in it makes a new cache key
CODE_FILES = tuple(Path(__file__).parent / name for name in ("build.py", "compilers.py", "fragments.py", "kconfig.py",
                                                              "ccache-gcc"))
_BUILD_MARKER = ".osbuilder-build-source"
_CCACHE_LOG = ".osbuilder-ccache-stats.log"  # one line per counter ccache bumped, this build only


@dataclass(frozen=True)
class KernelBuild:
    """A finished build: where its outputs are, and what went into it."""

    out_dir: Path
    metadata: dict[str, Any]

    @property
    def files(self) -> KernelFiles:
        return KernelFiles(self.out_dir)

    @property
    def vmlinuz(self) -> Path:
        return self.files.vmlinuz

    @property
    def vmlinux(self) -> Path:
        return self.files.vmlinux

    @property
    def config(self) -> Path:
        return self.files.config

    @property
    def version(self) -> str:
        return self.metadata["kernel_version"]


SOURCE_LINK = ".osbuilder-src"  # OBJTREE/.osbuilder-src -> the source tree (what ccache-gcc names it by)


def outputs(guest: Arch) -> dict[str, str]:
    """Output name -> its object tree path, for a kernel of `guest` (arm64's two names carry one file)."""
    return {
        layout.VMLINUZ: guest.kernel_image,
        layout.VMLINUX: guest.kernel_vmlinux,
        layout.KERNEL_CONFIG: ".config",
        layout.SYSTEM_MAP: "System.map",
    }


def lto_plugin_nm(guest: Arch) -> list[str]:
    """NM=... for the compile, naming gcc's own LTO plugin; [] where gcc has none.

    Given no --plugin, binutils' nm loads every plugin in bfd-plugins/, and LLVM's (llvm-*-linker-tools,
    there wherever LLVM is installed) costs ~17 ms of each call. kbuild runs nm on every object
    (check-local-export); given gcc's plugin, nm loads that one alone (2 ms) and prints the same. A build
    from ccache hits then takes 0.82x the CPU, and its vmlinux is the same (bench/bench_kernel_nm.py)."""
    gcc = guest.gcc()
    try:
        found = subprocess.run([gcc, "-print-file-name=liblto_plugin.so"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if not os.path.isabs(found) or not os.path.isfile(found) or " " in found:
        return []  # gcc prints the bare name when it has no such file; kbuild splits NM at spaces
    return [f"NM={guest.cross_compile()}nm --plugin {found}"]


def link_source(bdir: Path, tree: SourceTree, env: dict[str, str]) -> None:
    """OBJTREE/.osbuilder-src -> the source tree as kbuild names it (its real path), for ccache-gcc."""
    real = tree.path.resolve()
    link = bdir / SOURCE_LINK
    if not (link.is_symlink() and os.readlink(link) == str(real)):
        link.unlink(missing_ok=True)
        link.symlink_to(real)
    env["OSBUILDER_KERNEL_SRC"] = str(real)


def build_epoch(settings: Settings, tree: SourceTree) -> int:
    return settings.source_date_epoch if settings.source_date_epoch is not None else tree.epoch


def build_env(settings: Settings, tree: SourceTree) -> dict[str, str]:
    epoch = build_epoch(settings, tree)
    return {
        "KBUILD_BUILD_USER": "osbuilder",
        "KBUILD_BUILD_HOST": "osbuilder",
        "KBUILD_BUILD_VERSION": "1",
        "KBUILD_BUILD_TIMESTAMP": time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(epoch)),
        "SOURCE_DATE_EPOCH": str(epoch),
        "CCACHE_DIR": str(UserCache.of(settings).ccache),
        "CCACHE_MAXSIZE": "5G",
        # Depend mode: ccache hashes the source, the flags and the headers listed in the .d file
        # kbuild asks gcc for (-Wp,-MMD), and never runs the preprocessor. In the default mode
        # every miss preprocesses each file a second time: on an empty cache that cost ~20% more
        # CPU than plain gcc (mm/ + net/ipv4/: 104 s vs 84 s); in depend mode a cold build costs
        # what plain gcc does, and hits work the same way (direct hits via the manifest).
        "CCACHE_DEPEND": "1",
        "LC_ALL": "C",
        "TZ": "UTC",
        **({"CCACHE_REMOTE_STORAGE": settings.ccache_remote_storage} if settings.ccache_remote_storage else {}),
    }


def kernel_manifest(settings: Settings, config: Path | None = None) -> Manifest:
    """Cache key inputs: source identity, fragments, base config, osbuilder's kernel code, compiler,
    binutils, the guest's and the host's architectures, epoch. With `config` (a complete .config built as
    it is), its content replaces fragments and base config.

    Computed without unpacking or cloning the source: its identity (a tarball's content hash, a git
    tree's commit, the commit a git URL's ref points at) determines the kernel version, so the
    version is not an input; leaving it out also keeps the key the same before and after the tree is
    unpacked.
    """
    where = origin(settings)
    if config is not None:
        fragments_key, base_key = "none (a complete .config)", f"exact {file_hash(config)}"
    else:
        base = settings.kernel_config
        if base is not None and not base.is_file():
            raise UsageError(f"KERNEL_CONFIG: {base}: no such file")
        fragments_key = " ".join(f"{p.name}={file_hash(p)[:16]}" for p in resolve_fragments(settings))
        base_key = file_hash(base) if base else "allnoconfig"
    epoch = settings.source_date_epoch if settings.source_date_epoch is not None else where.epoch
    return Manifest("kernel", {
        "source": json.dumps(where.identity, sort_keys=True),
        "fragments": fragments_key,
        "base_config": base_key,
        "compiler": compiler(settings.guest)[1],
        "binutils": tool_version(f"{settings.guest.cross_compile()}ld", "--version"),
        "arch": settings.guest.name,
        "host": platform.machine(),  # a cross build's compiler is another program on another host
        "code": file_hash(*CODE_FILES),
        # None: the commit time of the git source, which its identity determines
        "source_date_epoch": str(epoch) if epoch is not None else "commit time",
    })


def build_kernel(settings: Settings, out_dir: Path, *, logfile: Path | None = None, config: Path | None = None,
                 tree: SourceTree | None = None, build_dir: Path | None = None) -> KernelBuild:
    """Configure, verify and compile; copy the outputs and kernel-metadata.json into `out_dir`.

    `config`: build this complete .config (normalised by olddefconfig) instead of the fragments.
    `tree`: this source tree instead of KERNEL_SOURCE's; `build_dir`: this object tree instead of
    WORKDIR/kernel-build. Raises ConfigureError when the configuration step fails (a commit whose
    Kconfig is broken), OsbuilderError when the compile fails."""
    started = time.monotonic()
    guest = settings.guest
    if not guest.native:
        guest.require_compiler("a kernel for another architecture")
    logfile = logfile or Workdir.of(settings).log("kernel")
    named = "" if tree is None else str(tree.path)  # how a compile error names the source
    tree = tree or ensure_source(settings, logfile=logfile)
    bdir = build_dir or Workdir.of(settings).kernel_build_for(guest)
    bdir.parent.mkdir(parents=True, exist_ok=True)
    checked = check_fragments(settings, tree.path) if config is None else None  # a usage error never waits
    with FileLock(str(bdir) + ".lock"):
        _reset_if_other_source(bdir, tree)
        cc, cc_version = compiler(guest)
        env = build_env(settings, tree)
        link_source(bdir, tree, env)
        if config is None:
            merged, config_path = configure(settings, tree.path, bdir, cc=cc, logfile=logfile, env=env,
                                            checked=checked)
        else:
            merged, config_path = Merged([]), configure_exact(settings, tree.path, bdir, config, cc=cc,
                                                               logfile=logfile, env=env)
        configured = time.monotonic()
        # one job more than cores keeps both busy through I/O waits (measured: 296 s vs 303 s cold on 2 cores)
        jobs = (os.cpu_count() or 1) + 1
        make = ["make", "-C", str(tree.path), f"O={bdir}", f"-j{jobs}", *make_vars(cc, guest), *lto_plugin_nm(guest),
                guest.kernel_target]
        if str(CCACHE_GCC) in cc:
            # this build's own counters (the cache's totals mix in every other build of the user's)
            env["CCACHE_STATSLOG"] = str(bdir / _CCACHE_LOG)
            (bdir / _CCACHE_LOG).unlink(missing_ok=True)
        _make(settings, make, bdir, logfile, env, named)
        metadata = _metadata(settings, tree, merged, config_path, cc, cc_version, make, env, started, config)
        metadata["seconds"] = {"configure": round(configured - started, 1),
                               "compile": round(time.monotonic() - configured, 1)}
        _publish_outputs(bdir, out_dir, metadata, outputs(guest))
    return KernelBuild(out_dir, metadata)


class ConfigureError(OsbuilderError):
    """The source tree could not be configured (its Kconfig or scripts are broken)."""


def configure_exact(settings: Settings, src: Path, bdir: Path, config: Path, *, cc: str, logfile: Path,
                    env: dict[str, str]) -> Path:
    """bdir/.config = `config` normalised by `make olddefconfig` (what a complete .config becomes in
    this tree); written beside and renamed, so an interrupted copy never looks like a config."""
    bdir.mkdir(parents=True, exist_ok=True)
    dest = bdir / ".config"
    tmp = temp_beside(dest)
    try:
        shutil.copyfile(config, tmp)
        publish(tmp, dest)
    finally:
        discard(tmp)
    try:
        run(["make", "-C", src, f"O={bdir}", *make_vars(cc, settings.guest), "olddefconfig"], step="kconfig",
            logfile=logfile, env=env, verbose=settings.debug)
    except OsbuilderError as e:
        raise ConfigureError(f"kernel: {config} does not configure in {src} (make olddefconfig failed)",
                             e.detail) from None
    return dest


def _reset_if_other_source(bdir: Path, tree: SourceTree) -> None:
    """Objects from a different source tree must not be mixed in: start the object tree anew."""
    stamp = bdir / _BUILD_MARKER
    content = str(tree.marker.get("content", ""))
    if bdir.is_dir() and (not stamp.is_file() or stamp.read_text() != content):
        shutil.rmtree(bdir)
    bdir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(content)


def _make(settings: Settings, cmd: list[str], bdir: Path, logfile: Path, env: dict[str, str],
          source: str = "") -> None:
    """Run make; a failure is one line naming the source (`source`, default KERNEL_SOURCE's)."""
    offset = logfile.stat().st_size if logfile.exists() else 0
    try:
        run(cmd, step="kernel", logfile=logfile, env=env, verbose=settings.debug)
    except OsbuilderError as e:
        output = _read_from(logfile, offset)
        if errors.NO_SPACE in output:
            raise errors.full_disk("WORKDIR", f"while building the kernel in {bdir}", e) from None
        first = _first_error(output)
        where = f": {first}" if first else f" (see {logfile})"
        source = source or f"KERNEL_SOURCE={settings.kernel_source}"
        raise OsbuilderError(f"kernel: the kernel source in {source} does not build{where}", e.detail) from None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _first_error(output: str) -> str:
    for line in output.splitlines():
        if re.search(r"(: (fatal )?error:|\*\*\* \[|undefined reference)", line):
            return line.strip()[:200]
    return ""


def ccache_stats(env: dict[str, str]) -> dict[str, int]:
    """This build's ccache hits and misses, from the stats log it wrote (empty without ccache)."""
    log_path = env.get("CCACHE_STATSLOG")
    if not log_path or not Path(log_path).is_file():
        return {}
    counters = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines()]
    hits = sum(1 for c in counters if c in ("direct_cache_hit", "preprocessed_cache_hit"))
    stats = {"hits": hits, "misses": counters.count("cache_miss")}
    if "remote_storage_hit" in counters or "remote_storage_miss" in counters:  # CCACHE_REMOTE_STORAGE
        stats.update(remote_hits=counters.count("remote_storage_hit"),
                     remote_misses=counters.count("remote_storage_miss"))
    return stats


def reproducer(settings: Settings) -> str:
    """The osbuilder command line that rebuilds this kernel."""
    cmd = ["osbuilder", "kernel", "--workdir", str(settings.workdir),
           *(["--arch", settings.guest.name] if not settings.guest.native else []),
           "--kernel-source", settings.raw["KERNEL_SOURCE"]]
    if settings.raw["KERNEL_FRAGMENTS"].strip():
        cmd += ["--kernel-fragments", settings.raw["KERNEL_FRAGMENTS"]]
    if settings.raw["KERNEL_CONFIG"].strip():
        cmd += ["--kernel-config", settings.raw["KERNEL_CONFIG"]]
    if settings.source_date_epoch is not None:
        cmd += ["--source-date-epoch", str(settings.source_date_epoch)]
    return shlex.join(cmd)


def _metadata(settings: Settings, tree: SourceTree, merged: Merged, config_path: Path, cc: str,
              cc_version: str, make: list[str], env: dict[str, str], started: float,
              config: Path | None) -> dict[str, Any]:
    build_vars = {k: v for k, v in env.items() if k.startswith("KBUILD_") or k == "SOURCE_DATE_EPOCH"}
    return {
        "kernel_version": tree.version,
        "arch": settings.guest.name,
        "source": tree.marker.get("spec", {}),
        "source_content": tree.marker.get("content", ""),
        "fragments": [{"path": str(p), "sha256": sha256_file(p)} for p in merged.fragments],
        # a complete .config built as it is (`config`), else what the fragments went on
        "base_config": str(config or settings.kernel_config or "allnoconfig"),
        "config_sha256": sha256_file(config_path),
        "compiler": cc_version,
        "cc": cc,
        "ccache": ccache_stats(env),
        "build_env": build_vars,
        "duration_seconds": round(time.monotonic() - started, 1),
        "reproduce": {
            "osbuilder": reproducer(settings),
            "make": " ".join(f"{k}={shlex.quote(v)}" for k, v in build_vars.items()) + " " + format_command(make),
        },
    }


def _publish_outputs(bdir: Path, out_dir: Path, metadata: dict[str, Any], wanted: dict[str, str]) -> None:
    """Copy every output to a temporary name beside its destination, then rename them all."""
    files = KernelFiles(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    published: dict[str, str] = {}
    try:
        for name, rel in wanted.items():
            src, dest = bdir / rel, out_dir / name
            if not src.is_file():
                raise OsbuilderError(f"kernel: make succeeded but {src} is missing")
            tmp = temp_beside(dest)
            staged.append((tmp, dest))
            shutil.copyfile(src, tmp)
            published[name] = sha256_file(tmp)
        metadata["outputs"] = published
        tmp = temp_beside(files.metadata)
        staged.append((tmp, files.metadata))
        tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        for tmp, dest in staged:
            publish(tmp, dest)
    finally:
        for tmp, _ in staged:
            discard(tmp)
