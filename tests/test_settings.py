"""The settings table: precedence, parsing, profiles and their errors."""

from pathlib import Path

import pytest

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


def test_every_setting_has_flag_yaml_key_and_help():
    flags = [s.flag for s in S.TABLE]
    assert len(set(flags)) == len(flags)
    for s in S.TABLE:
        assert s.help and s.flag == "--" + s.name.lower().replace("_", "-") and s.yaml_key == s.name.lower()
        s.parse(s.name, s.default)  # every default parses


def test_describe_shows_value_source_and_default():
    s = S.load({}, env={"IMG_SIZE": "640"}, cwd=Path("/"))
    row = next(line for line in S.describe(s).splitlines() if line.startswith("IMG_SIZE"))
    assert row.split()[:4] == ["IMG_SIZE", "640", "env", "auto"]


def test_relative_workdir_is_pinned_where_it_was_given(tmp_path: Path):
    s = S.load({"WORKDIR": "wd"}, env={}, cwd=tmp_path)
    assert s.workdir == tmp_path / "wd" and s.raw["WORKDIR"] == "wd"
    assert s.with_values(WORKDIR="/abs").workdir == Path("/abs")
