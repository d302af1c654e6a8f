"""The settings table: precedence, parsing, profiles and their errors."""

from pathlib import Path

import pytest
import yaml

from osbuilder import settings as S
from osbuilder.errors import UsageError


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path: Path):
    profile = tmp_path / "osbuilder.yaml"
    profile.write_text("img_size: 512\nos_version: trixie\nextra_pkgs: [vim, curl]\n")
    s = S.load({"IMG_SIZE": "1024"}, env={"IMG_SIZE": "768", "OS_VERSION": "sid"}, config=profile)
    assert (s.img_size, s.sources["IMG_SIZE"]) == (1024, "cli")
    assert (s.os_version, s.sources["OS_VERSION"]) == ("sid", "env")
    assert s.extra_pkgs == ("vim", "curl") and s.sources["EXTRA_PKGS"].startswith("yaml:")
    assert (s.block_size, s.sources["BLOCK_SIZE"]) == (4096, "default")


def test_profile_in_current_directory_is_found(tmp_path: Path):
    (tmp_path / "osbuilder.yaml").write_text("WORKDIR: /srv/build\n")
    s = S.load({}, env={}, cwd=tmp_path)
    assert s.workdir == Path("/srv/build") and s.profile == tmp_path / "osbuilder.yaml"


def test_defaults_match_the_makefile_era():
    s = S.load({}, env={}, cwd=Path("/srv"))
    assert s.workdir == Path("/srv/workdir")
    assert (s.distro, s.os_version, s.fs_type, s.img_size) == ("debian", "bookworm", "ext4", None)
    assert s.agent_init is False and s.agent_source_bin is None


@pytest.mark.parametrize("name,value,words", [
    ("IMG_SIZE", "big", "IMG_SIZE: expected a whole number"),
    ("IMG_SIZE", "0", "IMG_SIZE: must be greater than zero"),
    ("IMG_SIZE", "-5", "IMG_SIZE: must be greater than zero"),
    ("BLOCK_SIZE", "512", "BLOCK_SIZE: expected 1024, 2048 or 4096"),
    ("EXTRA_PKGS", "vim; rm -rf /", "EXTRA_PKGS: 'vim;' is not a valid package name"),
    ("EXTRA_PKGS", "$(reboot)", "EXTRA_PKGS: '$(reboot)' is not a valid package name"),
    ("AGENT_INIT", "maybe", "AGENT_INIT: expected yes or no"),
    ("DISTRO", "fedora", "DISTRO: unknown distribution 'fedora'"),
    ("ACCEL", "hvf", "ACCEL: expected one of auto, kvm, tcg"),
    ("SOURCE_DATE_EPOCH", "yesterday", "SOURCE_DATE_EPOCH: expected seconds"),
    ("SOURCE_DATE_EPOCH", "15032385536", "SOURCE_DATE_EPOCH: must be at most 15032385535"),
    ("IMG_SIZE", "1048577", "IMG_SIZE: must be at most 1048576 (1 TiB)"),
    ("VM_MEMORY", "1048577", "VM_MEMORY: must be at most 1048576 (1 TiB)"),
    ("VM_CPUS", "289", "VM_CPUS: must be at most 288"),
    ("BOOT_TIMEOUT", "86401", "BOOT_TIMEOUT: must be at most 86400"),
    ("IMG_SIZE", "9" * 5000, "IMG_SIZE: expected a whole number, got '99999"),  # beyond int()'s digit limit
    ("OS_VERSION", "-bookworm", "OS_VERSION: '-bookworm' is not a release name"),
    ("OS_VERSION", "bookworm main", "OS_VERSION: 'bookworm main' is not a release name"),
    ("OS_VERSION", "jammy", "OS_VERSION: unknown debian release 'jammy'"),  # Ubuntu's, not Debian's
    ("KERNEL_SOURCE", "/no/such/linux.tar.xz", "KERNEL_SOURCE: /no/such/linux.tar.xz: no such file or directory"),
    ("REPO_URL", "deb http://deb.debian.org/debian bookworm main", "REPO_URL: expected a plain http://"),
    ("ARCH", "mips", "ARCH: unknown architecture 'mips'; known: x86_64, arm64"),
    ("ARCH", "s390x", "ARCH: s390x: not supported yet"),
    ("ARCH", "ppc64el", "ARCH: ppc64le: not supported yet"),
    ("REPO_URL", "http://u:pw@h/debian [trusted=yes]", "REPO_URL: expected a plain http://, https:// or "
                                                       "file:// URL of a mirror (no spaces, no [options]), "
                                                       "got 'http://***@h/debian [trusted=yes]'"),
])
def test_bad_values_name_the_setting(name, value, words):
    with pytest.raises(UsageError) as e:
        S.load({}, env={name: value}, cwd=Path("/"))
    assert str(e.value.message).startswith(words)
    assert "\n" not in e.value.message


