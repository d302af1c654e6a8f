"""What one bisection step's kernel gets: good, bad or skip, with the phase and the evidence.

A `StepTest` builds a complete .config (reusing one object tree and ccache) and judges it:

- `build`: it compiles (good) or not (bad);
- `boot` (the default): osbuilder's boot check of the WORKDIR's image with that kernel, to systemd
  running and the agent answering; a failed boot is bad and records its phase and console lines;
- a command: run with git-bisect's exit conventions (0 good, 125 skip, 1–127 else bad), with the
  kernel's files in OSBUILDER_KERNEL, OSBUILDER_VMLINUX and OSBUILDER_KERNEL_CONFIG.

Whatever is not the kernel's fault — a broken accelerator, a QEMU crash, an unreachable mirror, a
full disk — is skip, never bad (`retry` says a second try may help). Under `boot` and a command, a
config that does not compile says nothing about what is tested: skip too.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.kernel.build import ConfigureError, KernelBuild, build_kernel
from osbuilder.kernel.source import SourceTree
from osbuilder.layout import KernelFiles
from osbuilder.run import run
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")

GOOD, BAD, SKIP = "good", "bad", "skip"


@dataclass
class Verdict:
    """The answer for one kernel: `verdict` good/bad/skip, the `phase` that decided it (build, a boot
    phase, the command), one line of `reason`, the `evidence` lines, and where the time went."""

    verdict: str
    phase: str
    reason: str = ""
    evidence: str = ""
    retry: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    kernel: str = ""
    ccache: dict[str, int] = field(default_factory=dict)  # the build's hits and misses

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_test(spec: str) -> list[str] | None:
    """`--test`: 'boot', 'build', or a command line; the command's argv (None for boot/build).
    A command that does not exist is a usage error."""
    if spec in ("boot", "build"):
        return None
    argv = shlex.split(spec)
    if not argv:
        raise UsageError("--test: empty command")
    program = argv[0]
    found = shutil.which(program) if "/" not in program else (program if os.access(program, os.X_OK) else None)
    if not found:
        raise UsageError(f"--test: {program}: no such command (expected boot, build, or a command line)")
    return argv


class StepTest:
    """Builds a config into `out` (object tree `build_dir`, source `tree`) and judges the kernel."""

    def __init__(self, settings: Settings, spec: str, *, tree: SourceTree, out: KernelFiles, logfile: Path,
                 build_dir: Path | None = None, image: Path | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.command = parse_test(spec)
        self.tree = tree
        self.out = out
        self.logfile = logfile
        self.build_dir = build_dir
        self.image = image

    def __call__(self, config: Path, name: str) -> Verdict:
        started = time.monotonic()
        verdict = self._judge(config, name)
        verdict.seconds["total"] = round(time.monotonic() - started, 1)
        return verdict

    def _judge(self, config: Path, name: str) -> Verdict:
        built, verdict = self.build(config)
        if verdict is not None:
            return verdict
        assert built is not None
        seconds = dict(built.metadata.get("seconds", {}))
        ccache = dict(built.metadata.get("ccache") or {})
        if self.spec == "build":
            return Verdict(GOOD, "build", "it compiles", seconds=seconds, kernel=built.version, ccache=ccache)
        started = time.monotonic()
        verdict = self.command_verdict(built) if self.command else self.boot_verdict(built, name)
        verdict.seconds = {**seconds, "test": round(time.monotonic() - started, 1)}
        verdict.ccache = ccache
        verdict.kernel = built.version
        return verdict

    def build(self, config: Path) -> tuple[KernelBuild | None, Verdict | None]:
        """The built kernel, or the verdict of a build that failed."""
        started = time.monotonic()
        try:
            return build_kernel(self.settings, self.out.dir, logfile=self.logfile, config=config, tree=self.tree,
                                build_dir=self.build_dir), None
        except InfrastructureError as e:
            verdict = Verdict(SKIP, "build", e.message, e.detail, retry=True)
        except ConfigureError as e:
            verdict = Verdict(BAD if self.spec == "build" else SKIP, "build",
                              e.message if self.spec == "build" else f"does not configure: {e.message}", e.detail)
        except OsbuilderError as e:
            verdict = Verdict(BAD if self.spec == "build" else SKIP, "build",
                              e.message if self.spec == "build" else f"does not compile: {e.message}", e.detail)
        verdict.seconds = {"build": round(time.monotonic() - started, 1)}
        return None, verdict

    def boot_verdict(self, built: KernelBuild, name: str) -> Verdict:
        from osbuilder.vm import check
        from osbuilder.vm.guest import BootFailure

        image = self.image or check.boot_image(self.settings)
        kernel = check.boot_kernel(self.settings, path=built.vmlinuz)
        try:
            record = check.run_boot_check(self.settings, image, kernel, name=name)
        except BootFailure as e:
            return Verdict(BAD, e.phase, e.reason, e.detail)
        except InfrastructureError as e:
            return Verdict(SKIP, getattr(e, "phase", "boot"), e.message, e.detail, retry=True)
        return Verdict(GOOD, "powerdown", f"booted to agent-ready ({record['profile']})")

    def command_verdict(self, built: KernelBuild) -> Verdict:
        assert self.command is not None
        env = {"OSBUILDER_KERNEL": str(built.vmlinuz), "OSBUILDER_VMLINUX": str(built.vmlinux),
               "OSBUILDER_KERNEL_CONFIG": str(built.config), "WORKDIR": str(self.settings.workdir)}
        try:
            result = run(self.command, step="bisect", logfile=self.logfile, env=env, check=False,
                         verbose=self.settings.debug)
        except OsbuilderError as e:  # it cannot start (gone since the check)
            raise UsageError(f"--test: {self.command[0]}: cannot run it", e.message) from None
        code = result.returncode
        tail = result.stdout.decode(errors="replace")[-2000:]
        if code == 0:
            return Verdict(GOOD, "command", "exit 0", tail)
        if code == 125:
            return Verdict(SKIP, "command", "exit 125 (skip)", tail)
        if 0 < code < 128:
            return Verdict(BAD, "command", f"exit {code}", tail)
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        raise OsbuilderError(f"--test: {shlex.join(self.command)}: {how}; stopping the bisection "
                             "(git bisect run stops on such an exit too)", tail)
