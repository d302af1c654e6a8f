"""The rootfs step without the network: package set, agent choice, staging, and error translation."""

import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from osbuilder import settings as S
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.rootfs.build import AgentChoice, manifest, pack_overlay, packages, stage_overlay
from osbuilder.rootfs.debian import classify_failure, hook_word, mirror_access
from osbuilder.rootfs.distro import Suite
from osbuilder.rootfs.distros import get


def settings(tmp_path: Path, **env) -> S.Settings:
    """Settings for a rootfs; a stand-in agent speaks osbuilder's protocol (auto cannot tell from a script)."""
    return S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "AGENT_PROTOCOL": "osbuilder", **env}, cwd=tmp_path)


def test_default_packages_follow_the_original_list(tmp_path: Path):
    pkgs = packages(settings(tmp_path, EXTRA_PKGS="vim systemd"))
    for wanted in ("systemd", "udev", "coreutils", "iptables", "kmod", "iproute2", "openssh-server", "vim"):
        assert wanted in pkgs
    assert pkgs.count("systemd") == 1


def test_agent_as_init_drops_systemd(tmp_path: Path):
    pkgs = packages(settings(tmp_path, AGENT_INIT="yes"))
    assert "systemd" not in pkgs and "systemd-sysv" not in pkgs and "coreutils" in pkgs


def test_unknown_release_is_refused_before_any_download():
    with pytest.raises(UsageError, match="OS_VERSION: unknown debian release 'bookwurm'"):
        get("debian").check_release("bookwurm")


def test_agent_source_bin_must_exist_and_be_executable(tmp_path: Path):
    with pytest.raises(UsageError, match="AGENT_SOURCE_BIN: .* is not a file"):
        AgentChoice.from_settings(settings(tmp_path, AGENT_SOURCE_BIN=str(tmp_path / "nope")))
    agent = tmp_path / "kata-agent"
    agent.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="is not executable"):
        AgentChoice.from_settings(settings(tmp_path, AGENT_SOURCE_BIN=str(agent)))
    agent.chmod(0o755)
    choice = AgentChoice.from_settings(settings(tmp_path, AGENT_SOURCE_BIN=str(agent)))
    assert (choice.name, choice.service) == ("kata-agent", "kata-agent.service")
    named = AgentChoice.from_settings(settings(tmp_path, AGENT_SOURCE_BIN=str(agent), AGENT_SERVICE="my.service"))
    assert named.service == "my.service"


def test_staged_overlay_for_a_user_agent(tmp_path: Path):
    agent = tmp_path / "kata-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    s = settings(tmp_path, AGENT_SOURCE_BIN=str(agent), EXTRA_PKGS="vim", SOURCE_DATE_EPOCH="1700000000")
    overlay = tmp_path / "overlay"
    stage_overlay(s, AgentChoice.from_settings(s), packages(s), overlay, tmp_path / "log")
    assert os.access(overlay / "usr/bin/kata-agent", os.X_OK)
    unit = (overlay / "usr/lib/systemd/system/kata-agent.service").read_text()
    assert 'ExecStart="/usr/bin/kata-agent"' in unit
    link = overlay / "etc/systemd/system/multi-user.target.wants/kata-agent.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/kata-agent.service"
    # osbuilder's own units are enabled too: every staged unit that asks for multi-user.target, and
    # the two the guest needs (the slirp network and the power button)
    wanted = {u.name for u in (overlay / "usr/lib/systemd/system").glob("*.service")
              if "WantedBy=multi-user.target" in u.read_text()}
    assert {"osbuilder-slirp-network.service", "osbuilder-power-button.service", "kata-agent.service"} <= wanted
    enabled = {p.name: os.readlink(p) for p in link.parent.iterdir()}
    assert enabled == {unit: f"/usr/lib/systemd/system/{unit}" for unit in wanted}
    meta = yaml.safe_load((overlay / "var/lib/osbuilder/osbuilder.yaml").read_text())
    assert meta["created"] == "2023-11-14T22:13:20Z"
    assert meta["packages"]["extra"] == ["vim"] and meta["agent"]["name"] == "kata-agent"
    assert not list(overlay.rglob("ssh_host_*"))