def test_malformed_yaml_names_file_and_line(tmp_path: Path):
    profile = tmp_path / "p.yaml"
    profile.write_text("img_size: 512\nextra_pkgs: [vim\n")
    with pytest.raises(UsageError) as e:
        S.load({}, env={}, config=profile)
    assert str(profile) in e.value.message and "malformed YAML" in e.value.message


def test_unknown_yaml_key_is_an_error(tmp_path: Path):
    profile = tmp_path / "p.yaml"
    profile.write_text("img_sise: 512\n")
    with pytest.raises(UsageError, match="unknown key 'img_sise'"):
        S.load({}, env={}, config=profile)


def test_yaml_must_be_a_mapping(tmp_path: Path):
    profile = tmp_path / "p.yaml"
    profile.write_text("- a\n- b\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        S.load({}, env={}, config=profile)


# For every setting, a value its parser accepts that differs from its default (DISTRO has one plugin),
# so a flag, variable or YAML key that does not reach its setting shows in `osbuilder help`.
SAMPLES = {
    "AGENT_PROTOCOL": "kata1",
    "WORKDIR": "/srv/wd", "DEBUG": "yes", "SOURCE_DATE_EPOCH": "7", "USE_DOCKER": "yes",
    "CACHE_DIR": "/srv/cache", "DISTRO": "debian", "OS_VERSION": "trixie",
    "REPO_URL": "http://mirror.example/debian", "EXTRA_PKGS": "vim", "AGENT_SOURCE_BIN": "/srv/agent",
    "AGENT_SERVICE": "my.service", "AGENT_INIT": "yes", "IMG_SIZE": "640", "BLOCK_SIZE": "2048",
    "FS_TYPE": "ext3", "ACCEL": "tcg", "VM_MEMORY": "2048", "VM_CPUS": "2", "BOOT_KERNEL": "debian",
    "BOOT_TIMEOUT": "300", "BOOT_IMAGE": "/srv/x.img", "BOOT_APPEND": "quiet",
    "KERNEL_SOURCE": "https://git.example/linux.git#v6.1", "KERNEL_FRAGMENTS": "/srv/a.config",
    "KERNEL_CONFIG": "/srv/config",
    "CCACHE_REMOTE_STORAGE": "http://10.0.0.1:8080/ccache",
    "RUNTIME": "clear-containers", "PREFIX": "/opt/kata", "RUNTIME_CONFIG": "/etc/kata/configuration.toml",
    "DESTDIR": "/tmp/stage", "DROP_IN": "no", "DAX": "no", "BOOT_PROFILE": "virtio-blk",
    "CONTAINER_ENGINE": "podman", "TOOLS_BASE_IMAGE": "localhost/base:12", "SECURITY_UPDATES": "no",
    "ARCH": "arm64",
}


def help_rows(main_args: list[str], capsys) -> dict[str, str]:
    """`osbuilder help` run in-process: the table's lines by setting name."""
    from osbuilder import cli

    assert cli.main(main_args) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[:1]}


def test_every_setting_has_flag_yaml_key_and_help(tmp_path: Path, monkeypatch, capsys):
    """Each setting reaches the program by its documented flag (--img-size), environment variable
    (IMG_SIZE) and YAML key (img_size), and `osbuilder help` describes it."""
    assert set(SAMPLES) == {s.name for s in S.TABLE}, "a new setting needs a sample value here"
    flags = [s.flag for s in S.TABLE]
    assert len(set(flags)) == len(flags)
    for name in SAMPLES:
        monkeypatch.delenv(name, raising=False)
    argv = ["help"]
    for name, value in SAMPLES.items():
        argv += ["--" + name.lower().replace("_", "-"), value]
    by_flag = help_rows(argv, capsys)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({name.lower(): value for name, value in SAMPLES.items()}))
    by_yaml = help_rows(["help", "--config", str(profile)], capsys)
    for name, value in SAMPLES.items():
        monkeypatch.setenv(name, value)
    by_env = help_rows(["help"], capsys)
    for s in S.TABLE:
        value = SAMPLES[s.name]
        assert by_flag[s.name].split()[1:3] == [value, "cli"], by_flag[s.name]
        assert by_yaml[s.name].split()[1:3] == [value, f"yaml:{profile}"], by_yaml[s.name]
        assert by_env[s.name].split()[1:3] == [value, "env"], by_env[s.name]
        assert s.help and by_flag[s.name].endswith("  " + s.help)
        s.read(s.default, {})  # every default parses


def test_describe_shows_value_source_and_default():
    s = S.load({}, env={"IMG_SIZE": "640"}, cwd=Path("/"))
    row = next(line for line in S.describe(s).splitlines() if line.startswith("IMG_SIZE"))
    assert row.split()[:4] == ["IMG_SIZE", "640", "env", "auto"]


def test_relative_workdir_is_pinned_where_it_was_given(tmp_path: Path):
    s = S.load({"WORKDIR": "wd"}, env={}, cwd=tmp_path)
    assert s.workdir == tmp_path / "wd" and s.raw["WORKDIR"] == "wd"
    assert s.with_values(WORKDIR="/abs").workdir == Path("/abs")


