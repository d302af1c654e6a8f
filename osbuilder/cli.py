"""The `osbuilder` command: the old Makefile targets as subcommands, every setting as a flag.

Every subcommand lives here, as a handler and its `Step` record (steps.py: help, own flags, needed
programs, locks, whether it runs in the USE_DOCKER container). A handler is a thin shell: resolve
the settings, call the step's function, print what it made. `main` parses (the parser is made from
the records), takes the step's locks, checks its programs and runs it.
Exit codes: 0 success, 1 a step failed, 2 a usage error (bad setting, missing input),
125 an infrastructure failure (broken accelerator, unreachable mirror, full disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from osbuilder import __version__, arch, deps, errors, procs, run, steps
from osbuilder import settings as settings_mod
from osbuilder.deps import Tool
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.layout import IMAGE, INITRD, ROOTFS, VMLINUX, VMLINUZ, UserCache, Workdir
from osbuilder.settings import TABLE, Settings
from osbuilder.steps import Step, register
from osbuilder.terminal import SafeFormatter, printable

log = logging.getLogger("osbuilder")


def cmd_rootfs(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import artifacts

    writable_workdir(s)
    done = artifacts.publish_rootfs(s, force=args.force)
    print(f"rootfs: {done.path} ({state(done)})")


def cmd_image(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import artifacts

    wd = writable_workdir(s)
    if not wd.rootfs.is_dir():
        raise UsageError(f"image: no rootfs at {wd.rootfs}; run `osbuilder rootfs` first")
    done = artifacts.publish_image(s, force=args.force)
    print(f"image: {wd.image} ({wd.image.stat().st_size // 2**20} MiB, {state(done)})")


def cmd_initrd(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import artifacts, initrd

    initrd.require_agent_init(s)  # before anything is written
    wd = writable_workdir(s)
    if not wd.rootfs.is_dir():
        raise UsageError(f"initrd: no rootfs at {wd.rootfs}; run `AGENT_INIT=yes osbuilder rootfs` first")
    done = artifacts.publish_initrd(s, force=args.force)
    print(f"initrd: {wd.initrd} ({wd.initrd.stat().st_size / 2**20:.1f} MiB, zstd-compressed newc cpio, /init is "
          f"the agent; {state(done)})")


def state(done: Any) -> str:
    return f"built, cache entry {done.key}" if done.fresh else f"up to date, cache entry {done.key}; -f rebuilds"


def cmd_kernel_src(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder.kernel.source import ensure_source

    wd = writable_workdir(s)
    tree = ensure_source(s)
    origin = tree.marker.get("spec", {}).get("location", s.kernel_source)
    state = "unpacked" if tree.fresh else "already there, nothing to do"
    print(f"kernel source: {wd.linux}: Linux {tree.version} from {origin} ({state})")


def cmd_kernel(s: Settings, args: argparse.Namespace) -> None:
    import json as json_mod

    from osbuilder import artifacts

    wd = writable_workdir(s)
    done = artifacts.publish_kernel(s, force=args.force)
    meta = json_mod.loads(wd.kernel.metadata.read_text())
    print(f"kernel: Linux {meta['kernel_version']} ({state(done)}; built in {meta['duration_seconds']:.0f}s, "
          f"ccache: {meta['ccache'] or 'off'})")
    for path in wd.kernel.all():
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
        raise UsageError("bisect-run: --config FILE (the guest .config to build every commit with) is required")
    tree = args.source_tree or Path.cwd()
    try:
        writable_workdir(s)
        verdict = bisect_run.bisect_run(s, args.kernel_config_file, tree)
    except UsageError:
        raise  # the step's usage_exit: 128
    except OsbuilderError as e:  # nothing said about the commit: skip it
        raise InfrastructureError(e.message, e.detail) from None
    print(bisect_run.describe(verdict, tree))
    if verdict.evidence and verdict.verdict != "good":
        print(verdict.evidence.rstrip()[-3000:])
    return bisect_run.EXIT_CODES[verdict.verdict]


def cmd_boot(s: Settings, args: argparse.Namespace) -> int:
    from osbuilder.vm import check

    image, kernel, profile, chosen = check.plan(s, kernel_path=args.boot_kernel_path)
    if args.check:
        record = check.run_boot_check(s, image, kernel, profile, chosen=chosen)
        print(json.dumps(record, indent=2) if args.json else check.format_timings(record))
        return 0
    return check.boot_interactive(s, image, kernel, profile, chosen)


def cmd_install_image(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import install

    install.install_image(s, dry_run=args.dry_run, force=args.force, source=args.artifact)


def cmd_install_initrd(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import install

    install.install_initrd(s, dry_run=args.dry_run, force=args.force, source=args.artifact)


def cmd_install_kernel(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import install

    install.install_kernel(s, dry_run=args.dry_run, force=args.force, source=args.artifact)


def cmd_uninstall(s: Settings, args: argparse.Namespace) -> None:
    from osbuilder import uninstall

    uninstall.uninstall(s, dry_run=args.dry_run)


def cmd_cache(s: Settings, args: argparse.Namespace) -> int:
    from osbuilder import cache_admin

    return cache_admin.command(s, args.action, as_json=args.json, remove=args.remove, older_than=args.older_than,
                               everything=args.all, dry_run=args.dry_run)


def cmd_check_deps(s: Settings, args: argparse.Namespace) -> int:
    if s.use_docker:  # the steps' tools are in the tools image: the host needs only the engine
        table = deps.engine_table(s.container_engine)
        gone = deps.engine_missing(s.container_engine)
        packages = sorted({t.package for t in gone})
        print(f"USE_DOCKER=yes: every step runs in the tools image; this host needs only CONTAINER_ENGINE "
              f"({s.container_engine})")
    else:
        try:
            chosen = [steps.get(name) for name in args.steps] if args.steps else list(steps.STEPS.values())
        except UsageError as e:
            raise UsageError(f"check-deps: {e.message}") from None
        table = {step.name: step.needs(s) for step in chosen if step.needs(s)}
        gone = [t for tools in table.values() for t in deps.missing(tools)]
        packages = sorted({t.package for t in gone})
        if not args.steps:  # everything: also the packages without a program to look for
            packages = sorted(set(packages) | set(steps.packages(s)))
    if args.install:
        installed = deps.install(packages) if gone or not args.steps else []
        if installed:
            print("installed: " + " ".join(installed))
        gone = [t for t in gone if deps.where(t) is None]
    if args.json:
        print(json.dumps({"steps": {name: [{"program": t.program, "package": t.package, "found": deps.where(t),
                                            "why": t.why} for t in tools] for name, tools in table.items()},
                          "missing": sorted({t.program for t in gone})}, indent=2))
    else:
        print(deps.report(table))
    if gone:
        names = ", ".join(sorted({t.program for t in gone}))
        print(f"osbuilder: missing: {names} (run `osbuilder check-deps --install`)", file=sys.stderr)
        return 1
    return 0


def cmd_help(s: Settings, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"version": __version__, "profile": str(s.profile) if s.profile else None,
                          "cache_dir": str(UserCache.of(s).root), "subcommands": list(steps.STEPS),
                          "settings": settings_mod.as_json(s)}, indent=2))
        return
    print(f"osbuilder {__version__} — settings (precedence: CLI flag > environment > YAML profile > default)\n")
    print(settings_mod.describe(s))
    print(f"\nYAML profile: {s.profile or f'none ({settings_mod.PROFILE_NAME} in the current directory, or --config)'}")
    user_cache = UserCache.of(s).root
    print(f"Per-user cache (CACHE_DIR): {user_cache} — the KVM verdict, Debian's boot kernel, ccache, "
          f"unpacked kernel sources and the rootfs base trees, shared by every WORKDIR; clear it with "
          f"`rm -rf {user_cache}`")
    from osbuilder import container

    print(container.describe(s))
    print("Cached rootfs (pytest fixtures): keyed on the archive's Release date, so it is rebuilt after a point "
          "release; `pytest --osbuilder-rebuild` forces a rebuild")
    print("Subcommands: " + ", ".join(steps.STEPS) + "  (osbuilder SUBCOMMAND --help)")


def cmd_completion(s: Settings, args: argparse.Namespace) -> None:
    """A bash completion script made from the parser: subcommands, and each one's flags and choices."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, sub in subparsers.choices.items():
        flags = sorted(f for a in sub._actions if a.help != argparse.SUPPRESS for f in a.option_strings
                       if f.startswith("--"))
        choices = sorted({c for a in sub._actions if not a.option_strings and a.choices for c in a.choices})
        cases.append(f"    {name}) words=\"{' '.join(choices + flags)}\" ;;")
    top = " ".join([*subparsers.choices, "--version", "--help"])
    print(COMPLETION.format(top=top, cases="\n".join(cases)) +
          ("" if args.shell == "bash" else "\n# zsh: autoload -U +X bashcompinit && bashcompinit first"))