def test_staged_overlay_with_agent_as_init(tmp_path: Path):
    s = settings(tmp_path, AGENT_INIT="yes")
    overlay = tmp_path / "overlay"
    stage_overlay(s, AgentChoice.from_settings(s), packages(s), overlay, tmp_path / "log")
    assert os.readlink(overlay / "usr/sbin/init") == "../bin/osbuilder-agent"
    assert not (overlay / "etc/systemd/system/multi-user.target.wants").exists()  # no systemd to start units
    assert (overlay / "usr/bin/osbuilder-agent").stat().st_size > 10_000  # the real, compiled agent


def test_packed_overlay_belongs_to_root_whatever_the_umask(tmp_path: Path):
    s = settings(tmp_path, SOURCE_DATE_EPOCH="1700000000")
    overlay = tmp_path / "overlay"
    old_umask = os.umask(0o077)  # staged files come out 0600 and directories 0700 ...
    try:
        stage_overlay(s, AgentChoice.from_settings(s), packages(s), overlay, tmp_path / "log")
    finally:
        os.umask(old_umask)
    pack_overlay(overlay, tmp_path / "overlay.tar", 1700000000)
    with tarfile.open(tmp_path / "overlay.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and "usr/bin/osbuilder-agent" in names and "." not in names
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "root", "root", 1700000000)}
    modes = {m.name: m.mode for m in members}
    assert modes["etc"] == modes["var/lib/osbuilder"] == 0o755  # ... the tarball does not care
    assert modes["usr/bin/osbuilder-agent"] == 0o755 and modes["var/lib/osbuilder/osbuilder.yaml"] == 0o644
    link = next(m for m in members if m.name.endswith("multi-user.target.wants/osbuilder-agent.service"))
    assert link.issym() and link.linkname == "/usr/lib/systemd/system/osbuilder-agent.service"


def test_manifest_changes_with_every_input(tmp_path: Path):
    """The cache key (not only the inputs) follows every input of the rootfs, and only those: the
    same settings give the same key, so a second session reuses the rootfs."""
    agent = tmp_path / "kata-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    base = manifest(settings(tmp_path)).key
    assert manifest(settings(tmp_path)).key == base
    for env in ({"IMG_SIZE": "512"}, {"BLOCK_SIZE": "2048"}, {"DEBUG": "yes"}, {"BOOT_TIMEOUT": "300"},
                {"WORKDIR": str(tmp_path / "elsewhere")}):  # image, boot and bookkeeping settings
        assert manifest(settings(tmp_path, **env)).key == base, env
    keys = {base}
    for env in ({"EXTRA_PKGS": "vim"}, {"OS_VERSION": "trixie"}, {"AGENT_INIT": "yes"},
                {"REPO_URL": "http://mirror.example/debian"}, {"SOURCE_DATE_EPOCH": "1700000000"},
                {"AGENT_SOURCE_BIN": str(agent)}, {"AGENT_SOURCE_BIN": str(agent), "AGENT_SERVICE": "my.service"}):
        key = manifest(settings(tmp_path, **env)).key
        assert key not in keys, env
        keys.add(key)
    agent.write_text("#!/bin/sh\nexit 1\n")  # the same agent path, another binary
    assert manifest(settings(tmp_path, AGENT_SOURCE_BIN=str(agent))).key not in keys


