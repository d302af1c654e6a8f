"""Small stand-ins the unit tests share: the smallest tree `osbuilder image` accepts, a runtime's TOML, and
Kata's way of reading its configuration (written here from Kata's description, not from osbuilder's code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from osbuilder.fs import sha256_file

_HOLD = ("import sys, time\nfrom filelock import FileLock\nlock = FileLock(sys.argv[1])\nlock.acquire()\n"
         "print('held', flush=True)\ntime.sleep(600)")


@contextmanager
def lock_held_elsewhere(lock_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the FileLock at `lock_path` (as another osbuilder would) until the block ends;
    the block gets that process (its pid, or to kill it earlier)."""
    other = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        yield other
    finally:
        other.kill()
        other.wait()


KATA_TOML = """\
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinux.container"
image = "/usr/share/kata-containers/kata-containers.img"
# initrd = "/usr/share/kata-containers/kata-containers-initrd.img"
machine_type = "q35"

[agent.kata]
debug = false
"""


def make_tree(root: Path, *, init_target: str | None = "../lib/systemd/systemd", agent: bool = True,
              systemd: bool = True) -> Path:
    """A tree that passes (or, with the flags, fails) `image.check_tree`: init, systemd, the agent."""
    for d in ("usr/sbin", "usr/bin", "usr/lib/systemd", "var/lib/osbuilder", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "sbin").symlink_to("usr/sbin")
    if systemd:
        (root / "usr/lib/systemd/systemd").write_bytes(b"\x7fELF systemd")
        (root / "usr/lib/systemd/systemd").chmod(0o755)
    if init_target:
        (root / "usr/sbin/init").symlink_to(init_target)
    if agent:
        (root / "usr/bin/osbuilder-agent").write_bytes(b"\x7fELF agent")
        (root / "usr/bin/osbuilder-agent").chmod(0o755)
    (root / "var/lib/osbuilder/osbuilder.yaml").write_text(yaml.safe_dump({"agent": {"name": "osbuilder-agent"}}))
    (root / "etc/hostname").write_text("guest\n")
    return root


def workdir_entries(wd: Path) -> list[str]:
    """What a WORKDIR holds, for tests of what a step leaves: its top-level names, the cache's complete
    entries as `cache/<kind>/<entry>` (lock files and empty directories are not left-overs), and anything
    else in the cache by name (a temporary there is one)."""
    names = []
    for path in sorted(wd.iterdir()):
        if path.name != "cache":
            names.append(path.name)
            continue
        for kind in sorted(p for p in path.iterdir() if p.is_dir()):
            for entry in sorted(kind.iterdir()):
                if entry.name.endswith(".lock"):
                    continue
                names.append(f"cache/{kind.name}/" + ("<entry>" if (entry / "manifest.json").is_file() else entry.name))
    return names
def record_kernel_build(workdir: Path) -> Path:
    """kernel-metadata.json as `osbuilder kernel` writes it for the WORKDIR's vmlinuz and vmlinux: the
    record that ties the two (install-kernel's gate of vmlinux)."""
    outputs = {name: sha256_file(workdir / name) for name in ("vmlinuz.container", "vmlinux.container")}
    path = workdir / "kernel-metadata.json"
    path.write_text(json.dumps({"outputs": outputs}))
    return path


def kata_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = kata_merge(merged[key], value) if both_tables else value
    return merged


def kata_reads(config: Path) -> dict[str, Any]:
    """What Kata (2.5+, katautils.decodeConfig) ends up with when told to load `config`: the file its
    symlinks lead to, then every file in config.d/ beside that file in lexical order, each overriding the
    keys it sets."""
    real = Path(os.path.realpath(config))
    result = tomllib.loads(real.read_text())
    drop_ins = real.parent / "config.d"
    for name in sorted(os.listdir(drop_ins)) if drop_ins.is_dir() else []:
        result = kata_merge(result, tomllib.loads((drop_ins / name).read_text()))
    return result


def kata_qemu(config: Path) -> dict[str, Any]:
    """Kata's [hypervisor.qemu] table, as it reads `config` and its drop-ins."""
    return kata_reads(config)["hypervisor"]["qemu"]


def tree_state(root: Path) -> dict[str, Any]:
    """Every entry under `root`: a file's bytes and mode, a link's target, a directory's mode."""
    state: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = ("dir", path.stat().st_mode)
        else:
            state[rel] = ("file", path.read_bytes(), path.stat().st_mode, path.stat().st_uid, path.stat().st_gid)
    return state
