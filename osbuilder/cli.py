"""The `osbuilder` command: the old Makefile targets as subcommands, every setting as a flag.

Every subcommand lives here and is a thin shell: parse, resolve the settings, call the step's
function, print what it made.
Exit codes: 0 success, 1 a step failed, 2 a usage error (bad setting, missing input),
125 an infrastructure failure (broken accelerator, unreachable mirror).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from osbuilder import __version__, deps, procs
from osbuilder import settings as settings_mod
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.layout import IMAGE, INITRD, ROOTFS, VMLINUX, VMLINUZ, UserCache, Workdir
from osbuilder.settings import TABLE, Settings

log = logging.getLogger("osbuilder")


def cmd_rootfs(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder.rootfs.build import build_rootfs

    deps.require("rootfs")
    wd = writable_workdir(s)
    dest = build_rootfs(s, wd.rootfs)
    print(f"rootfs: {dest}")


def cmd_image(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder.image import build_image

    deps.require("image")
    wd = writable_workdir(s)
    image = build_image(s, wd.rootfs, wd.image)
    print(f"image: {wd.image} ({image.total_bytes // 2**20} MiB, {s.fs_type} at offset {image.fs_offset})")


def cmd_initrd(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import initrd

    initrd.require_agent_init(s)  # before anything is written
    deps.require("initrd")
    wd = writable_workdir(s)
    dest = initrd.build_initrd(s, wd.rootfs, wd.initrd)
    print(f"initrd: {dest} ({dest.stat().st_size / 2**20:.1f} MiB, zstd-compressed newc cpio, /init is the agent)")


def cmd_kernel_src(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder.kernel.source import ensure_source

    wd = writable_workdir(s)
    tree = ensure_source(s)
    origin = tree.marker.get("spec", {}).get("location", s.kernel_source)
    state = "unpacked" if tree.fresh else "already there, nothing to do"
    print(f"kernel source: {wd.linux}: Linux {tree.version} from {origin} ({state})")


def cmd_kernel(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder.kernel.build import build_kernel

    wd = writable_workdir(s)
    result = build_kernel(s, wd.root)
    meta = result.metadata
    print(f"kernel: Linux {result.version} built in {meta['duration_seconds']:.0f}s "
          f"(ccache: {meta['ccache'] or 'off'})")
    for path in result.files.all():
        print(f"  {path}")


def cmd_kconfig(s: Settings, args: argparse.Namespace) -> int:
    from osbuilder.kernel import bisect, configdiff, fragments

    if args.action == "show":
        print(fragments.show(s))
        return 0
    good, bad = kconfig_pair(args)
    if args.action == "diff":
        changes, index = configdiff.kconfig_diff(s, good, bad)
        show = configdiff.report_json if args.json else configdiff.report
        print(show(changes, index, good=good, bad=bad))
        return 0
    writable_workdir(s)
    result = bisect.kconfig_bisect(s, good, bad, args.test, reset=args.reset)
    print(json.dumps(result, indent=2) if args.json else bisect.format_result(result))
    return bisect.EXIT_CODES[result["status"]]


def kconfig_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    """GOOD and BAD: `kconfig diff GOOD BAD` or `kconfig bisect --good GOOD --bad BAD` (either form)."""
    files = list(args.files)
    good = args.good or (files.pop(0) if files else None)
    bad = args.bad or (files.pop(0) if files else None)
    if good is None or bad is None or files:
        raise UsageError(f"kconfig {args.action}: give two configs: GOOD and BAD "
                         f"(`osbuilder kconfig {args.action} --good GOOD --bad BAD`)")
    return Path(good), Path(bad)


def cmd_bisect_run(s: Settings, args: argparse.Namespace) -> int:
    """Exit codes for `git bisect run`: 0 good, 1 bad, 125 skip; 128 (stop the bisection) for a usage
    error, which must not mark a commit bad."""
    from osbuilder.kernel import bisect_run

    if args.kernel_config_file is None:
        return report(UsageError("bisect-run: --config FILE (the guest .config to build every commit with) is "
                                 "required"), bisect_run.USAGE_EXIT)
    tree = args.source_tree or Path.cwd()
    try:
        writable_workdir(s)
        verdict = bisect_run.bisect_run(s, args.kernel_config_file, tree)
    except UsageError as e:
        return report(e, bisect_run.USAGE_EXIT)
    except OsbuilderError as e:  # nothing said about the commit
        return report(e, 125)
    print(bisect_run.describe(verdict, tree))
    if verdict.evidence and verdict.verdict != "good":
        print(verdict.evidence.rstrip()[-3000:])
    return bisect_run.EXIT_CODES[verdict.verdict]


def cmd_boot(s: Settings, args: argparse.Namespace) -> int:
    from osbuilder.vm import check

    image = check.boot_image(s)
    kernel, chosen = check.kernel_and_accel(s, path=args.boot_kernel_path)
    if args.check:
        record = check.run_boot_check(s, image, kernel, chosen=chosen)
        print(check.format_timings(record))
        return 0
    return check.boot_interactive(s, image, kernel, chosen)


def cmd_install_image(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import install

    install.install_image(s, dry_run=args.dry_run, force=args.force)


def cmd_install_initrd(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import install

    install.install_initrd(s, dry_run=args.dry_run, force=args.force)


def cmd_install_kernel(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import install

    install.install_kernel(s, dry_run=args.dry_run, force=args.force)


def cmd_check_deps(s: Settings, args: argparse.Namespace) -> int:
    steps = args.steps or None
    if s.use_docker:  # the steps' tools are in the tools image: the host needs only the engine
        if args.install:
            installed = deps.install(gone=deps.engine_missing(s.container_engine))
            if installed:
                print("installed: " + " ".join(installed))
        print(f"USE_DOCKER=yes: every step runs in the tools image; this host needs only CONTAINER_ENGINE "
              f"({s.container_engine})")
        print(deps.report(table=deps.engine_table(s.container_engine)))
        gone = deps.engine_missing(s.container_engine)
    else:
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


def cmd_help(s: Settings, args: argparse.Namespace) -> None:
    print(f"osbuilder {__version__} — settings (precedence: CLI flag > environment > YAML profile > default)\n")
    print(settings_mod.describe(s))
    print(f"\nYAML profile: {s.profile or f'none ({settings_mod.PROFILE_NAME} in the current directory, or --config)'}")
    user_cache = UserCache.of(s).root
    print(f"Per-user cache (CACHE_DIR): {user_cache} — the KVM verdict, Debian's boot kernel, ccache and "
          f"unpacked kernel sources, shared by every WORKDIR; clear it with `rm -rf {user_cache}`")
    from osbuilder import container

    print(container.describe(s))
    print("Cached rootfs (pytest fixtures): keyed on the archive's Release date, so it is rebuilt after a point "
          "release; `pytest --rebuild` forces a rebuild")
    print("Subcommands: " + ", ".join(COMMANDS) + "  (osbuilder SUBCOMMAND --help)")


COMMANDS = {
    "rootfs": (cmd_rootfs, f"build WORKDIR/{ROOTFS} with the distribution's packages and the agent"),
    "image": (cmd_image, f"make WORKDIR/{IMAGE} from WORKDIR/{ROOTFS}"),
    "initrd": (cmd_initrd, f"make WORKDIR/{INITRD} (the agent as /init) from an AGENT_INIT=yes WORKDIR/{ROOTFS}"),
    "kernel-src": (cmd_kernel_src, "get kernel source into WORKDIR/linux"),
    "kernel": (cmd_kernel, f"build WORKDIR/{VMLINUZ} and {VMLINUX}"),
    "kconfig": (cmd_kconfig, "kernel config tools: `show` (fragments and where options come from), `diff GOOD BAD`, "
                             "`bisect --good GOOD --bad BAD` (which option breaks the guest)"),
    "bisect-run": (cmd_bisect_run, "for `git bisect run`: build the checked-out kernel commit with --config and "
                                   "boot-check it (exit 0 good, 1 bad, 125 skip)"),
    "boot": (cmd_boot, "boot the image under QEMU (interactive console, or --check)"),
    "install-image": (cmd_install_image, "install the boot-checked image into the runtime's directory"),
    "install-kernel": (cmd_install_kernel, "install the boot-checked kernel into the runtime's directory"),
    "install-initrd": (cmd_install_initrd, "install the boot-checked initrd into the runtime's directory"),
    "check-deps": (cmd_check_deps, "list the programs each step needs; --install installs them"),
    "help": (cmd_help, "show every setting: value, where it came from, default, description"),
}


def writable_workdir(s: Settings) -> Workdir:
    wd = Workdir.of(s)
    try:
        wd.root.mkdir(parents=True, exist_ok=True)
        probe = wd.root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"WORKDIR: {wd.root} is not writable ({e.strerror})") from None
    return wd


def guard_process(s: Settings, args: argparse.Namespace) -> None:
    """Before a step runs: SIGTERM and SIGHUP unwind like Ctrl-C (every child killed, every guest
    powered off, temporaries removed), and the step's locks are held (procs.hold_lock: the first
    exclusively, the others shared), so a second run on the same WORKDIR waits for the first and
    says so. A step's log file is its lock, so no other file appears in WORKDIR; image also reads
    the rootfs tree; boot checks share the boot-log directory. Children die with osbuilder even
    when it is SIGKILLed: procs.py's watchdog starts with the first of them."""
    procs.terminate_as_interrupt()
    wd = Workdir.of(s)
    locks = {
        "rootfs": (wd.log("rootfs"),),
        "image": (wd.log("image"), wd.log("rootfs")),
        "initrd": (wd.log("initrd"), wd.log("rootfs")) if s.agent_init else (),  # else refused, nothing written
        "kernel-src": (wd.log("kernel"),),
        "kernel": (wd.log("kernel"),),
        "kconfig": (wd.log("bisect"), wd.log("kernel")) if getattr(args, "action", "") == "bisect" else (),
        "bisect-run": (wd.log("bisect-run"),),
        "boot": (wd.boot_logs,) if getattr(args, "check", False) else (),
    }.get(args.command, ())
    if locks:
        writable_workdir(s)
    if args.command == "boot" and locks:
        wd.boot_logs.mkdir(exist_ok=True)
    for i, path in enumerate(locks):
        procs.hold_lock(path, args.command, shared=i > 0)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also as environment variables and YAML keys)")
    for s in TABLE:
        group.add_argument(s.flag, dest=s.name, metavar=s.name, help=f"{s.help} [default: {s.default or 'empty'}]")


