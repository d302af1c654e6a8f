"""Benchmark: a cold `osbuilder rootfs` against plain mmdebstrap of the same packages and suites, with
the network taken out (issue 18's target: at most 1.15x).

Both read one local mirror: a small HTTP server in this script that fetches each file from
deb.debian.org once (into --mirror-cache) and serves it from disk afterwards, with its Last-Modified
and 304 answers as a mirror gives them, so the archive's speed does not vary between them; a first,
untimed round fills it. Rounds are interleaved, so machine drift
hits both alike. Each osbuilder round has a new CACHE_DIR and WORKDIR (a cold base tree, a cold agent
build), and its time is split by a PATH shim around mmdebstrap: osbuilder's own mmdebstrap, and the
rest (the agent, the base tree's copy, the overlay, the policy, publishing). Each timed run starts after
a `sync`, so that neither pays for writing back what the run before it left (osbuilder syncs the
filesystem before it publishes a cache entry).

Usage (as root): python3 bench/bench_rootfs.py [--rounds N] [--mirror-cache DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from osbuilder import settings as S
from osbuilder.rootfs.base import packages

UPSTREAM = "http://deb.debian.org"
RELEASE = "bookworm"


class CachingMirror(BaseHTTPRequestHandler):
    """GET/HEAD of /debian/... and /debian-security/... from the cache, fetched from UPSTREAM on a miss."""

    protocol_version = "HTTP/1.1"  # keep-alive and pipelining, as apt uses them
    cache: Path

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def local(self) -> Path | None:
        path = self.path.split("?", 1)[0]
        if ".." in path or not path.startswith(("/debian/", "/debian-security/")):
            return None
        where = self.cache / path.lstrip("/")
        if not where.is_file():
            try:
                with urllib.request.urlopen(UPSTREAM + path, timeout=60) as r:
                    body = r.read()
                    modified = r.headers.get("Last-Modified")
            except urllib.error.HTTPError:
                return None
            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = where.with_name(f".{where.name}.{threading.get_ident()}")
            tmp.write_bytes(body)
            if modified:  # kept as the file's mtime, for If-Modified-Since
                stamp = parsedate_to_datetime(modified).timestamp()
                os.utime(tmp, (stamp, stamp))
            tmp.replace(where)
        return where

    def unchanged(self, where: Path) -> bool:
        """The request's If-Modified-Since covers the file (apt asks so on a second `apt-get update`, and a
        real mirror answers 304)."""
        since = self.headers.get("If-Modified-Since")
        try:
            return since is not None and int(where.stat().st_mtime) <= parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False

    def answer(self, with_body: bool) -> None:
        where = self.local()
        if where is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.unchanged(where):
            self.send_response(304)
            self.end_headers()
            return
        body = where.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", formatdate(where.stat().st_mtime, usegmt=True))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self.answer(False)


def serve(cache: Path) -> str:
    """Start the mirror on a free loopback port; its /debian URL."""
    handler = type("Mirror", (CachingMirror,), {"cache": cache})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/debian"


def shim(bindir: Path, log: Path) -> None:
    """`mmdebstrap` on PATH that records how long the real one ran (only the builds, not --version)."""
    real = shutil.which("mmdebstrap")
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "mmdebstrap"
    script.write_text(f'#!/bin/sh\ncase " $* " in *" --variant="*) ;; *) exec {real} "$@";; esac\n'
                      f"start=$(date +%s.%N)\n{real} \"$@\"\nrc=$?\n"
                      f'echo "$start $(date +%s.%N)" >> {log}\nexit $rc\n')
    script.chmod(0o755)


CPU: dict[str, list[float]] = {}  # CPU seconds (user + system) of each timed command and its descendants


def timed(cmd: list[str], env: dict[str, str] | None = None, what: str = "") -> float:
    os.sync()  # neither run pays for writing back what the one before left dirty (osbuilder syncs its cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:3])}... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if what:
        CPU.setdefault(what, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def plain(work: Path, mirror: str, pkgs: list[str]) -> float:
    tree = work / "plain"
    security = mirror.rsplit("/", 1)[0] + "/debian-security"
    t = timed(["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=directory",
               "--include=" + ",".join(pkgs), RELEASE, str(tree), mirror,
               f"deb {mirror} {RELEASE}-updates main", f"deb {security} {RELEASE}-security main"], what="plain")
    shutil.rmtree(tree)
    return t


def osbuilder(work: Path, mirror: str, n: int, shim_dir: Path, shim_log: Path,
              keep: Path | None) -> tuple[float, float]:
    """(whole `osbuilder rootfs`, its mmdebstrap) in a new CACHE_DIR and WORKDIR."""
    wd, cache = work / f"osb-{n}", work / f"cache-{n}"
    env = {**os.environ, "REPO_URL": mirror, "CACHE_DIR": str(cache), "PATH": f"{shim_dir}:{os.environ['PATH']}"}
    shim_log.write_text("")
    total = timed([sys.executable, "-m", "osbuilder", "rootfs", "--workdir", str(wd)], env=env, what="osbuilder")
    start, end = (float(x) for x in shim_log.read_text().split()[:2])
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        (wd / "rootfs").rename(keep)  # for comparing trees between versions of osbuilder
    shutil.rmtree(wd)
    shutil.rmtree(cache)
    return total, end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mirror-cache", type=Path, default=Path("/var/tmp/osbuilder-bench-mirror"))
    parser.add_argument("--keep", type=Path, help="keep the last osbuilder rootfs here")
    args = parser.parse_args()
    pkgs = packages(S.load({}, env={}, cwd=Path("/")))  # the set osbuilder installs by default
    args.mirror_cache.mkdir(parents=True, exist_ok=True)
    mirror = serve(args.mirror_cache)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        work = Path(tmp)
        shim_dir, shim_log = work / "shim", work / "shim.log"
        shim(shim_dir, shim_log)
        print(f"packages: {' '.join(pkgs)}; mirror {mirror} (cache {args.mirror_cache})", flush=True)
        plain(work, mirror, pkgs)  # fills the mirror (untimed)
        osbuilder(work, mirror, 0, shim_dir, shim_log, None)
        rows: dict[str, list[float]] = {"plain": [], "osbuilder": [], "its mmdebstrap": [], "the rest": []}
        for n in range(1, args.rounds + 1):
            rows["plain"].append(plain(work, mirror, pkgs))
            total, inner = osbuilder(work, mirror, n, shim_dir, shim_log, args.keep if n == args.rounds else None)
            rows["osbuilder"].append(total)
            rows["its mmdebstrap"].append(inner)
            rows["the rest"].append(total - inner)
            print(f"round {n}: plain {rows['plain'][-1]:.1f} s, osbuilder {total:.1f} s "
                  f"(mmdebstrap {inner:.1f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    for name, value in med.items():
        print(f"{name:>16}: {value:6.1f} s median  (runs: {', '.join(f'{x:.1f}' for x in rows[name])})")
    print(f"ratio osbuilder rootfs / plain mmdebstrap: {med['osbuilder'] / med['plain']:.3f} (target <= 1.15)")
    print(f"ratio osbuilder's mmdebstrap / plain mmdebstrap: {med['its mmdebstrap'] / med['plain']:.3f}")
    cpu = {k: statistics.median(v[1:]) for k, v in CPU.items()}  # the first of each was untimed
    print(f"CPU seconds (user + system, median): plain {cpu['plain']:.1f}, osbuilder {cpu['osbuilder']:.1f}; "
          f"ratio {cpu['osbuilder'] / cpu['plain']:.3f} (steadier than wall time on a shared machine)")


if __name__ == "__main__":
    main()
