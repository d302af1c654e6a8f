"""The `osbuilder` command: the old Makefile targets as subcommands, every setting as a flag.

Each subcommand is a thin shell: it resolves the settings and calls the step's function.
Exit codes: 0 success, 1 a step failed, 2 a usage error (bad setting, missing input),
125 an infrastructure failure (broken accelerator, unreachable mirror).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from osbuilder import __version__, deps
from osbuilder import settings as settings_mod
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.settings import TABLE, Settings

log = logging.getLogger("osbuilder")


def cmd_rootfs(s: Settings, args) -> None:
    from osbuilder.rootfs import build_rootfs

    deps.require("rootfs")
    writable_workdir(s)
    dest = build_rootfs(s, s.workdir / "rootfs")
    print(f"rootfs: {dest}")


def cmd_image(s: Settings, args) -> None:
    from osbuilder.image import build_image

    deps.require("image")
    writable_workdir(s)
    dest = s.workdir / "container.img"
    layout = build_image(s, s.workdir / "rootfs", dest)
    print(f"image: {dest} ({layout.total_bytes // 2**20} MiB, {s.fs_type} at offset {layout.fs_offset})")


def cmd_check_deps(s: Settings, args) -> int:
    steps = args.steps or None
    if args.install:
        installed = deps.install(steps)
        if installed:
            print("installed: " + " ".join(installed))
    print(deps.report(steps))
    gone = deps.missing(steps)
    if gone:
        names = ", ".join(sorted({t.program for _, t in gone}))
        print(f"osbuilder: missing: {names} (run `osbuilder check-deps --install`)", file=sys.stderr)
        return 1
    return 0


def cmd_help(s: Settings, args) -> None:
    print(f"osbuilder {__version__} — settings (precedence: CLI flag > environment > YAML profile > default)\n")
    print(settings_mod.describe(s))
    print(f"\nYAML profile: {s.profile or f'none ({settings_mod.PROFILE_NAME} in the current directory, or --config)'}")
    print("Subcommands: " + ", ".join(COMMANDS) + "  (osbuilder SUBCOMMAND --help)")


def cmd_kernel_src(s: Settings, args) -> None:
    from osbuilder.kernel import commands

    writable_workdir(s)
    commands.kernel_src(s, args)


def cmd_kernel(s: Settings, args) -> None:
    from osbuilder.kernel import commands

    writable_workdir(s)
    commands.kernel(s, args)


def cmd_kconfig(s: Settings, args) -> None:
    from osbuilder.kernel import commands

    commands.kconfig(s, args)


def cmd_boot(s: Settings, args) -> int | None:
    from osbuilder.vm import commands

    return commands.boot(s, args)


def cmd_install_image(s: Settings, args) -> None:
    from osbuilder import install

    install.install_image(s, dry_run=args.dry_run, force=args.force)


def cmd_install_kernel(s: Settings, args) -> None:
    from osbuilder import install

    install.install_kernel(s, dry_run=args.dry_run, force=args.force)


COMMANDS = {
    "rootfs": (cmd_rootfs, "build WORKDIR/rootfs with the distribution's packages and the agent"),
    "image": (cmd_image, "make WORKDIR/container.img from WORKDIR/rootfs"),
    "kernel-src": (cmd_kernel_src, "get kernel source into WORKDIR/linux"),
    "kernel": (cmd_kernel, "build WORKDIR/vmlinuz.container and vmlinux.container"),
    "kconfig": (cmd_kconfig, "kernel config tools: `kconfig show` prints the fragments and where options come from"),
    "boot": (cmd_boot, "boot the image under QEMU (interactive console, or --check)"),
    "install-image": (cmd_install_image, "install the boot-checked image into the runtime's directory"),
    "install-kernel": (cmd_install_kernel, "install the boot-checked kernel into the runtime's directory"),
    "check-deps": (cmd_check_deps, "list the programs each step needs; --install installs them"),
    "help": (cmd_help, "show every setting: value, where it came from, default, description"),
}


def writable_workdir(s: Settings) -> None:
    wd: Path = s.workdir
    try:
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"WORKDIR: {wd} is not writable ({e.strerror})") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", help="YAML profile (default: ./osbuilder.yaml)")
    group = common.add_argument_group("settings (also as environment variables and YAML keys)")
    for s in TABLE:
        group.add_argument(s.flag, dest=s.name, metavar=s.name, help=f"{s.help} [default: {s.default or 'empty'}]")
    parser = argparse.ArgumentParser(prog="osbuilder", description="Build and boot-check guest OS artifacts.")
    parser.add_argument("--version", action="version", version=f"osbuilder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "check-deps":
            p.add_argument("steps", nargs="*", metavar="STEP",
                           help=f"only these steps ({', '.join(deps.STEPS)})")
            p.add_argument("--install", action="store_true", help="apt-get install what is missing (root)")
        if name == "boot":
            p.add_argument("--check", action="store_true", help="run the boot checks and print the timings")
            p.add_argument("--kernel", dest="boot_kernel_path", type=Path, help="kernel image to boot")
        if name == "kconfig":
            p.add_argument("action", choices=["show"], help="show: resolved fragments and option origins")
        if name.startswith("install-"):
            p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
            p.add_argument("--force", action="store_true", help="install without a passing boot record")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    cli_values = {s.name: getattr(args, s.name, None) for s in TABLE}
    try:
        s = settings_mod.load(cli_values, config=args.config)
        logging.basicConfig(level=logging.DEBUG if s.debug else logging.INFO, format="%(message)s",
                            stream=sys.stderr)
        if s.use_docker:
            log.info("USE_DOCKER: ignored; osbuilder builds without containers or root-only tricks")
        handler = COMMANDS[args.command][0]
        started = time.monotonic()
        code = handler(s, args)
        if args.command not in ("help", "check-deps"):
            log.info("%s: done in %.1fs", args.command, time.monotonic() - started)
        return code or 0
    except OsbuilderError as e:
        print(f"osbuilder: error: {e.message}", file=sys.stderr)
        if e.detail:
            print(e.detail.rstrip(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("osbuilder: interrupted; nothing half-written was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