def add_kconfig_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "diff", "bisect"],
                   help="show: resolved fragments and option origins; diff GOOD BAD; bisect --good GOOD --bad BAD")
    p.add_argument("files", nargs="*", metavar="CONFIG", help="GOOD and BAD .config files (diff, bisect)")
    p.add_argument("--good", metavar="GOOD", help="the .config that boots (bisect)")
    p.add_argument("--bad", metavar="BAD", help="the .config that does not (bisect)")
    p.add_argument("--test", default="boot", metavar="boot|build|CMD",
                   help="bisect: boot (the boot check, default), build (compiles), or a command run with git "
                        "bisect's exit codes (0 good, 125 skip, else bad) and the kernel in $OSBUILDER_KERNEL")
    p.add_argument("--reset", action="store_true", help="bisect: forget the saved state and start over")
    p.add_argument("--json", action="store_true", help="diff, bisect: print JSON")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", help="YAML profile (default: ./osbuilder.yaml)")
    add_settings_flags(common)
    # bisect-run's --config is the kernel config (as git bisect users expect); its profile is --profile
    bisect_run_common = argparse.ArgumentParser(add_help=False)
    bisect_run_common.add_argument("--profile", dest="config", type=Path, metavar="FILE", help="YAML profile")
    bisect_run_common.add_argument("--config", dest="kernel_config_file", type=Path, metavar="FILE",
                                   help="the guest .config every commit is built with (normalised by olddefconfig)")
    bisect_run_common.add_argument("--source-tree", type=Path, metavar="DIR",
                                   help="the Linux git checkout (default: the current directory)")
    add_settings_flags(bisect_run_common)
    parser = argparse.ArgumentParser(prog="osbuilder", description="Build and boot-check guest OS artifacts.")
    parser.add_argument("--version", action="version", version=f"osbuilder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (_, help_text) in COMMANDS.items():
        parent = bisect_run_common if name == "bisect-run" else common
        p = sub.add_parser(name, parents=[parent], help=help_text, description=help_text)
        if name == "check-deps":
            p.add_argument("steps", nargs="*", metavar="STEP",
                           help=f"only these steps ({', '.join(deps.STEPS)})")
            p.add_argument("--install", action="store_true", help="apt-get install what is missing (root)")
        if name == "boot":
            p.add_argument("--check", action="store_true", help="run the boot checks and print the timings")
            p.add_argument("--kernel", dest="boot_kernel_path", type=Path, help="kernel image to boot")
        if name == "kconfig":
            add_kconfig_arguments(p)
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
        announce(s)
        if s.use_docker:
            from osbuilder import container

            if args.command in container.STEPS:  # the step locks, logs and reports inside the tools image
                return container.run_step(s, args)
        guard_process(s, args)
        handler = COMMANDS[args.command][0]
        started = time.monotonic()
        code = handler(s, args)
        if args.command not in ("help", "check-deps"):
            log.info("%s: done in %.1fs", args.command, time.monotonic() - started)
        return code or 0
    except OsbuilderError as e:
        return report(e)
    except OSError as e:
        log.debug("%s failed", args.command, exc_info=True)
        return report(os_error(args.command, e))
    except KeyboardInterrupt:
        print("osbuilder: interrupted; nothing half-written was published", file=sys.stderr)
        return 130


def announce(s: Settings) -> None:
    """One line for each thing about the settings a user could be surprised by: which profile was read
    (another checkout's osbuilder.yaml), and environment values that were ignored."""
    if s.profile is not None:
        keys = sorted(k for k, source in s.sources.items() if source.startswith("yaml:"))
        taken = ", ".join(k.lower() for k in keys) if keys else "no setting taken from it"
        print(f"osbuilder: profile {s.profile.absolute()}: {taken}", file=sys.stderr)
    for notice in s.notices:
        print(f"osbuilder: notice: {notice}", file=sys.stderr)


def os_error(command: str, e: OSError) -> OsbuilderError:
    """An OSError that escaped a step, as a one-line error naming the path (a full disk is not the
    artifact's fault: exit 125)."""
    paths = " -> ".join(os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None)
    what = f"{command}: {paths + ': ' if paths else ''}{e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InfrastructureError(what)
    return OsbuilderError(what)


def report(e: OsbuilderError, exit_code: int | None = None) -> int:
    print(f"osbuilder: error: {e.message}", file=sys.stderr)
    if e.detail:
        print(e.detail.rstrip(), file=sys.stderr)
    return e.exit_code if exit_code is None else exit_code


if __name__ == "__main__":
    sys.exit(main())
