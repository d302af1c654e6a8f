"""`git bisect run osbuilder bisect-run --config guest.config` names the commit that breaks the guest's boot.

The history is made on top of the real kernel tree osbuilder builds (Debian's linux-source, from
`ensure_source`), in a git repository of its own: a hard-linked copy of the shared tree, so making it
costs one `git add` of ~78k files, not a copy of 1.3 GB. Every file the history changes is written to a
new file and renamed over the link (git checkout does the same), so the shared tree is never written;
the test proves it by hashing those files in the shared tree before and after.

    base      the tree as Debian ships it                           good
    c1        init/calibrate.c: a comment                           good
    c2        Documentation: a new file                             good
    c3        init/calibrate.c: lpj= via kstrtoul, with a typo      does not compile: skip (125)
    c4        init/calibrate.c: the typo fixed                      good
    c5        init/do_mounts.c: root= copied with sizeof(pointer)   bad: root=/dev/pm, "VFS: Unable to mount root fs"
    c6        init/do_mounts.c: a comment                           bad

Six commits to test: git bisect's first midpoint is c3, the one that does not compile; osbuilder answers
skip, git tests a neighbour instead, and ends at c5. Each step builds in one object tree (only what the
commit changed is recompiled) and boot-checks the session's image with that kernel under QEMU.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from boot_tests.scratch import remove_later
from osbuilder.kernel.source import ensure_source
from osbuilder.layout import KernelFiles, UserCache

pytestmark = [pytest.mark.build, pytest.mark.boot, pytest.mark.xdist_group("bisect-run")]

OSBUILDER = Path(sys.executable).parent / "osbuilder"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "A U Thor", "GIT_AUTHOR_EMAIL": "author@example.org",
    "GIT_COMMITTER_NAME": "C O Mitter", "GIT_COMMITTER_EMAIL": "committer@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
}
# Committing ~78k files: loose objects stored, not deflated (zlib level 0: git add of the tree took 6 s of
# CPU here, against 15 s at level 1; 1.4 GB of objects, removed with the repository), no fsync, no gc.
GIT_FAST = ("-c", "core.looseCompression=0", "-c", "gc.auto=0", "-c", "core.fsync=none",
            "-c", "core.untrackedCache=true", "-c", "advice.detachedHead=false")
BASE_DATE = 1_700_000_000  # commit n is dated an hour after commit n-1

CALIBRATE, DO_MOUNTS = "init/calibrate.c", "init/do_mounts.c"
LPJ_PARSE = "\tpreset_lpj = simple_strtoul(str,NULL,0);\n\treturn 1;\n"
ROOT_COPY = "\tstrscpy(saved_root_name, line, sizeof(saved_root_name));\n"
ROOTWAIT = "static int __init rootwait_setup(char *str)\n"


@dataclass(frozen=True)
class Change:
    """One commit: a file of the tree, a piece of its text and what replaces it (or a new file)."""

    subject: str
    path: str
    old: str | None
    new: str


HISTORY = (
    Change("init/calibrate: say where lpj= comes from", CALIBRATE, "unsigned long preset_lpj;\n",
           "unsigned long preset_lpj;\t/* lpj= on the kernel command line */\n"),
    Change("Documentation: note on bisecting guest boots", "Documentation/admin-guide/guest-bisect.rst", None,
           "Bisecting guest boots\n=====================\n\n"
           "git bisect run osbuilder bisect-run --config guest.config\n"),
    Change("init/calibrate: parse lpj= with kstrtoul", CALIBRATE, LPJ_PARSE,
           "\treturn kstrtoul(str, 0, &preset_lpjj) == 0;\n"),  # the typo: does not compile
    Change("init/calibrate: fix the lpj= typo", CALIBRATE, "&preset_lpjj", "&preset_lpj"),
    Change("init/do_mounts: copy root= with a bounded strscpy", DO_MOUNTS, ROOT_COPY,
           "\tstrscpy(saved_root_name, line, sizeof(line));\n"),  # 8 bytes: root=/dev/pmem0p1 -> /dev/pm
    Change("init/do_mounts: explain rootwait", DO_MOUNTS, ROOTWAIT,
           "/* rootwait: wait for the root device to appear instead of panicking */\n" + ROOTWAIT),
)
NO_COMPILE, BREAKS_BOOT = 3, 5  # commit numbers in HISTORY (base is 0)


@dataclass
class KernelRepo:
    path: Path
    commits: list[str]  # base, then one per HISTORY entry
    shared: Path  # the shared tree it was copied from
    seconds: dict[str, float]

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return git(self.path, *args, check=check)


def git(repo: Path, *args: str, date: int | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV}
    if date is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{date} +0000"
    return subprocess.run(["git", "-C", str(repo), *GIT_FAST, *args], env=env, capture_output=True, text=True,
                          check=check, timeout=900)


def replace_file(path: Path, text: str) -> None:
    """Write `text` to a new file and rename it over `path`: a hard link to the shared tree is
    replaced, never written through."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if path.exists():
        tmp.chmod(path.stat().st_mode)
    tmp.replace(path)


