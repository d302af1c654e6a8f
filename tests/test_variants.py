"""Variants own their facts: a runtime, an attachment, a subcommand and a distribution are each one record,
registered in one place, and everything else asks the record.

Each test registers a throwaway variant for its own duration and shows that the CLI, `help`, `check-deps`,
the install step and the boot options pick it up with no other change. `test_no_variant_table_is_spelled_
outside_its_home` fails if code elsewhere lists or compares the names of one kind of variant.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from vmstubs import load_settings, opt_value

from osbuilder import arch, cli, runtimes, steps
from osbuilder.deps import Tool
from osbuilder.image import wants_dax
from osbuilder.rootfs import distros
from osbuilder.rootfs.distro import Distro
from osbuilder.steps import Step
from osbuilder.vm import attachments, check, profiles, qemu, records
from osbuilder.vm.attachments import Attachment
from osbuilder.vm.options import Accel, BootKernel

PACKAGE = Path(cli.__file__).resolve().parent
ARTIFACT_KINDS = {"rootfs", "image", "initrd", "kernel"}
TOY_TOML = '[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\nimage = "/old/image.img"\n'


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(["help", *argv]) == 0
    return capsys.readouterr().out


# -- a runtime ---------------------------------------------------------------------------------

TOY_RUNTIME = runtimes.Runtime(name="toyvisor", description="a runtime made up for this test", prefix="/opt/toy",
                               configs=("/etc/toy/configuration.toml",), attachment="virtio-blk", dax=False,
                               agent_protocols=("osbuilder",))


def test_a_new_runtime_is_one_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with runtimes.registered(TOY_RUNTIME):
        assert "toyvisor" in help_text(capsys, "--runtime", "toyvisor")
        s = load_settings(tmp_path, RUNTIME="toyvisor")
        assert not wants_dax(s)  # DAX=auto follows the record
        assert profiles.for_settings(s).attach is attachments.VIRTIO_BLK  # BOOT_PROFILE=auto: its attachment
        # install-image: its prefix, its configuration file, gated on a pass in its attachment
        image, kernel = s.workdir / "container.img", tmp_path / "vmlinuz"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"an image that passed as a virtio-blk disk")
        kernel.write_bytes(b"k")
        config = tmp_path / "dest/etc/toy/configuration.toml"
        config.parent.mkdir(parents=True)
        config.write_text(TOY_TOML)
        argv = ["install-image", "--workdir", str(s.workdir), "--runtime", "toyvisor",
                "--destdir", str(tmp_path / "dest")]
        assert cli.main(argv) == 2  # no boot record yet
        assert "attached as the toyvisor runtime attaches it (virtio-blk)" in capsys.readouterr().err
        records.write_records(s.workdir, image, kernel, passed=True, kernel={}, timings={},
                              extra={"attachment": "virtio-blk", "profile": "systemd"})
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert (tmp_path / "dest/opt/toy/container.img").read_bytes() == image.read_bytes()
        assert tomllib.loads(config.read_text())["hypervisor"]["qemu"]["image"] == "/opt/toy/container.img"
    assert cli.main(["help", "--runtime", "toyvisor"]) == 2  # gone with its record


# -- an attachment -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ToyScsi(Attachment):
    """The image as a SCSI disk, read-only, straight from the file."""

    def devices(self, image: Path | None, paths: qemu.VmPaths | None) -> list[str]:
        return ["-device", "virtio-scsi-pci,id=scsi0",
                "-drive", f"if=none,id=toy,file={qemu.qemu_escape(str(image))},format=raw,readonly=on",
                "-device", "scsi-hd,drive=toy"]


TOY_SCSI = ToyScsi(name="toy-scsi", summary="the image as a read-only SCSI disk",
                   root_params="root=/dev/sda1 rootfstype=ext4 ro", root_awaited="/dev/sda1 mounted",
                   root_pattern=r"EXT4-fs \(sda1\): mounted filesystem")


def test_a_new_attachment_is_one_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with attachments.registered(TOY_SCSI):
        assert "toy-scsi" in help_text(capsys, "--boot-profile", "toy-scsi")
        s = load_settings(tmp_path, BOOT_PROFILE="toy-scsi")  # booting osbuilder's agent (AGENT_PROTOCOL)
        image = tmp_path / "container.img"
        image.write_bytes(b"")
        opts = check.guest_options(s, image=image, kernel=BootKernel(tmp_path / "k", None, "path"),
                                   accel=Accel("tcg", "test", False), name="toy")
        assert opts.profile.attach is TOY_SCSI and opts.profile.name == "systemd"
        assert opts.cmdline.startswith("root=/dev/sda1 rootfstype=ext4 ro ")
        cmd = qemu.build_command(opts.spec(), qemu.VmPaths(tmp_path))
        assert "scsi-hd,drive=toy" in opt_value(cmd, "-device") and "-m" in cmd
    with pytest.raises(Exception, match="BOOT_PROFILE: no boot profile 'toy-scsi'"):
        load_settings(tmp_path, BOOT_PROFILE="toy-scsi")


# -- a subcommand ------------------------------------------------------------------------------

def test_a_new_subcommand_is_one_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[tuple[str, list[str]]] = []

    def hello(s, args) -> int:
        ran.append((str(s.workdir), args.names))
        return 3

    step = Step("hello", hello, "greets", arguments=lambda p: p.add_argument("names", nargs="*"),
                tools=(Tool("true", "coreutils", "says nothing, successfully"),),
                locks=lambda wd, s, args: (wd.log("hello"),), in_container=True)
    with steps.registered(step):
        assert "hello" in help_text(capsys).splitlines()[-1]
        assert cli.main(["hello", "world", "--workdir", str(tmp_path / "wd")]) == 3
        assert ran == [(str(tmp_path / "wd"), ["world"])] and (tmp_path / "wd/logs/hello.log").exists()
        assert cli.main(["check-deps", "hello"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("hello:\n  true ") and "coreutils" in out
        assert "hello" in steps.in_container()
        # with USE_DOCKER=yes it goes to the tools container, not to its handler
        code = cli.main(["hello", "--use-docker", "yes", "--container-engine", "docker", "--workdir", str(tmp_path)])
        assert code in (2, 125) and "CONTAINER_ENGINE" in capsys.readouterr().err and len(ran) == 1
    missing = Step("needs-nothing-here", hello, "needs a program nobody has",
                   tools=(Tool("osbuilder-no-such-program", "nowhere", "is missing"),))
    with steps.registered(missing):
        assert cli.main(["needs-nothing-here"]) == 2
        assert "needs-nothing-here: missing program(s) osbuilder-no-such-program" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["hello"])  # gone with its record: argparse's usage error


# -- a distribution ----------------------------------------------------------------------------

class ToyDistro(Distro):
    """A distribution whose 'archive' is a handful of files written by Python; it breaks the image policy
    on purpose (host keys, documentation), to show the policy is not the plugin's to keep."""

    name = "toydistro"
    releases = ("one",)
    default_release = "one"
    default_mirror = "http://toy.invalid/"
    tools = (Tool("tar", "tar", "stands in for the toy's installer"),)
    architectures = {"x86_64": "toy64", "aarch64": "toyarm"}

    def default_packages(self, agent_init: bool) -> list[str]:
        return ["toy-base"]

    def build(self, suites, packages, dest, *, logfile, verbose, source_date_epoch, architecture) -> None:
        for rel, text in (("etc/ssh/ssh_host_ed25519_key", "a secret every image would share"),
                          ("usr/share/doc/toy-base/README", "docs"), ("usr/share/doc/toy-base/copyright", "MIT"),
                          ("usr/share/man/man1/toy.1", "a page"), ("usr/sbin/init", "#!/bin/sh\n")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_text(text)

    def archive_state(self, mirror: str, release: str) -> str:
        return "toy archive, state 1"

    def package_files(self, tree: Path, package: str) -> list[str]:
        return ["/usr/sbin/init"] if package == "toy-base" else []


def test_a_new_distribution_is_one_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with distros.registered(ToyDistro()):
        assert "toydistro" in help_text(capsys, "--distro", "toydistro")  # OS_VERSION: its default release
        assert cli.main(["check-deps", "rootfs", "--distro", "toydistro"]) == 0
        out = capsys.readouterr().out
        assert "  tar " in out and "mmdebstrap" not in out
        wd = tmp_path / "wd"
        assert cli.main(["rootfs", "--distro", "toydistro", "--workdir", str(wd), "--cache-dir",
                         str(tmp_path / "cache")]) == 0, capsys.readouterr().err
        tree = wd / "rootfs"
        assert (tree / "usr/bin/osbuilder-agent").is_file()  # osbuilder's own files, over the plugin's tree
        assert (tmp_path / "cache/artifacts/rootfs-base").is_dir()  # which is cached for other agents
        meta = (tree / "var/lib/osbuilder/osbuilder.yaml").read_text()
        assert "architecture: toy64" in meta and "name: toydistro" in meta
        # the shared policy ran after the plugin: no host keys, no docs, the licence kept
        assert not list((tree / "etc/ssh").glob("ssh_host_*"))
        assert not (tree / "usr/share/doc/toy-base/README").exists()
        assert not [p for p in (tree / "usr/share/man").rglob("*") if not p.is_dir()]
        assert (tree / "usr/share/doc/toy-base/copyright").read_text() == "MIT"
    assert cli.main(["help", "--distro", "toydistro"]) == 2


def test_a_plugin_cannot_drop_the_image_policy(tmp_path: Path) -> None:
    """Whatever a plugin leaves, `policy.apply` removes and `policy.verify` checks (on the toy tree)."""
    from osbuilder.rootfs import policy

    tree = tmp_path / "tree"
    ToyDistro().build([], [], tree, logfile=tmp_path / "log", verbose=False, source_date_epoch=None,
                      architecture="toy64")
    assert sorted(policy.violations(tree)) == ["/etc/ssh/ssh_host_ed25519_key", "/usr/share/doc/toy-base/README",
                                               "/usr/share/man/man1/toy.1"]
    with pytest.raises(Exception, match="breaks osbuilder's image policy: /etc/ssh/ssh_host_ed25519_key"):
        policy.verify(tree)
    policy.apply(tree, tmp_path / "log")
    assert policy.violations(tree) == []


# -- nothing else lists them -------------------------------------------------------------------

@contextmanager
def every_variant() -> Iterator[dict[str, tuple[set[str], set[str], tuple[str, ...], int]]]:
    """axis -> (registered names, home modules, words that name the axis in an expression, how many names
    make a table). The subcommands named after an artifact (`rootfs`, `image`, `initrd`, `kernel`) are left
    out: tables of artifact kinds, boot-record roles and configuration keys use the same words."""
    yield {
        "runtime": (set(runtimes.RUNTIMES), {"osbuilder/runtimes.py"}, ("runtime",), 2),
        "attachment": (set(attachments.ATTACHMENTS), {"osbuilder/vm/attachments.py"}, ("attach", "profile"), 2),
        "subcommand": (set(steps.STEPS) - ARTIFACT_KINDS, {"osbuilder/cli.py", "osbuilder/steps.py"},
                       ("command", "step"), 2),
        "distribution": (set(distros.DISTROS), {"osbuilder/rootfs/distros.py", "osbuilder/rootfs/debian.py"},
                         ("distro",), 2),
        # elf.py's tables are of ELF machines, debian.py's of Debian's names for them: facts of the format
        # and of the distribution, whichever architectures osbuilder builds for
        "architecture": (set(arch.ARCHES), {"osbuilder/arch.py", "osbuilder/elf.py", "osbuilder/rootfs/debian.py"},
                         ("arch", "guest"), 2),
    }


def strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for element in node.elts for s in strings(element)]
    return []


