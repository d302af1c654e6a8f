"""Make deliberately broken (or patched) copies of an image, without mounting: debugfs on the partition.

Every helper works on a sparse COPY of the image in a test's temporary directory; the session's
image is never touched. And `kernel_release`: which kernel a guest should report it runs.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import struct
import subprocess
from pathlib import Path

from osbuilder.readback import read_layout
from osbuilder.run import run


def copy_image(image: Path, dest: Path) -> Path:
    """A sparse copy of `image` at `dest`."""
    subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True)
    return dest


def debugfs(image: Path, commands: list[str]) -> str:
    """Run debugfs -w commands on the image's root filesystem; return its output."""
    spec = read_layout(image).fs_spec(image)
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    out = run(["debugfs", "-w", "-f", str(script), spec], step="test-image", capture=True)
    return out.stdout.decode(errors="replace")


def remove_file(image: Path, path: str) -> None:
    debugfs(image, [f"rm {path}"])


def add_file(image: Path, guest_path: str, content: str, mode: int = 0o644) -> None:
    """Create a regular file (its directory must exist)."""
    local = image.with_name(posixpath.basename(guest_path))
    local.write_text(content)
    directory, name = posixpath.split(guest_path)
    debugfs(image, [f"cd {directory}", f"write {local} {name}", f"sif {name} mode 0{0o100000 | mode:o}",
                    f"sif {name} uid 0", f"sif {name} gid 0"])
    local.unlink()


def add_symlink(image: Path, link: str, target: str) -> None:
    debugfs(image, [f"symlink {link} {target}"])


def replace_init(image: Path, script: str) -> None:
    """Make the image's /sbin/init (/usr/sbin/init: /sbin is a link) a shell script running `script`."""
    remove_file(image, "/usr/sbin/init")
    add_file(image, "/usr/sbin/init", f"#!/bin/sh\n{script}\n", 0o755)


# inits of broken images: one that hangs idle, printing nothing; one that hangs busy, printing nothing
SLEEPING_INIT = "exec sleep infinity"
SPINNING_INIT = "while :; do :; done"


def exists(image: Path, path: str) -> bool:
    out = debugfs(image, [f"stat {path}"])
    return "File not found" not in out and "Inode:" in out


def cleanup(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def kernel_release(path: Path) -> str:
    """The release a kernel file was built as: from a bzImage's setup header (boot protocol
    `kernel_version`), or from the "Linux version" banner of an uncompressed vmlinux."""
    data = path.read_bytes()
    if data[0x202:0x206] == b"HdrS":
        start = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
        return data[start:start + 256].split(b"\0")[0].split()[0].decode()
    banner = re.search(rb"Linux version (\S+)", data)
    assert banner, f"{path}: neither a bzImage header nor a Linux version banner"
    return banner[1].decode()