def apply(tree: Path, change: Change) -> None:
    path = tree / change.path
    if change.old is None:
        assert not path.exists(), path
        replace_file(path, change.new)
        return
    text = path.read_text()
    assert text.count(change.old) == 1, f"{change.path}: {change.old!r} is not there exactly once"
    replace_file(path, text.replace(change.old, change.new))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def touched(shared: Path) -> dict[str, str]:
    """The hashes of the shared tree's files the history changes (a new file: absent)."""
    return {c.path: sha256(shared / c.path) if (shared / c.path).exists() else "absent" for c in HISTORY}


@pytest.fixture(scope="module")
def kernel_repo(osbuilder_settings, tmp_path_factory) -> Iterator[KernelRepo]:
    """A git repository of the real kernel tree with HISTORY on top of it, removed afterwards (1.5 GB)."""
    shared = ensure_source(osbuilder_settings).path.resolve()
    before = touched(shared)
    path = tmp_path_factory.mktemp("bisect-run") / "linux"
    seconds: dict[str, float] = {}
    started = time.monotonic()
    subprocess.run(["cp", "-al", str(shared), str(path)], check=True)
    (path / ".osbuilder-source.json").unlink(missing_ok=True)  # the shared tree's marker, not kernel source
    seconds["copy"] = time.monotonic() - started
    try:
        git(path, "init", "--quiet", "--initial-branch=main")
        started = time.monotonic()
        # -f: Debian's linux-source .gitignore ignores its own top level ("not in our repository")
        git(path, "add", "--all", "--force")
        seconds["git add"] = time.monotonic() - started
        git(path, "commit", "--quiet", "-m", "Linux as Debian's linux-source ships it", date=BASE_DATE)
        for n, change in enumerate(HISTORY, 1):
            apply(path, change)
            git(path, "add", "--force", "--", change.path)
            git(path, "commit", "--quiet", "-m", change.subject, date=BASE_DATE + 3600 * n)
        commits = git(path, "rev-list", "--reverse", "HEAD").stdout.split()
        assert len(commits) == len(HISTORY) + 1
        seconds["history"] = time.monotonic() - started
        yield KernelRepo(path, commits, shared, seconds)
        assert touched(shared) == before, "the shared kernel tree changed: a hard link was written through"
    finally:
        remove_later(path.parent)


def bisect_run_env(settings, workdir: Path, image: Path) -> dict[str, str]:
    """A WORKDIR of its own; the session's per-user cache (ccache, the accelerator verdict) and image."""
    return {**os.environ, "WORKDIR": str(workdir), "CACHE_DIR": str(UserCache.of(settings).root),
            "BOOT_IMAGE": str(image), "ACCEL": settings.accel}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def guest_config(kernel, tmp_path: Path) -> Path:
    """The project's default kernel config (the `kernel` fixture's), as a user would keep it."""
    config = tmp_path / "guest.config"
    shutil.copyfile(KernelFiles(kernel.path).config, config)
    return config