COMPLETION = """# osbuilder completion for bash (osbuilder completion bash)
_osbuilder() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} cmd="" w words
  for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
    case "$w" in -*) ;; *) cmd="$w"; break ;; esac
  done
  case "$cmd" in
    "") words="{top}" ;;
{cases}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
  [ ${{#COMPREPLY[@]}} -eq 0 ] && COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -F _osbuilder osbuilder"""


# -- the records ---------------------------------------------------------------------------------

CC = Tool("cc", "gcc", "compiles osbuilder's agent")
UNSHARE = Tool("unshare", "util-linux", "runs the rootfs build in its own namespaces")
NEWUIDMAP = Tool("newuidmap", "uidmap", "maps subordinate ids when building as an ordinary user")
TAR = Tool("tar", "tar", "unpacks osbuilder's files over the copy of the base tree")
FIND = Tool("find", "findutils", "lists the tree, and with SOURCE_DATE_EPOCH the files modified after it")
IMAGE_TOOLS = (
    Tool("sfdisk", "fdisk", "writes and reads the partition table of the image file"),
    Tool("mke2fs", "e2fsprogs", "creates the filesystem from the rootfs directory"),
    Tool("e2fsck", "e2fsprogs", "checks the new filesystem"),
    Tool("debugfs", "e2fsprogs", "reads files inside the image without mounting it"),
    FIND,
)
INITRD_TOOLS = (
    Tool("cpio", "cpio", "writes the rootfs as the initrd's newc archive"),
    Tool("zstd", "zstd", "compresses the initrd (the kernel's RD_ZSTD)"),
    FIND,
    Tool("bash", "bash", "runs the list-sort-archive pipeline in the tree's namespace"),
)
SOURCE_TOOLS = (
    Tool("tar", "tar", "unpacks the kernel source"),
    Tool("xz", "xz-utils", "decompresses linux-source tarballs"),
    Tool("git", "git", "fetches kernel trees from git"),
)
KERNEL_TOOLS = (
    Tool("make", "make", "drives the kernel build"),
    Tool("gcc", "gcc", "compiles the kernel"),
    Tool("flex", "flex", "kernel build requirement"),
    Tool("bison", "bison", "kernel build requirement"),
    Tool("bc", "bc", "kernel build requirement"),
    Tool("perl", "perl", "kernel build requirement"),
    Tool("ld", "binutils", "links the kernel"),
    Tool("openssl", "openssl", "kernel build requirement (certificates)"),
    Tool("ccache", "ccache", "speeds up rebuilds (optional but installed)"),
)
KERNEL_PACKAGES = ("libelf-dev", "libssl-dev", "libc6-dev")  # headers the build includes
BOOT_TOOLS = (
    Tool(arch.X86_64.qemu, arch.X86_64.qemu_package, "boots x86_64 images, and the KVM probe guest"),
    Tool("qemu-img", "qemu-utils", "makes throw-away copy-on-write overlays"),
    Tool("ssh-keygen", "openssh-client", "makes the per-session SSH key"),
    Tool("as", "binutils", "assembles the KVM probe guest"),
    Tool("ld", "binutils", "links the KVM probe guest into a firmware image"),
    Tool("apt-get", "apt", "downloads Debian's boot kernel package, verified against the archive keyring"),
    Tool("dpkg-deb", "dpkg", "unpacks Debian's boot kernel package"),
    Tool("depmod", "kmod", "lists the dependencies of the boot kernel's modules (modules.dep)"),
    Tool("zstd", "zstd", "decompresses the boot kernel's .ko.zst modules (releases that ship them)"),
    Tool("cc", "gcc", "compiles the boot kernel initrd's init"),
)
BOOT_PACKAGES = ("libc6-dev", "debian-archive-keyring", "ca-certificates")  # static init; apt's keyring and TLS


