"""apt with a private configuration (osbuilder/apt.py): none of the host's configuration, sources or
state, every file it keeps in its own directory, and a mirror's credentials only in a 0600 auth.conf
while apt runs. (Downloading for real: tests/test_faults_settings.py and boot_tests.)"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from osbuilder import apt
from osbuilder.errors import OsbuilderError, UsageError

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def dump(config: Path | None) -> dict[str, str]:
    """The configuration apt itself reads with APT_CONFIG=`config` (None: the host's), by `apt-config dump`."""
    env = {k: v for k, v in os.environ.items() if k != "APT_CONFIG"}
    if config is not None:
        env["APT_CONFIG"] = str(config)
    out = subprocess.run(["apt-config", "dump"], env=env, capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        values[key.lower()] = value.rstrip(";").strip('"')
    return values


def test_apt_reads_nothing_of_the_hosts_configuration(tmp_path: Path) -> None:
    """Every directory apt uses is in the state directory, and nothing the host's apt.conf.d sets (a
    proxy, Check-Valid-Until, hooks...) holds for the private apt."""
    private = apt.PrivateApt(tmp_path / "state")
    private.configure("http://deb.debian.org/debian", "bookworm", KEYRING)
    conf = dump(private.config)
    assert conf["dir::etc"] == str(tmp_path / "state/etc") and conf["dir::etc::parts"] == "apt.conf.d"
    for key in ("dir::state::lists", "dir::state::status", "dir::cache", "dir::cache::archives"):
        assert conf[key].startswith(str(tmp_path / "state")), (key, conf[key])
    nothing = tmp_path / "nothing.conf"
    nothing.write_text(f'Dir::Etc "{tmp_path / "no-such-dir"}";\n')
    defaults = dump(nothing)
    ours = {line.split()[0].lower() for line in private.config.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("//")}
    host_only = {k: v for k, v in dump(None).items() if v and defaults.get(k) != v and k not in ours}
    assert host_only, "the host's apt configuration sets nothing: this test would prove nothing"
    assert not {k: v for k, v in host_only.items() if conf.get(k) == v}
    sources = (tmp_path / "state/etc/sources.list").read_text()
    assert sources == f"deb [signed-by={KEYRING}] http://deb.debian.org/debian bookworm main\n"


def test_credentials_reach_apt_only_while_it_runs(tmp_path: Path) -> None:
    private = apt.PrivateApt(tmp_path / "state")
    url = "https://us%40er:p%2Fw@m.example:8443/debian"
    private.configure(url, "trixie", KEYRING)
    assert "us@er" not in (private.etc / "sources.list").read_text()
    assert "https://m.example:8443/debian trixie main" in (private.etc / "sources.list").read_text()
    assert not private.auth.exists()
    with private.access(url):
        assert private.auth.read_text() == "machine https://m.example:8443/debian\nlogin us@er\npassword p/w\n"
        assert stat.S_IMODE(private.auth.stat().st_mode) == 0o600
    assert not private.auth.exists()
    with private.access("http://m.example/debian"):
        assert not private.auth.exists()
    with pytest.raises(UsageError, match="^REPO_URL: apt cannot use a user name or password containing white"):
        apt.auth_entry("http://user:p%20w@m.example/debian")


def test_a_state_directory_apt_cannot_name_is_refused(tmp_path: Path) -> None:
    private = apt.PrivateApt(tmp_path / 'say "cheese"')
    with pytest.raises(OsbuilderError, match="character apt's configuration cannot hold"):
        private.configure("http://deb.debian.org/debian", "bookworm", KEYRING)


def test_no_keyring_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OsbuilderError, match="^apt: no archive keyring at .*; run `osbuilder check-deps --install`$"):
        apt.PrivateApt(tmp_path / "state").configure("http://m/debian", "bookworm", tmp_path / "none.gpg")


def test_a_kernel_package_is_read_from_its_metapackage() -> None:
    fields = apt.parse_control("Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\n"
                               "Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)\nDescription: x\n more\n\n"
                               "Package: other\n")
    assert fields["Version"] == "6.1.176-1" and fields["Description"] == "x\nmore"
    assert apt.first_dependency(fields["Depends"]) == "linux-image-6.1.0-50-cloud-amd64"
    assert apt.first_dependency("linux-image-6.12.117+deb13-cloud-amd64 (= 6.12.117-1) | b, c") == \
        "linux-image-6.12.117+deb13-cloud-amd64"
