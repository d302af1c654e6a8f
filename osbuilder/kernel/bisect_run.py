"""`osbuilder bisect-run`: one step of `git bisect run`, for source regressions.

    git bisect start BAD GOOD && git bisect run osbuilder bisect-run --config guest.config

Run from a Linux git checkout (or with --source-tree): the checked-out commit is built with
`--config` (normalised by `olddefconfig` in that commit's Kconfig) in WORKDIR/bisect-run-build, one
object tree for every commit, so each step recompiles only what the commit changed; then the
WORKDIR's image is boot-checked with that kernel (verdicts.py). Exit 0 good, 1 bad, 125 skip (the
commit does not configure or compile, or infrastructure trouble, retried once first). A usage error
(no --config, no image) exits 128, which stops `git bisect run` instead of marking the commit bad.
"""

from __future__ import annotations

import logging
from pathlib import Path

from osbuilder.kernel.configdiff import read_input
from osbuilder.kernel.source import worktree
from osbuilder.kernel.verdicts import BAD, GOOD, SKIP, StepTest, Verdict
from osbuilder.layout import Workdir
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")

EXIT_CODES = {GOOD: 0, BAD: 1, SKIP: 125}
USAGE_EXIT = 128  # git bisect run: 128 and above abort the bisection


def bisect_run(settings: Settings, config: Path, source_tree: Path) -> Verdict:
    """Build the checked-out commit of `source_tree` with `config` and boot-check it."""
    from osbuilder.vm import check

    read_input(config, "--config")
    image = check.boot_image(settings)
    wd = Workdir.of(settings)
    logfile = wd.log("bisect-run")
    tree = worktree(source_tree, logfile)
    commit = tree.identity["commit"]
    test = StepTest(settings, "boot", tree=tree, out=wd.bisect_run_kernel, build_dir=wd.bisect_run_build,
                    logfile=logfile, image=image)
    log.info("bisect-run: commit %s (Linux %s) with %s", commit[:12], tree.version, config)
    verdict = test(config.resolve(), f"bisect-run-{commit[:12]}")
    if verdict.verdict == SKIP and verdict.retry:
        log.info("bisect-run: skip (%s); retrying once", verdict.reason)
        verdict = test(config.resolve(), f"bisect-run-{commit[:12]}-retry")
    return verdict


def describe(verdict: Verdict, source_tree: Path) -> str:
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in verdict.seconds.items())
    if verdict.ccache:
        seconds += f"; ccache {verdict.ccache.get('hits', 0)} hits, {verdict.ccache.get('misses', 0)} misses"
    return f"bisect-run: {verdict.verdict} (phase {verdict.phase}: {verdict.reason}) [{seconds}] in {source_tree}"