def boot_tools(s: Settings) -> tuple[Tool, ...]:
    """BOOT_TOOLS, with ARCH's QEMU and the compiler of the Debian kernel initrd's init for ARCH."""
    guest = s.guest
    tools = (*BOOT_TOOLS, Tool(guest.qemu, guest.qemu_package, f"boots {guest.name} images for the boot checks"),
             *agent_compiler(s)[:1])
    return tuple({t.program: t for t in tools}.values())  # each program once, the first record of it


def boot_packages(s: Settings) -> tuple[str, ...]:
    guest = s.guest
    if guest.native:
        return BOOT_PACKAGES
    return (*BOOT_PACKAGES, guest.cross_packages[1], *([guest.firmware_package] if guest.firmware_package else []))


def kernel_boot_tools(s: Settings) -> tuple[Tool, ...]:
    return (*KERNEL_TOOLS, *boot_tools(s))


def kernel_tools(s: Settings) -> tuple[Tool, ...]:
    """What `kernel` runs; for another architecture than the host's, its cross compiler too (whose
    binutils come with it)."""
    guest = s.guest
    cross = () if guest.native else (
        Tool(guest.gcc(), guest.cross_packages[0], f"compiles the kernel for {guest.name}"),)
    return (*SOURCE_TOOLS, *KERNEL_TOOLS, *cross)


