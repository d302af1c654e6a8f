"""A new WORKDIR that starts with the session WORKDIR's kernel object tree, as a user's WORKDIR (or build
host) keeps the tree of the kernel it built last: its next build with a changed config recompiles what
changed, not everything."""

from __future__ import annotations

import subprocess
from pathlib import Path

from filelock import FileLock

from osbuilder.layout import Workdir
from osbuilder.settings import Settings


def seed_object_tree(settings: Settings, host: Path) -> None:
    """Make the WORKDIR `host` with the session WORKDIR's kernel object tree (none if the session has
    none yet), copied under the lock kernel builds take on it, and relocated. kbuild's objects record relative
    paths, objtool's build absolute ones; left pointing here, objtool would be rebuilt and with it every
    object (a 5-15 min cold build instead of ~30 s: the test would be slow, not wrong)."""
    src = Workdir.of(settings).kernel_build
    host.mkdir()
    if not src.is_dir():
        return
    dest = Workdir(host).kernel_build
    with FileLock(str(src) + ".lock"):
        subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dest)], check=True)
    root = Workdir.of(settings).root
    for old in {f"{root.absolute()}/", f"{root.resolve()}/"}:
        listed = subprocess.run(["grep", "-rlIF", old, str(dest)], capture_output=True, text=True).stdout
        for path in map(Path, listed.splitlines()):
            path.write_bytes(path.read_bytes().replace(old.encode(), f"{host}/".encode()))