def test_the_base_tree_is_keyed_by_what_shapes_it_and_not_by_the_agent(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """Rootfs that differ only in osbuilder's files share a base tree; one that differs in anything the
    distribution's packages make does not, nor does one of another builder (root, an ordinary user's ids)."""
    from osbuilder.rootfs import base

    agent = tmp_path / "kata-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    shared = base.manifest(settings(tmp_path)).key
    rootfs_keys = {manifest(settings(tmp_path)).key}
    for env in ({"AGENT_SOURCE_BIN": str(agent)}, {"AGENT_SOURCE_BIN": str(agent), "AGENT_SERVICE": "my.service"},
                {"AGENT_PROTOCOL": "kata1"}):
        assert base.manifest(settings(tmp_path, **env)).key == shared, env
        rootfs_keys.add(manifest(settings(tmp_path, **env)).key)
    assert len(rootfs_keys) == 4  # four rootfs, one base
    for env in ({"RUNTIME": "clear-containers"}, {"WORKDIR": str(tmp_path / "other")},
                {"CACHE_DIR": str(tmp_path / "cache")}):
        assert base.manifest(settings(tmp_path, **env)).key == shared, env
    keys = {shared}
    for env in ({"EXTRA_PKGS": "vim"}, {"OS_VERSION": "trixie"}, {"AGENT_INIT": "yes"}, {"SECURITY_UPDATES": "no"},
                {"REPO_URL": "http://mirror.example/debian"}, {"SOURCE_DATE_EPOCH": "1700000000"}):
        key = base.manifest(settings(tmp_path, **env)).key
        assert key not in keys, env
        keys.add(key)
    secret = base.manifest(settings(tmp_path, REPO_URL="http://user:s3cret@mirror.example/debian"))
    assert "s3cret" not in str(secret.inputs)
    assert base.manifest(settings(tmp_path)).inputs["owners"] == "root" or os.geteuid() != 0
    monkeypatch.setattr("osbuilder.userns.rootless", lambda: True)  # the same inputs, built by an ordinary user
    assert base.manifest(settings(tmp_path)).key not in keys


def failure(detail: str) -> OsbuilderError:
    return OsbuilderError("rootfs: `mmdebstrap` failed (exit 1)", detail)


BOOKWORM = [Suite("http://deb.debian.org/debian", "bookworm"),
            Suite("http://deb.debian.org/debian", "bookworm-updates"),
            Suite("http://deb.debian.org/debian-security", "bookworm-security")]


def test_missing_package_is_blamed_on_extra_pkgs():
    e = classify_failure(failure("E: Unable to locate package no-such-pkg\nE: apt-get failed"),
                         BOOKWORM, ["systemd", "no-such-pkg"], ["no-such-pkg"])
    assert isinstance(e, UsageError)
    assert e.message == "EXTRA_PKGS: package(s) not found in bookworm, bookworm-updates, bookworm-security: no-such-pkg"


def test_a_missing_default_package_is_blamed_on_the_release():
    e = classify_failure(failure("E: Package 'iptables' has no installation candidate"), BOOKWORM[:1],
                         ["systemd", "iptables", "vim"], ["vim"])
    assert isinstance(e, UsageError) and e.message.startswith("OS_VERSION: bookworm has no package iptables")


def test_a_mirror_without_the_updates_suites_names_security_updates():
    e = classify_failure(failure("E: The repository 'http://deb.debian.org/debian-security bookworm-security Release' "
                                 "does not have a Release file."), BOOKWORM, ["systemd"], [])
    assert isinstance(e, UsageError) and e.message.startswith(
        "SECURITY_UPDATES: http://deb.debian.org/debian-security has no suite bookworm-security")
    assert "SECURITY_UPDATES=no" in e.message


def test_unreachable_mirror_is_an_infrastructure_failure():
    e = classify_failure(failure("Err:1 http://127.0.0.1:9/debian bookworm InRelease\n"
                                 "  Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)"),
                         [Suite("http://127.0.0.1:9/debian", "bookworm")], [], [])
    assert isinstance(e, InfrastructureError) and e.message.startswith("REPO_URL: mirror http://127.0.0.1:9/debian")


@pytest.mark.parametrize("path", ["/w/work dir's $HOME \\ `x`/o.tar", '/w/"q"/o.tar', "/w/tab\there/é.tar",
                                  "/w/new\nline/o.tar"])
def test_hook_words_survive_mmdebstraps_shellwords(path: str):
    """mmdebstrap splits a special hook (`tar-in PATH /`) with Perl's Text::ParseWords::shellwords:
    the overlay's path comes out as one word, whatever WORKDIR contains."""
    assert shellwords(f"tar-in {hook_word(path)} /") == ["tar-in", path, "/"]


def shellwords(hook: str) -> list[str]:
    """A special hook split as mmdebstrap splits it."""
    script = 'use Text::ParseWords; local $/; print join("\\0", shellwords(<STDIN>))'
    out = subprocess.run(["perl", "-e", script], input=hook.encode(), capture_output=True, check=True).stdout
    return out.decode().split("\0")


def test_mirror_credentials_reach_only_a_private_auth_file(tmp_path: Path):
    """The URL mmdebstrap gets has no credentials; they go to a 0600 file that the setup hooks copy
    to the tree's apt auth.conf, 0600 too, which the customize hook removes (hooks run as mmdebstrap
    runs them)."""
    scratch = tmp_path / "work dir's" / "auth"
    scratch.parent.mkdir()
    with pytest.raises(UsageError, match="^REPO_URL: apt cannot use a user name or password containing white"):
        with mirror_access(["https://user:p%20w@m.example/debian"], scratch):
            pass
    with mirror_access(["https://us%40er:pw@m.example:8443/debian", "https://us%40er:pw@m.example:8443/debian-security",
                        "http://other.example/debian"], scratch) as (urls, hooks):
        assert urls == ["https://m.example:8443/debian", "https://m.example:8443/debian-security",
                        "http://other.example/debian"]
        assert scratch.read_text() == ("machine https://m.example:8443/debian\nlogin us@er\npassword pw\n"
                                       "machine https://m.example:8443/debian-security\nlogin us@er\npassword pw\n")
        assert stat.S_IMODE(scratch.stat().st_mode) == 0o600
        assert not any("pw" in hook for hook in hooks)
        tree = tmp_path / "tree"
        (tree / "etc/apt").mkdir(parents=True)
        create, upload, customize = (hook.partition("=")[2] for hook in hooks)
        subprocess.run(["sh", "-c", create, "exec", str(tree)], check=True)
        assert shellwords(upload) == ["upload", str(scratch), "/etc/apt/auth.conf"]
        with scratch.open("rb") as source:  # upload: mmdebstrap reads the file, `cat > "$1"` writes it
            subprocess.run(["sh", "-c", 'cat > "$1"', "exec", str(tree / "etc/apt/auth.conf")], stdin=source,
                           check=True)
        assert (tree / "etc/apt/auth.conf").read_text() == scratch.read_text()
        assert stat.S_IMODE((tree / "etc/apt/auth.conf").stat().st_mode) == 0o600
        subprocess.run(["sh", "-c", customize, "exec", str(tree)], check=True)
        assert not (tree / "etc/apt/auth.conf").exists()
    assert not scratch.exists()
    with mirror_access(["http://m.example/debian"], scratch) as plain:
        assert plain == (["http://m.example/debian"], []) and not scratch.exists()


def test_a_chroot_without_dev_and_proc_fails_the_build(tmp_path: Path):
    """mmdebstrap goes on when it cannot mount the chroot's /dev and /proc, and the package scripts then
    leave /dev/null a regular file and create nothing with systemd-tmpfiles: the customize hook (run while
    the mounts stand) and the check of the finished tree stop such a build (exit 125)."""
    from osbuilder.rootfs.debian import MOUNTS_HOOK, check_dev

    tree = tmp_path / "tree"
    (tree / "dev").mkdir(parents=True)
    (tree / "dev/null").write_text("")  # what `> /dev/null` leaves without the device
    hook = subprocess.run(["sh", "-c", MOUNTS_HOOK, "exec", str(tree)], capture_output=True, text=True)
    assert hook.returncode == 1 and "the chroot had no /dev/null device or no /proc" in hook.stderr
    e = classify_failure(failure(hook.stderr), BOOKWORM, ["systemd"], [])
    assert isinstance(e, InfrastructureError) and e.message.startswith("rootfs: mmdebstrap could not mount /dev")
    with pytest.raises(OsbuilderError, match=r"^rootfs: mmdebstrap left /dev/null in the tree"):
        check_dev(tree)
    (tree / "dev/null").unlink()
    check_dev(tree)  # an empty /dev is what mmdebstrap leaves
    if os.geteuid() == 0:  # the device, as mmdebstrap bind-mounts it, and a /proc
        os.mknod(tree / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (tree / "proc/self").mkdir(parents=True)
        (tree / "proc/self/mounts").write_text("")
        assert subprocess.run(["sh", "-c", MOUNTS_HOOK, "exec", str(tree)]).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="gives directories to another user: needs root (an ordinary user's "
                                              "trees are done in the namespace, see test_rootless.py)")
def test_apts_download_directories_are_apts_wherever_the_tree_was_built(tmp_path: Path):
    """mmdebstrap leaves them root's where _apt could not reach the tree (root's 0700 home, where the base tree
    is cached): they are given to _apt, as where it could; a tree without an _apt user is left alone."""
    from osbuilder.rootfs.debian import APT_PARTIAL, give_apt_its_partial_dirs

    tree = tmp_path / "tree"
    for d in APT_PARTIAL:
        (tree / d).mkdir(parents=True, mode=0o755)
    (tree / "etc").mkdir()
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n")
    give_apt_its_partial_dirs(tree, tmp_path / "log")
    for d in APT_PARTIAL:
        st = (tree / d).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (42, 0, 0o700), d
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    for d in APT_PARTIAL:
        os.chown(tree / d, 0, 0)
    give_apt_its_partial_dirs(tree, tmp_path / "log")
    assert {(tree / d).stat().st_uid for d in APT_PARTIAL} == {0}