def rootfs_tools(s: Settings) -> tuple[Tool, ...]:
    from osbuilder.rootfs import distros

    return (*distros.get(s.distro).tools, *agent_compiler(s), UNSHARE, NEWUIDMAP, TAR)


def agent_compiler(s: Settings) -> tuple[Tool, ...]:
    """The compiler of the agent for ARCH; for another architecture than the host's, its cross compiler and
    the qemu-user that runs the tree's programs while it is built (rootfs/foreign.py)."""
    guest = s.guest
    if guest.native:
        return (CC,)
    return (Tool(guest.gcc(), guest.cross_packages[0], f"compiles osbuilder's agent for {guest.name}"),
            Tool(f"qemu-{guest.machine}-static", "qemu-user-static",
                 f"runs the {guest.name} tree's package scripts while it is built (binfmt_misc)"),
            Tool("arch-test", "arch-test", f"lets mmdebstrap check that this host can run {guest.name} programs"))


def rootfs_packages(s: Settings) -> tuple[str, ...]:
    from osbuilder.rootfs import distros

    guest = s.guest
    libc = "libc6-dev" if guest.native else guest.cross_packages[1]
    return (*distros.get(s.distro).packages, libc)  # the agent is linked statically


def force_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--force", action="store_true", help="build again even when nothing changed")


def boot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="run the boot checks and print the timings")
    p.add_argument("--kernel", dest="boot_kernel_path", type=Path, help="kernel image to boot")
    p.add_argument("--json", action="store_true", help="--check: print the boot record (boot.json) instead")


def install_arguments(what: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
        p.add_argument("--force", action="store_true", help="install without a passing boot record")
        p.add_argument(f"--{what}", dest="artifact", type=Path, metavar="PATH",
                       help=f"install this {what} (gated by WORKDIR's boot records) instead of WORKDIR's")
    return add


def dry_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="say what would be removed or restored, change nothing")