def test_settings_fields_mirror_the_table_with_their_parsed_types(tmp_path: Path):
    """Every table row is a typed field of the frozen Settings (and nothing else is a setting)."""
    import dataclasses
    import types
    import typing

    fields = {f.name for f in dataclasses.fields(S.Settings)} - {"raw", "sources", "profile", "notices"}
    assert fields == {s.attr for s in S.TABLE}
    hints = typing.get_type_hints(S.Settings)
    s = S.load({}, env={"IMG_SIZE": "512", "EXTRA_PKGS": "vim curl", "SOURCE_DATE_EPOCH": "7",
                        "CACHE_DIR": "cache"}, cwd=tmp_path)
    for row in S.TABLE:
        value = getattr(s, row.attr)
        hint = hints[row.attr]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        assert isinstance(value, tuple(typing.get_origin(a) or a for a in allowed)), (row.name, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.img_size = 1  # type: ignore[misc]
    assert s.cache_dir == tmp_path / "cache"


def test_with_values_reparses_and_keeps_the_rest(tmp_path: Path):
    s = S.load({}, env={"OS_VERSION": "trixie"}, cwd=tmp_path)
    t = s.with_values(IMG_SIZE="256", AGENT_INIT="yes")
    assert (t.img_size, t.agent_init, t.os_version) == (256, True, "trixie")
    assert (t.sources["IMG_SIZE"], t.sources["OS_VERSION"]) == ("override", "env")
    assert s.img_size is None  # the original is untouched
    with pytest.raises(UsageError, match="IMG_SIZE: expected a whole number"):
        s.with_values(IMG_SIZE="huge")


def test_largest_accepted_values():
    s = S.load({}, env={"SOURCE_DATE_EPOCH": str(S.MAX_EPOCH), "IMG_SIZE": "1048576", "VM_MEMORY": "1048576",
                        "VM_CPUS": "288", "BOOT_TIMEOUT": "86400"}, cwd=Path("/"))
    assert (s.source_date_epoch, s.img_size, s.vm_memory, s.vm_cpus, s.boot_timeout) == \
        (15032385535, 1048576, 1048576, 288, 86400)


def test_an_ambient_variable_that_does_not_parse_falls_back_to_the_profile(tmp_path: Path):
    (tmp_path / "osbuilder.yaml").write_text("debug: yes\n")
    s = S.load({}, env={"DEBUG": "express:*"}, cwd=tmp_path)
    assert (s.debug, s.sources["DEBUG"]) == (True, f"yaml:{tmp_path / 'osbuilder.yaml'}")
    assert s.notices == ("DEBUG='express:*' in the environment is ignored (expected yes or no, got 'express:*'); "
                         "use --debug or debug: in osbuilder.yaml",)
    assert [row.name for row in S.TABLE if row.ambient] == ["DEBUG"]  # any other bad variable is an error


def test_without_credentials():
    assert S.without_credentials("https://u:p%40ss@mirror.example:8443/debian?x#y") == \
        "https://mirror.example:8443/debian?x#y"
    assert S.without_credentials("http://[::1]:3142/debian") == "http://[::1]:3142/debian"


def test_vm_cpus_auto_shares_the_host_among_concurrent_guests(tmp_path: Path, monkeypatch):
    """VM_CPUS=auto: every core for a lone boot, cores / workers under pytest-xdist, never below one."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert S.host_vcpus({}) == 8
    assert S.host_vcpus({"PYTEST_XDIST_WORKER_COUNT": "2"}) == 4
    assert S.host_vcpus({"PYTEST_XDIST_WORKER_COUNT": "16"}) == 1
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "8")  # this process's environment is not the one given
    assert S.load({}, env={}, cwd=tmp_path).vm_cpus == 8
    assert S.load({}, env={"PYTEST_XDIST_WORKER_COUNT": "4"}, cwd=tmp_path).vm_cpus == 2
    assert S.load({"VM_CPUS": "3"}, env={}, cwd=tmp_path).vm_cpus == 3
    assert S.load({}, cwd=tmp_path).vm_cpus == 1  # load() without env reads this process's
    assert S.load({}, env={}, cwd=tmp_path).with_values(VM_CPUS="auto").vm_cpus == 1  # as if given here


def test_ccache_remote_storage_takes_ccaches_urls_and_refuses_the_rest(tmp_path):
    ok = "http://10.0.0.1:8080/ccache|connect-timeout=500"
    assert S.load({"WORKDIR": str(tmp_path), "CCACHE_REMOTE_STORAGE": ok}, env={}).ccache_remote_storage == ok
    with pytest.raises(UsageError, match=r"^CCACHE_REMOTE_STORAGE: expected ccache's http://"):
        S.load({"WORKDIR": str(tmp_path), "CCACHE_REMOTE_STORAGE": "ftp://x/y"}, env={})
