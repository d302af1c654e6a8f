"""The CLI behaves as command-line users expect: flags anywhere, per-subcommand help, -v/-q, --json,
shell completion, one-line usage errors, and Kata osbuilder's own variables understood or named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from osbuilder import __version__, cli
from osbuilder.settings import TABLE


def osb(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if k not in {s.name for s in TABLE}}
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, cwd=cwd)


def help_row(text: str, name: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.startswith(name + " "))


def test_settings_flags_go_before_or_after_the_subcommand(tmp_path: Path) -> None:
    before = osb("--workdir", str(tmp_path / "a"), "help")
    after = osb("help", "--workdir", str(tmp_path / "b"))
    assert before.returncode == after.returncode == 0, before.stderr
    assert help_row(before.stdout, "WORKDIR")[1:3] == [str(tmp_path / "a"), "cli"]
    assert help_row(after.stdout, "WORKDIR")[1:3] == [str(tmp_path / "b"), "cli"]
    both = osb("--workdir", str(tmp_path / "a"), "help", "--workdir", str(tmp_path / "b"))
    assert help_row(both.stdout, "WORKDIR")[1] == str(tmp_path / "b")  # the later one wins


def test_a_subcommands_help_lists_the_settings_it_reads() -> None:
    rootfs, boot = osb("rootfs", "--help").stdout, osb("boot", "--help").stdout
    assert "--extra-pkgs EXTRA_PKGS" in rootfs and "--boot-timeout BOOT_TIMEOUT" not in rootfs
    assert "--boot-timeout BOOT_TIMEOUT" in boot and "--kernel-fragments" not in boot.split("usage:")[1].split(
        "options:")[1]
    assert "--workdir WORKDIR" in rootfs and "--workdir WORKDIR" in boot  # the general ones everywhere
    args = cli.build_parser().parse_args(["rootfs", "--boot-timeout", "5"])  # accepted all the same
    assert args.BOOT_TIMEOUT == "5"


def test_help_shows_one_default_per_setting() -> None:
    out = osb("help").stdout
    for s in TABLE:
        assert "(default:" not in s.help, s.name
    cache = help_row(out, "CACHE_DIR")
    assert cache[3:5] == ["''", "($XDG_CACHE_HOME/osbuilder,"]


def test_verbose_quiet_and_version() -> None:
    assert help_row(osb("help", "-v").stdout, "DEBUG")[1:3] == ["yes", "cli"]
    assert help_row(osb("--verbose", "help").stdout, "DEBUG")[1:3] == ["yes", "cli"]
    assert osb("help", "-v", "-q").returncode == 2  # one or the other
    version = osb("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"osbuilder {__version__}"


def test_json_for_machines() -> None:
    settings = json.loads(osb("help", "--json").stdout)
    assert [s["name"] for s in settings["settings"]] == [s.name for s in TABLE]
    assert settings["version"] == __version__ and "completion" in settings["subcommands"]
    deps = osb("check-deps", "image", "--json")
    report = json.loads(deps.stdout)
    assert list(report["steps"]) == ["image"] and report["missing"] == []
    assert {"program": "sfdisk", "package": "fdisk"}.items() <= report["steps"]["image"][0].items()


def test_bash_completion_completes_subcommands_and_their_flags() -> None:
    script = osb("completion", "bash")
    assert script.returncode == 0
    assert subprocess.run(["bash", "-n"], input=script.stdout, text=True).returncode == 0

    def complete(*words: str) -> list[str]:
        words_text = " ".join(words)
        probe = (f"{script.stdout}\nCOMP_WORDS=(osbuilder {words_text}); COMP_CWORD={len(words)}; _osbuilder; "
                 'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.split()

    assert complete("ro") == ["rootfs"]
    assert "--extra-pkgs" in complete("rootfs", "--extra") and "--boot-timeout" not in complete("rootfs", "--boot")
    assert complete("kconfig", "bis") == ["bisect"]


@pytest.mark.parametrize("args, code, line", [
    (["check-deps", "foo"], 2, "osbuilder: error: check-deps: no subcommand 'foo'; known: rootfs"),
    (["bisect-run"], 128, "osbuilder: error: bisect-run: --config FILE (the guest .config to build every commit "
                          "with) is required"),
    (["help", "--os-version", "jammy"], 2, "osbuilder: error: OS_VERSION: unknown debian release 'jammy'"),
    (["help", "--kernel-source", "/no/linux"], 2, "osbuilder: error: KERNEL_SOURCE: /no/linux: no such file"),
])
def test_usage_errors_are_one_line(args: list[str], code: int, line: str) -> None:
    result = osb(*args)
    assert result.returncode == code, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
    assert "done in" not in result.stderr and "Traceback" not in result.stderr


def test_kconfig_without_an_action_asks_for_the_action_only() -> None:
    result = osb("kconfig")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "osbuilder kconfig: error: the following arguments are required: action"


def test_kata_osbuilders_variables_are_understood_or_named(tmp_path: Path) -> None:
    result = osb("help", env={"USE_PODMAN": "true", "ROOTFS_DIR": "/srv/rootfs", "KERNEL_MODULES_DIR": "/m"},
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert help_row(result.stdout, "USE_DOCKER")[1:3] == ["yes", "env:USE_PODMAN"]
    assert help_row(result.stdout, "CONTAINER_ENGINE")[1:3] == ["podman", "env:USE_PODMAN"]
    notices = [line for line in result.stderr.splitlines() if line.startswith("osbuilder: notice:")]
    assert notices == [
        "osbuilder: notice: Kata osbuilder's ROOTFS_DIR, KERNEL_MODULES_DIR are ignored here (ROOTFS_DIR: the "
        "rootfs is WORKDIR/rootfs; KERNEL_MODULES_DIR: osbuilder's kernel has no modules)"]
    explicit = osb("help", env={"USE_PODMAN": "true", "USE_DOCKER": "no"}, cwd=tmp_path)
    assert help_row(explicit.stdout, "USE_DOCKER")[1:3] == ["no", "env"]  # osbuilder's own name wins


def test_a_closed_pipe_is_not_an_error() -> None:
    result = subprocess.run(f"{sys.executable} -m osbuilder help | head -1", shell=True, capture_output=True,
                            text=True, timeout=60)
    assert "error" not in result.stderr and result.stdout.startswith("osbuilder ")