def check_deps_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("steps", nargs="*", default=[], metavar="STEP", help="only these steps (default: every subcommand)")
    p.add_argument("--install", action="store_true", help="apt-get install what is missing (root)")
    json_argument(p)


def json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def completion_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell (zsh reads bash completions with bashcompinit)")


def bisect_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="kernel_config_file", type=Path, metavar="FILE",
                   help="the guest .config every commit is built with (normalised by olddefconfig)")
    p.add_argument("--source-tree", type=Path, metavar="DIR",
                   help="the Linux git checkout (default: the current directory)")


def cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "verify", "prune"],
                   help="list: entries, sizes, what WORKDIR publishes, tools images; verify: hash every file of "
                        "every entry; prune: remove entries not used for DAYS and stale tools images")
    p.add_argument("--json", action="store_true", help="list: print JSON")
    p.add_argument("--remove", action="store_true", help="verify: remove the corrupt entries (the next use rebuilds)")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="prune: entries not used for DAYS days (default: 30)")
    p.add_argument("--all", action="store_true",
                   help="prune: every entry, whatever its age (never one WORKDIR publishes or another process uses)")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would be removed, remove nothing")


def add_kconfig_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "diff", "bisect"],
                   help="show: resolved fragments and option origins; diff GOOD BAD; bisect --good GOOD --bad BAD")
    p.add_argument("files", nargs="*", default=[], metavar="CONFIG", help="GOOD and BAD .config files (diff, bisect)")
    p.add_argument("--good", metavar="GOOD", help="the .config that boots (bisect)")
    p.add_argument("--bad", metavar="BAD", help="the .config that does not (bisect)")
    p.add_argument("--test", default="boot", metavar="boot|build|CMD",
                   help="bisect: boot (the boot check, default), build (compiles), or a command run with git "
                        "bisect's exit codes (0 good, 125 skip, else bad) and the kernel in $OSBUILDER_KERNEL")
    p.add_argument("--reset", action="store_true", help="bisect: forget the saved state and start over")
    p.add_argument("--json", action="store_true", help="diff, bisect: print JSON")


def logs(*names: str) -> steps.Locks:
    """Locks on these steps' log files (a step's log file is its lock, so no other file appears in
    WORKDIR): the first exclusively, the others shared."""
    return lambda wd, s, args: tuple(wd.log(name) for name in names)