def test_git_bisect_run_names_the_commit_that_breaks_boot(kernel_repo, osbuilder_kernel, osbuilder_image,
                                                          osbuilder_settings,
                                                          tmp_path) -> None:
    repo, commits = kernel_repo, kernel_repo.commits
    config = guest_config(osbuilder_kernel, tmp_path)
    env = bisect_run_env(osbuilder_settings, tmp_path / "workdir", osbuilder_image.path)
    repo.git("bisect", "start", commits[-1], commits[0])
    started, cpu = time.monotonic(), children_cpu()
    try:
        run = subprocess.run(["git", "-C", str(repo.path), "bisect", "run", str(OSBUILDER), "bisect-run",
                              "--config", str(config)], env=env, capture_output=True, text=True, timeout=3600)
        log = repo.git("bisect", "log").stdout
        bad = repo.git("rev-parse", "--verify", "refs/bisect/bad").stdout.strip()
    finally:
        repo.git("bisect", "reset", check=False)
    elapsed, cpu = time.monotonic() - started, children_cpu() - cpu
    output = run.stdout + run.stderr
    print(f"git bisect run: {elapsed:.0f}s ({cpu:.0f}s CPU); making the repository: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in repo.seconds.items()))
    print("\n".join(line for line in output.splitlines() if line.startswith(("bisect-run:", "running"))))
    assert run.returncode == 0, output[-4000:]
    culprit = commits[BREAKS_BOOT]
    assert f"{culprit} is the first bad commit" in output, output[-4000:]
    assert bad == culprit
    assert HISTORY[BREAKS_BOOT - 1].subject in output
    # the commit that does not compile was tested and skipped, not called bad
    assert f"# skip: [{commits[NO_COMPILE]}]" in log, log
    assert re.search(r"bisect-run: skip \(phase build: does not compile", output), output[-4000:]
    # the breaking commit failed its boot the fast way, on the console: no timeout
    assert re.search(r"bisect-run: bad \(phase \w+: kernel panic: root filesystem not found", output), output[-4000:]
    assert f"# bad: [{culprit}]" in log and f"# good: [{commits[NO_COMPILE + 1]}]" in log, log
    assert "# bad: [" + commits[NO_COMPILE] not in log
    # The steps build in a new object tree from a new source path; the session's kernel (the same .config,
    # from the shared tree) filled ccache, and ccache-gcc names sources relative to the object tree: the
    # first full build is ccache hits (before ccache-gcc: all misses, a 10-15 min cold build on 2 cores).
    first = re.search(r"bisect-run: (?:good|bad) .*; ccache (\d+) hits, (\d+) misses", output)
    assert first, output[-4000:]
    hits, misses = map(int, first.groups())
    assert hits >= 100 and misses * 20 <= hits, first.group(0)


def test_bisect_run_skips_a_commit_that_does_not_configure(kernel_repo, osbuilder_kernel, osbuilder_image,
                                                           osbuilder_settings,
                                                           tmp_path) -> None:
    """A commit whose Kconfig is broken says nothing about the regression: 125, within seconds."""
    repo = kernel_repo
    repo.git("checkout", "--quiet", "-b", "broken-kconfig", repo.commits[0])
    try:
        apply(repo.path, Change("init: an unbalanced parenthesis", "init/Kconfig", 'menu "General setup"\n',
                                'menu "General setup"\nconfig BROKEN\n\tbool "broken"\n\tdepends on (FOO\n'))
        git(repo.path, "commit", "--quiet", "--all", "-m", "init: an unbalanced parenthesis", date=BASE_DATE)
        started = time.monotonic()
        run = subprocess.run([str(OSBUILDER), "bisect-run", "--config", str(guest_config(osbuilder_kernel, tmp_path))],
                             cwd=repo.path, env=bisect_run_env(osbuilder_settings, tmp_path / "workdir",
                                                               osbuilder_image.path),
                             capture_output=True, text=True, timeout=600)
    finally:
        repo.git("checkout", "--quiet", "--force", "main")
        repo.git("branch", "--quiet", "-D", "broken-kconfig", check=False)
    assert run.returncode == 125, run.stdout + run.stderr[-3000:]
    assert "bisect-run: skip (phase build: does not configure" in run.stdout, run.stdout + run.stderr[-3000:]
    assert time.monotonic() - started < 120


def test_bisect_run_usage_errors_stop_the_bisection(osbuilder_image, osbuilder_settings, tmp_path) -> None:
    """128 and above make `git bisect run` stop instead of marking the commit bad."""
    env = bisect_run_env(osbuilder_settings, tmp_path / "workdir", osbuilder_image.path)
    config = tmp_path / "guest.config"
    config.write_text("CONFIG_64BIT=y\n")
    not_git = tmp_path / "not-git"
    not_git.mkdir()
    cases = {
        "no --config": ([], "--config FILE"),
        "not a git tree": (["--config", str(config), "--source-tree", str(not_git)], "is not a git tree"),
        "no such config": (["--config", str(tmp_path / "missing.config"), "--source-tree", str(not_git)],
                           "missing.config"),
    }
    for what, (args, message) in cases.items():
        run = subprocess.run([str(OSBUILDER), "bisect-run", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 128, (what, run.stdout, run.stderr)
        assert message in run.stderr, (what, run.stderr)
