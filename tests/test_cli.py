"""The `osbuilder` command as a user meets it: exit codes, one-line errors, nothing half-written."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import make_tree, workdir_entries


def osb(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKDIR", "IMG_SIZE", "EXTRA_PKGS")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def first_error_line(result: subprocess.CompletedProcess) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("osbuilder: error:"))


def test_help_lists_every_setting_with_value_and_source(tmp_path: Path):
    (tmp_path / "osbuilder.yaml").write_text("fs_type: ext3\n")  # not the default: the value must come from here
    result = osb("help", env={"IMG_SIZE": "640"}, cwd=tmp_path)
    assert result.returncode == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line[:1].isupper()}
    assert rows["IMG_SIZE"][1:3] == ["640", "env"]
    assert rows["FS_TYPE"][1:3] == ["ext3", f"yaml:{tmp_path / 'osbuilder.yaml'}"]
    for name in ("WORKDIR", "DISTRO", "OS_VERSION", "REPO_URL", "EXTRA_PKGS", "BLOCK_SIZE",
                 "AGENT_SOURCE_BIN", "AGENT_INIT", "DEBUG", "SOURCE_DATE_EPOCH"):
        assert name in rows


def test_cli_flag_beats_environment(tmp_path: Path):
    result = osb("help", "--img-size", "1024", env={"IMG_SIZE": "640"}, cwd=tmp_path)
    row = next(line for line in result.stdout.splitlines() if line.startswith("IMG_SIZE"))
    assert row.split()[1:3] == ["1024", "cli"]


def test_image_without_rootfs_says_what_to_run(tmp_path: Path):
    result = osb("image", "--workdir", str(tmp_path / "wd"))
    assert result.returncode == 2
    assert first_error_line(result) == f"osbuilder: error: image: no rootfs at {tmp_path / 'wd' / 'rootfs'}; " \
                                       "run `osbuilder rootfs` first"
    assert not (tmp_path / "wd" / "container.img").exists()


@pytest.mark.parametrize("args,env,expected", [
    (["image", "--img-size", "zero"], {}, "IMG_SIZE: expected a whole number, got 'zero'"),
    (["image", "--img-size", "0"], {}, "IMG_SIZE: must be greater than zero, got 0"),
    (["rootfs"], {"EXTRA_PKGS": "curl;reboot"}, "EXTRA_PKGS: 'curl;reboot' is not a valid package name"),
    (["rootfs"], {"DISTRO": "gentoo"}, "DISTRO: unknown distribution 'gentoo'; available: debian"),
    (["rootfs", "--os-version", "bookwurm"], {}, "OS_VERSION: unknown debian release 'bookwurm'"),
])
def test_usage_errors_exit_2_naming_the_setting(tmp_path: Path, args, env, expected):
    result = osb(*args, "--workdir", str(tmp_path / "wd"), env=env)
    assert result.returncode == 2, result.stderr
    assert first_error_line(result).startswith("osbuilder: error: " + expected)


def test_malformed_profile(tmp_path: Path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("img_size: [1\n")
    result = osb("image", "--config", str(profile))
    assert result.returncode == 2
    assert first_error_line(result).startswith(f"osbuilder: error: {profile}: malformed YAML (line")


def test_unwritable_workdir(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = osb("rootfs", "--workdir", str(blocker / "wd"))
    assert result.returncode == 2
    assert first_error_line(result).startswith(f"osbuilder: error: WORKDIR: {blocker / 'wd'} is not writable")


def test_missing_tool_is_named(tmp_path: Path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = osb("image", "--workdir", str(tmp_path / "wd"), env={"PATH": str(empty)})
    assert result.returncode == 2
    # the sbin directories are always searched (Debian leaves them out of ordinary users' PATH): what is
    # missing is the one of /usr/bin the image step runs
    assert "image: missing program(s) find;" in first_error_line(result)
    deps = osb("check-deps", "image", env={"PATH": str(empty)})
    assert deps.returncode == 1 and "MISSING" in deps.stdout and "missing: find " in deps.stderr
    assert "/usr/sbin/mke2fs" in deps.stdout


def test_an_ordinary_users_path_without_sbin_still_finds_the_image_tools(tmp_path: Path):
    """Debian's PATH for ordinary users (a login over SSH, a rootless build) has no sbin directory, where
    mke2fs, sfdisk and debugfs are."""
    deps = osb("check-deps", "image", env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/games"})
    assert deps.returncode == 0, deps.stdout + deps.stderr


def test_check_deps_passes_here_for_image():
    result = osb("check-deps", "image")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "e2fsprogs" in result.stdout


@pytest.mark.build
def test_missing_package_from_the_real_archive(tmp_path: Path):
    wd = tmp_path / "wd"
    result = osb("rootfs", "--workdir", str(wd), "--extra-pkgs", "osbuilder-no-such-package")
    assert result.returncode == 2, result.stderr
    assert first_error_line(result) == \
        "osbuilder: error: EXTRA_PKGS: package(s) not found in bookworm, bookworm-updates, bookworm-security: " \
        "osbuilder-no-such-package"
    assert workdir_entries(wd) == ["logs"]


def test_unreachable_mirror(tmp_path: Path):
    wd = tmp_path / "wd"
    result = osb("rootfs", "--workdir", str(wd), "--repo-url", "http://127.0.0.1:9/debian")
    assert result.returncode == 125, result.stderr
    assert first_error_line(result) == "osbuilder: error: REPO_URL: mirror http://127.0.0.1:9/debian is unreachable"
    assert workdir_entries(wd) == ["logs"]


def test_unreachable_mirror_for_debians_boot_kernel(tmp_path: Path):
    """The first boot check fetches Debian's boot kernel from REPO_URL: a mirror that does not answer is the
    machine's fault (125), in one line, and leaves no cache entry behind."""
    image = tmp_path / "container.img"
    image.write_bytes(bytes(1 << 20))
    cache = tmp_path / "cache"
    result = osb("boot", "--check", "--workdir", str(tmp_path / "wd"), "--repo-url", "http://127.0.0.1:9/debian",
                 env={"BOOT_IMAGE": str(image), "BOOT_KERNEL": "debian", "BOOT_PROFILE": "virtio-blk",
                      "CACHE_DIR": str(cache), "ACCEL": "tcg"})
    assert result.returncode == 125, result.stderr
    assert first_error_line(result) == "osbuilder: error: REPO_URL: mirror http://127.0.0.1:9/debian is unreachable"
    assert "Could not connect to 127.0.0.1:9" in result.stderr  # the evidence follows the line
    assert [p.name for p in (cache / "artifacts/debian-kernel").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.build
def test_interrupted_rootfs_keeps_the_old_one_and_runs_again(tmp_path: Path):
    wd = tmp_path / "wd"
    (wd / "rootfs").mkdir(parents=True)
    (wd / "rootfs" / "earlier-build").write_text("still here")
    # a CACHE_DIR of its own: with the base tree of this rootfs already there, mmdebstrap would not run
    cmd = [sys.executable, "-m", "osbuilder", "rootfs", "--workdir", str(wd), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:  # wait until mmdebstrap is at work
        if "rootfs: + mmdebstrap" in line:
            break
    time.sleep(4)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert (wd / "rootfs" / "earlier-build").read_text() == "still here"
    again = osb("rootfs", "--workdir", str(wd), "--cache-dir", str(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr
    assert (wd / "rootfs" / "usr/lib/systemd/systemd").is_file()
    assert not (wd / "rootfs" / "earlier-build").exists()
    assert [p.name for p in (tmp_path / "cache/artifacts/rootfs-base").iterdir() if p.name.startswith(".")] == []
    assert workdir_entries(wd) == ["cache/rootfs/<entry>", "logs", "published", "rootfs"]


def test_image_says_what_it_made_and_then_that_it_is_up_to_date(tmp_path: Path):
    """The line names WORKDIR's container.img and its size; a second run with nothing changed says "up to
    date" and names the same cache entry."""
    wd = tmp_path / "wd"
    make_tree(wd / "rootfs")
    first = osb("image", "--workdir", str(wd))
    assert first.returncode == 0, first.stderr
    size = (wd / "container.img").stat().st_size // 2**20
    assert size > 0
    key = first.stdout.split("cache entry ")[1].split(")")[0]
    assert first.stdout.strip() == f"image: {wd / 'container.img'} ({size} MiB, built, cache entry {key})"
    again = osb("image", "--workdir", str(wd))
    assert again.stdout.strip() == \
        f"image: {wd / 'container.img'} ({size} MiB, up to date, cache entry {key}; -f rebuilds)", again.stderr