for _step in (
    Step("rootfs", cmd_rootfs, f"build WORKDIR/{ROOTFS} with the distribution's packages and the agent",
         tools=rootfs_tools, packages=rootfs_packages, locks=logs("rootfs"), in_container=True, reads=("rootfs",),
         arguments=force_argument),
    # image and initrd also read the rootfs tree
    Step("image", cmd_image, f"make WORKDIR/{IMAGE} from WORKDIR/{ROOTFS}", tools=IMAGE_TOOLS,
         locks=logs("image", "rootfs"), in_container=True, reads=("rootfs", "image"), arguments=force_argument),
    Step("initrd", cmd_initrd, f"make WORKDIR/{INITRD} (the agent as /init) from an AGENT_INIT=yes WORKDIR/{ROOTFS}",
         tools=INITRD_TOOLS, in_container=True, reads=("rootfs",), arguments=force_argument,
         # without AGENT_INIT it is refused, nothing written
         locks=lambda wd, s, args: (wd.log("initrd"), wd.log("rootfs")) if s.agent_init else ()),
    Step("kernel-src", cmd_kernel_src, "get kernel source into WORKDIR/linux", tools=SOURCE_TOOLS,
         packages=("linux-source-6.1",), locks=logs("kernel"), in_container=True, reads=("kernel",)),
    Step("kernel", cmd_kernel, f"build WORKDIR/{VMLINUZ} and {VMLINUX}", tools=kernel_tools,
         packages=KERNEL_PACKAGES, locks=logs("kernel"), in_container=True, reads=("kernel",),
         arguments=force_argument),
    Step("kconfig", cmd_kconfig, "kernel config tools: `show` (fragments and where options come from), "
         "`diff GOOD BAD`, `bisect --good GOOD --bad BAD` (which option breaks the guest)",
         arguments=add_kconfig_arguments, tools=kernel_boot_tools, reads=("kernel", "boot", "rootfs"),
         locks=lambda wd, s, args: (wd.log("bisect"), wd.log("kernel")) if args.action == "bisect" else ()),
    Step("bisect-run", cmd_bisect_run, "for `git bisect run`: build the checked-out kernel commit with --config and "
         "boot-check it (exit 0 good, 1 bad, 125 skip)", arguments=bisect_run_arguments,
         tools=kernel_boot_tools, locks=logs("bisect-run"), profile_flag="--profile",
         usage_exit=128, reads=("kernel", "boot", "rootfs")),  # git bisect run: 128 stops, 2 would mark it bad
    # one boot check at a time per WORKDIR (they share the boot logs and records); an interactive boot locks nothing
    Step("boot", cmd_boot, "boot the image under QEMU (interactive console, or --check)", arguments=boot_arguments,
         tools=boot_tools, packages=boot_packages, in_container=True, console=lambda args: not args.check,
         reads=("boot", "rootfs"),
         locks=lambda wd, s, args: (wd.log("boot"),) if args.check else ()),
    Step("install-image", cmd_install_image, "install the boot-checked image into the runtime's directory",
         arguments=install_arguments("image"), reads=("install",)),
    Step("install-kernel", cmd_install_kernel, "install the boot-checked kernel into the runtime's directory",
         arguments=install_arguments("kernel"), reads=("install",)),
    Step("install-initrd", cmd_install_initrd, "install the boot-checked initrd into the runtime's directory",
         arguments=install_arguments("initrd"), reads=("install",)),
    Step("uninstall", cmd_uninstall, "take out what the install steps put in PREFIX and the runtime's "
         "configuration, as PREFIX's install record says", arguments=dry_run_argument, reads=("install",)),
    Step("cache", cmd_cache, "the artifact caches (WORKDIR's and CACHE_DIR's) and the tools images: `list`, "
         "`verify` (hash every file), `prune` (remove what was not used for --older-than DAYS)",
         arguments=cache_arguments, timed=False, reads=("rootfs",)),
    Step("check-deps", cmd_check_deps, "list the programs each step needs; --install installs them",
         arguments=check_deps_arguments, timed=False, reads=("rootfs",)),
    Step("help", cmd_help, "show every setting: value, where it came from, default, description",
         arguments=json_argument, timed=False, reads=tuple(sorted({s.group for s in TABLE}))),
    Step("completion", cmd_completion, "print a completion script for your shell: "
         "`source <(osbuilder completion bash)`", arguments=completion_arguments, timed=False),
):
    register(_step)


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


def guard_process(s: Settings, args: argparse.Namespace, step: Step) -> None:
    """Before a step runs: SIGTERM and SIGHUP unwind like Ctrl-C (every child killed, every guest
    powered off, temporaries removed), and the step's locks are held (procs.hold_lock: the first
    exclusively, the others shared), so a second run on the same WORKDIR waits for the first and
    says so. Children die with osbuilder even when it is SIGKILLed: procs.py's watchdog starts with
    the first of them."""
    procs.terminate_as_interrupt()
    wd = Workdir.of(s)
    locks = step.locks(wd, s, args)
    if locks:
        writable_workdir(s)
    for i, path in enumerate(locks):
        path.parent.mkdir(parents=True, exist_ok=True)
        procs.hold_lock(path, args.command, shared=i > 0)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also as environment variables and YAML keys)")
    for s in TABLE:
        group.add_argument(s.flag, dest=s.name, metavar=s.name, help=f"{s.help} [default: {s.default or 'empty'}]")


OWN_ACTIONS = "_osbuilder_own_actions"  # where the parser keeps, per subcommand, the actions of its own flags


GENERAL = "general"  # the settings every subcommand reads (WORKDIR, DEBUG, RUNTIME, ...)