def spelled_tables(source: str, names: set[str], words: tuple[str, ...], least: int = 2) -> list[tuple[int, str]]:
    """Where `source` lists `least` or more of `names` (a tuple, list, set or dict's keys), or compares an
    expression that names the axis (`words`) with one of them."""
    found = []
    for node in ast.walk(ast.parse(source)):
        listed: list[str] = []
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            listed = strings(node)
        elif isinstance(node, ast.Dict):
            listed = [s for key in node.keys if key is not None for s in strings(key)]
        if len(set(listed) & names) >= least:
            found.append((node.lineno, f"lists {sorted(set(listed) & names)}"))
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            spelled = {s for side in sides for s in strings(side)} & names
            about = " ".join(ast.unparse(side) for side in sides if not strings(side)).lower()
            if spelled and any(word in about for word in words):
                found.append((node.lineno, f"compares {ast.unparse(node)}"))
    return found


def test_no_variant_table_is_spelled_outside_its_home() -> None:
    offenders = []
    with every_variant() as axes:
        for path in sorted(PACKAGE.rglob("*.py")):
            rel = str(path.relative_to(PACKAGE.parent))
            source = path.read_text()
            for axis, (names, homes, words, least) in axes.items():
                if rel not in homes:
                    found = spelled_tables(source, names, words, least)
                    offenders += [f"{rel}:{line}: {axis}s: {what}" for line, what in found]
    assert not offenders, "variant names spelled outside their homes:\n" + "\n".join(offenders)


def test_the_table_finder_finds_what_it_looks_for() -> None:
    """The check above can fail: a table of runtimes and a comparison of a command are found."""
    planted = ('DAX = {"kata": True, "clear-containers": True}\n'
               'def f(args):\n    return args.command == "boot"\n')
    assert [line for line, _ in spelled_tables(planted, {"kata", "clear-containers"}, ("runtime",))] == [1]
    assert [line for line, _ in spelled_tables(planted, {"boot", "image"}, ("command",))] == [3]
    assert spelled_tables('if phase == "kernel": pass\n', {"kernel", "boot"}, ("command",)) == []