def add_common_flags(p: argparse.ArgumentParser, step: Step | None) -> None:
    """The profile, -v/-q and every setting's flag, before the subcommand (`step` None) or after it. After it,
    a flag that is not given leaves the value given before it (argparse.SUPPRESS), and `--help` lists the
    settings the subcommand reads; the others are accepted and hidden."""
    after = step is not None
    keep: dict[str, Any] = {"default": argparse.SUPPRESS} if after else {}
    p.add_argument(step.profile_flag if step else "--config", dest="config", type=Path, metavar="FILE",
                   help="YAML profile (default: ./osbuilder.yaml)", **keep)
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="show every line the build tools print (DEBUG=yes)",
                      **keep)
    loud.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors", **keep)
    group = p.add_argument_group("settings (also as environment variables and YAML keys)")
    shown = {GENERAL, *step.reads} if step else {s.group for s in TABLE}
    for s in TABLE:
        text = f"{s.help} [default: {s.shown_default}]" if s.group in shown else argparse.SUPPRESS
        group.add_argument(s.flag, dest=s.name, metavar=s.name, help=text, **keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osbuilder", description="Build and boot-check guest OS artifacts.",
                                     epilog="Settings may come before or after the subcommand.")
    parser.add_argument("--version", action="version", version=f"osbuilder {__version__}")
    add_common_flags(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    own: dict[str, list[argparse.Action]] = {}
    for step in steps.STEPS.values():
        p = sub.add_parser(step.name, help=step.help, description=step.help)
        before = len(p._actions)
        step.arguments(p)
        own[step.name] = p._actions[before:]
        add_common_flags(p, step)
    parser.set_defaults(**{OWN_ACTIONS: own})
    return parser


def step_argv(args: argparse.Namespace) -> list[str]:
    """The subcommand's own arguments as given, ready to be passed on (to the same subcommand in the
    tools container): flags in their long form, paths made absolute; settings are not among them."""
    out: list[str] = []
    for action in getattr(args, OWN_ACTIONS).get(args.command, []):
        value = getattr(args, action.dest, None)
        if value in (None, False, []) or value == action.default and not action.option_strings:
            continue
        values = value if isinstance(value, list) else [value]
        words = [str(v.absolute()) if isinstance(v, Path) else str(v) for v in values]
        flag = max(action.option_strings, key=len, default=None)
        if flag is None:
            out += words
        elif isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        else:
            out += [item for word in words for item in (flag, word)]
    return out


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a value that is not UTF-8 is printed escaped, never a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    run.with_sbin_on_path()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    step = steps.get(args.command)
    cli_values = {s.name: getattr(args, s.name, None) for s in TABLE}
    if args.verbose:
        cli_values["DEBUG"] = "yes"
    try:
        s = settings_mod.load(cli_values, config=args.config)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter("%(message)s"))
        level = logging.WARNING if args.quiet else logging.DEBUG if s.debug else logging.INFO
        logging.basicConfig(level=level, handlers=[handler])
        announce(s)
        if s.use_docker and step.in_container:  # the step locks, logs and reports inside the tools image
            from osbuilder import container

            return container.run_step(s, args.command, step_argv(args), console=step.console(args))
        guard_process(s, args, step)
        deps.require(step.name, step.needs(s))
        started = time.monotonic()
        code = step.run(s, args)
        if step.timed:
            log.info("%s: done in %.1fs", args.command, time.monotonic() - started)
        return code or 0
    except UsageError as e:
        return report(e, step.usage_exit)
    except OsbuilderError as e:
        return report(e)
    except BrokenPipeError:  # `osbuilder help | head`: the reader is gone, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        log.debug("%s failed", args.command, exc_info=True)
        return report(errors.from_os_error(e, args.command))
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


def report(e: OsbuilderError, exit_code: int | None = None) -> int:
    """Print the error (one line, then the evidence), made inert for the terminal; return the exit code."""
    print(f"osbuilder: error: {printable(e.message, lines=False)}", file=sys.stderr)
    if e.detail:
        print(printable(e.detail.rstrip()), file=sys.stderr)
    return e.exit_code if exit_code is None else exit_code


if __name__ == "__main__":
    sys.exit(main())
