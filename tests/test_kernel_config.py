"""Unit tests for kernel config fragments, Kconfig reading and verification, and kernel-src (no build)."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from osbuilder import settings as settings_mod
from osbuilder.errors import UsageError
from osbuilder.kernel import commands, config, source
from osbuilder.kernel.config import (
    DEFAULT_FRAGMENTS,
    OPTIONAL_FRAGMENTS,
    KconfigIndex,
    check_names,
    evaluate,
    merge,
    parse_expr,
    parse_fragment,
    read_config,
    resolve_fragments,
    unmet,
    verify,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_settings(tmp_path: Path, **cli: str):
    values = {"WORKDIR": str(tmp_path / "work"), **cli}
    return settings_mod.load(values, env={}, cwd=tmp_path)


# --- fragments -------------------------------------------------------------------------------


def test_parse_fragment_all_value_kinds(tmp_path):
    frag = write(tmp_path / "a.config", "\n".join([
        "# a comment",
        "CONFIG_A=y",
        "CONFIG_B=m",
        'CONFIG_C="hello world"',
        "# CONFIG_D is not set",
        "CONFIG_E=0x10",
        "CONFIG_F=-3",
        "",
    ]))
    got = {r.name: (r.value, r.line) for r in parse_fragment(frag)}
    assert got == {"A": ("y", 2), "B": ("m", 3), "C": ('"hello world"', 4), "D": ("n", 5),
                   "E": ("0x10", 6), "F": ("-3", 7)}


@pytest.mark.parametrize("line", ["CONFIG_A", "A=y", "CONFIG_A=yes please", 'CONFIG_A="open'])
def test_parse_fragment_rejects_bad_lines(tmp_path, line):
    frag = write(tmp_path / "bad.config", f"CONFIG_OK=y\n{line}\n")
    with pytest.raises(UsageError) as e:
        parse_fragment(frag)
    assert e.value.message.startswith("KERNEL_FRAGMENTS: ")
    assert f"{frag}:2" in e.value.message


def test_merge_later_fragment_wins_and_history_is_kept(tmp_path):
    one = write(tmp_path / "one.config", "CONFIG_A=y\nCONFIG_B=y\n")
    two = write(tmp_path / "two.config", "# CONFIG_A is not set\nCONFIG_C=y\nCONFIG_B=y\n")
    merged = merge([one, two])
    assert merged.requests["A"].value == "n"
    assert merged.requests["A"].where == "two.config:1"
    assert [r.where for r in merged.overridden["A"]] == ["one.config:1"]
    assert merged.requests["B"].where == "two.config:3"
    assert "B" not in merged.overridden  # same value twice is not an override
    assert list(merged.requests) == ["A", "B", "C"]


def test_read_config_and_honoured(tmp_path):
    cfg = write(tmp_path / ".config", "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S=\"x\"\n")
    values = read_config(cfg)
    assert values == {"A": "y", "B": "n", "S": '"x"'}
    assert config.honoured("y", "y") and not config.honoured("y", "m")
    assert config.honoured("n", None) and config.honoured("n", "n") and not config.honoured("n", "y")
    assert config.honoured('"x"', values["S"])


def test_default_fragments_cover_configs_dir():
    files = {p.stem for p in config.CONFIGS_DIR.glob("*.config")}
    assert files == set(DEFAULT_FRAGMENTS) | set(OPTIONAL_FRAGMENTS)
    # Opt-in only, named explicitly: every other file in configs/ is in the default set.
    assert set(OPTIONAL_FRAGMENTS) == {"debug", "xfs"}
    assert not set(OPTIONAL_FRAGMENTS) & set(DEFAULT_FRAGMENTS)
    assert DEFAULT_FRAGMENTS[-1] == "lean"  # it must come after the fragments it trims


def test_every_fragment_starts_with_a_header_comment():
    for path in config.CONFIGS_DIR.glob("*.config"):
        assert path.read_text().startswith("# "), path.name


def test_xfs_is_opt_in_by_name(tmp_path):
    assert "XFS_FS" not in merge(resolve_fragments(load_settings(tmp_path))).requests
    files = resolve_fragments(load_settings(tmp_path, KERNEL_FRAGMENTS="xfs"))
    assert files[-1] == config.CONFIGS_DIR / "xfs.config"
    assert merge(files).requests["XFS_FS"].value == "y"


def test_default_fragments_build_in_what_the_guest_needs(tmp_path):
    merged = merge(resolve_fragments(load_settings(tmp_path)))
    for name in ("VIRTIO_CONSOLE", "VIRTIO_BLK", "BLK_DEV", "VIRTIO_PCI", "VIRTIO_NET", "VIRTIO_VSOCKETS",
                 "EXT4_FS", "SERIAL_8250_CONSOLE", "DEVTMPFS", "CGROUPS", "PVH", "64BIT",
                 "INPUT_EVDEV", "ACPI_BUTTON", "SYSCTL", "POSIX_TIMERS", "ACPI_NFIT", "VIRTIO_FS", "9P_FS"):
        assert merged.requests[name].value == "y", name
    assert merged.requests["MODULES"].value == "n"
    for name in ("VT", "IO_URING"):  # serial console only; see lean.config
        assert merged.requests[name].value == "n", name
    assert "IKCONFIG" not in merged.requests


def test_kernel_fragments_adds_files_and_builtin_names(tmp_path):
    extra = write(tmp_path / "mine.config", "CONFIG_VIRTIO_BLK=y\n")
    s = load_settings(tmp_path, KERNEL_FRAGMENTS=f"debug {extra}")
    files = resolve_fragments(s)
    assert files[-2].name == "debug.config" and files[-1] == extra.resolve()
    assert len(files) == len(DEFAULT_FRAGMENTS) + 2


def test_missing_fragment_names_kernel_fragments(tmp_path):
    with pytest.raises(UsageError) as e:
        resolve_fragments(load_settings(tmp_path, KERNEL_FRAGMENTS=str(tmp_path / "nope.config")))
    assert e.value.message == f"KERNEL_FRAGMENTS: {tmp_path / 'nope.config'}: no such file"


def test_kconfig_show_lists_fragments_and_origins(tmp_path):
    extra = write(tmp_path / "mine.config", "# CONFIG_VIRTIO_BLK is not set\n")
    s = load_settings(tmp_path, KERNEL_FRAGMENTS=str(extra))
    write(s.workdir / "kernel-build" / ".config", "CONFIG_VIRTIO_CONSOLE=y\n")
    text = commands.show(s)
    assert "base.config" in text and str(extra.resolve()) in text
    line = next(x for x in text.splitlines() if "CONFIG_VIRTIO_BLK " in x)
    assert "mine.config:1" in line and "overrides y from block.config" in line and "ok" in line
    line = next(x for x in text.splitlines() if "CONFIG_EXT4_FS=" in x)
    assert "NOT HONOURED (got n)" in line


# --- expressions -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,values,expected", [
    ("A && B", {"A": "y", "B": "y"}, 2),
    ("A && B", {"A": "y", "B": "m"}, 1),
    ("A || B", {"B": "y"}, 2),
    ("!A", {"A": "y"}, 0),
    ("!A", {}, 2),
    ("A && (B || !C)", {"A": "y", "C": "y"}, 0),
    ("A && (B || !C)", {"A": "y"}, 2),
    ("A = y", {"A": "y"}, 2),
    ("A != n", {"A": "m"}, 2),
    ("S = \"x86\"", {"S": '"x86"'}, 2),
    ("N >= 4", {"N": "8"}, 2),
    ("$(cc-option,-fno-pie) && A", {"A": "y"}, 2),
    ('"$(ARCH)" = "x86"', {}, 2),
    ("m", {}, 1),
])
def test_evaluate(text, values, expected):
    assert evaluate(parse_expr(text), values) == expected


def test_unmet_names_the_culprits():
    expr = parse_expr("BLK_DEV && VIRTIO && (X86 || ARM) && !X86_32")
    atoms = unmet(expr, {"VIRTIO": "y", "X86": "y", "X86_32": "y"})
    assert atoms == ["BLK_DEV=n", "!X86_32 (X86_32=y)"]
    assert unmet(expr, {"BLK_DEV": "y", "VIRTIO": "y", "X86": "y"}) == []


@pytest.mark.parametrize("bad", ["A &&", "(A || B", "A B", "&& A"])
def test_parse_errors(bad):
    with pytest.raises(ValueError):
        parse_expr(bad)


# --- a fake Kconfig tree ---------------------------------------------------------------------


FAKE_KCONFIG = {
    "Makefile": "VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\n",
    "Kconfig": 'mainmenu "fake"\nsource "arch/$(SRCARCH)/Kconfig"\nsource "drivers/Kconfig"\n',
    "arch/x86/Kconfig": "config X86\n\tdef_bool y\n\tselect HAS_IOMEM\n\nconfig HAS_IOMEM\n\tbool\n",
    "arch/arm/Kconfig": "config ARM_ONLY\n\tbool \"arm\"\n",
    "drivers/Kconfig": """\
menuconfig BLK_DEV
\tbool "Block devices"
\tdepends on HAS_IOMEM
\thelp
\t  Say Y.

\t  config NOT_A_SYMBOL
\t    depends on NOTHING

if BLK_DEV

config VIRTIO_BLK
\ttristate "Virtio block driver"
\tdepends on VIRTIO
\tselect SG_POOL

endif # BLK_DEV

config VIRTIO
\ttristate

config SG_POOL
\tbool

menu "Networking"
\tdepends on NET

config VIRTIO_NET
\ttristate "Virtio network driver" if EXPERT
\tdepends on VIRTIO && \\
\t\tINET
endmenu

config NET
\tbool "Networking"

config INET
\tbool "TCP/IP"
\tdepends on NET

config EXPERT
\tbool "Expert"

config MODULES
\tbool "Modules"
""",
}


@pytest.fixture
def fake_tree(tmp_path) -> Path:
    root = tmp_path / "linux"
    for rel, text in FAKE_KCONFIG.items():
        write(root / rel, text)
    return root


def test_index_reads_if_menu_source_and_skips_help(fake_tree):
    index = KconfigIndex.load(fake_tree)
    assert index.version == "6.1"
    assert {"X86", "HAS_IOMEM", "BLK_DEV", "VIRTIO_BLK", "VIRTIO", "VIRTIO_NET", "NET", "INET"} <= set(index.symbols)
    assert "NOT_A_SYMBOL" not in index.symbols  # inside help text
    assert "ARM_ONLY" not in index.symbols  # other architectures are not read
    (blk,) = index.symbols["VIRTIO_BLK"]
    assert blk.all_deps() == ["BLK_DEV", "VIRTIO"]
    assert blk.file == Path("drivers/Kconfig") and blk.prompt
    (net,) = index.symbols["VIRTIO_NET"]
    assert net.all_deps() == ["NET", "VIRTIO && INET"]
    assert net.prompt_if == ["EXPERT"]
    assert ("BLK_DEV", "") not in index.selected_by.get("SG_POOL", [])
    assert index.selected_by["SG_POOL"] == [("VIRTIO_BLK", "")]
    assert index.selected_by["HAS_IOMEM"] == [("X86", "")]


def test_verify_reports_the_unmet_dependency(fake_tree, tmp_path):
    index = KconfigIndex.load(fake_tree)
    frag = write(tmp_path / "block.config", "CONFIG_VIRTIO=y\nCONFIG_VIRTIO_BLK=y\n")
    merged = merge([frag])
    final = {"X86": "y", "HAS_IOMEM": "y", "VIRTIO": "y"}  # BLK_DEV missing: VIRTIO_BLK dropped
    (problem,) = verify(merged, final, index)
    assert problem.request.name == "VIRTIO_BLK"
    assert problem.unmet == ("BLK_DEV=n",)
    text = problem.describe()
    assert "CONFIG_VIRTIO_BLK=y (block.config:2): got not set" in text
    assert "unmet dependency: BLK_DEV=n in `depends on BLK_DEV && VIRTIO` (drivers/Kconfig:12)" in text
    error = config.report_problems([problem])
    assert error.message == ("KERNEL_FRAGMENTS: CONFIG_VIRTIO_BLK from block.config:2 was dropped by Kconfig "
                             "(unmet: BLK_DEV=n)")


def test_verify_notes_a_dependency_that_was_dropped_too(fake_tree, tmp_path):
    index = KconfigIndex.load(fake_tree)
    frag = write(tmp_path / "f.config", "CONFIG_INET=y\nCONFIG_VIRTIO=y\nCONFIG_VIRTIO_NET=y\n")
    problems = verify(merge([frag]), {"VIRTIO": "y"}, index)
    assert [p.request.name for p in problems] == ["INET", "VIRTIO_NET"]
    assert problems[1].unmet == ("NET=n", "INET=n")
    assert "CONFIG_INET is requested in f.config:1 but was dropped too" in problems[1].describe()


def test_verify_prompt_condition_modules_and_select(fake_tree, tmp_path):
    index = KconfigIndex.load(fake_tree)
    frag = write(tmp_path / "f.config",
                 "CONFIG_VIRTIO_NET=y\nCONFIG_NET=m\n# CONFIG_SG_POOL is not set\nCONFIG_HAS_IOMEM=y\n")
    final = {"NET": "y", "INET": "y", "VIRTIO": "y", "BLK_DEV": "y", "VIRTIO_BLK": "y", "SG_POOL": "y"}
    problems = {p.request.name: p for p in verify(merge([frag]), final, index)}
    assert "only visible if EXPERT" in problems["VIRTIO_NET"].describe()
    assert "needs CONFIG_MODULES=y" in problems["NET"].describe()
    assert "selected by CONFIG_VIRTIO_BLK" in problems["SG_POOL"].describe()
    assert "no prompt" in problems["HAS_IOMEM"].describe()


def test_honoured_options_pass(fake_tree, tmp_path):
    index = KconfigIndex.load(fake_tree)
    frag = write(tmp_path / "f.config", "CONFIG_NET=y\n# CONFIG_EXPERT is not set\n")
    assert verify(merge([frag]), {"NET": "y"}, index) == []


def test_typo_is_its_own_error(fake_tree, tmp_path):
    index = KconfigIndex.load(fake_tree)
    frag = write(tmp_path / "f.config", "CONFIG_VIRTIO_BLKK=y\nCONFIG_NET=y\n")
    with pytest.raises(UsageError) as e:
        check_names(merge([frag]), index)
    assert e.value.message == f"KERNEL_FRAGMENTS: CONFIG_VIRTIO_BLKK in {frag}: no such option in Linux 6.1"
    assert "did you mean CONFIG_VIRTIO_BLK?" in e.value.detail


# --- the real kernel source, when it is unpacked ---------------------------------------------


@pytest.fixture(scope="module")
def real_index(osbuilder_settings) -> KconfigIndex:
    """The real Linux Kconfig tree (unpacked once into WORKDIR/linux, like `osbuilder kernel-src`)."""
    if osbuilder_settings.kernel_source == "debian" and not list(Path("/usr/src").glob("linux-source-*.tar.*")):
        pytest.skip("no kernel source: Debian's linux-source package is not installed")
    return KconfigIndex.load(source.ensure_source(osbuilder_settings).path)


def test_real_kconfig_knows_every_default_option(real_index, tmp_path):
    merged = merge(resolve_fragments(load_settings(tmp_path, KERNEL_FRAGMENTS="debug")))
    check_names(merged, real_index)  # no typos in osbuilder's own fragments
    (blk,) = real_index.symbols["VIRTIO_BLK"]
    assert "BLK_DEV" in blk.all_deps()


def test_real_kconfig_explains_virtio_blk_without_blk_dev(real_index, tmp_path):
    frag = write(tmp_path / "f.config", "CONFIG_VIRTIO_BLK=y\n")
    final = {"BLOCK": "y", "VIRTIO": "y", "HAS_IOMEM": "y"}
    (problem,) = verify(merge([frag]), final, real_index)
    assert "BLK_DEV=n" in problem.unmet


def test_real_kconfig_typo(real_index, tmp_path):
    frag = write(tmp_path / "f.config", "CONFIG_VIRTIO_BLKK=y\n")
    with pytest.raises(UsageError) as e:
        check_names(merge([frag]), real_index)
    assert e.value.message == f"KERNEL_FRAGMENTS: CONFIG_VIRTIO_BLKK in {frag}: no such option in Linux 6.1"


# --- kernel-src with small fake sources ------------------------------------------------------


FAKE_MAKEFILE = "VERSION = 6\nPATCHLEVEL = 1\nkernelversion:\n\t@echo 6.1.99\n"


def fake_source(root: Path) -> Path:
    write(root / "Makefile", FAKE_MAKEFILE)
    write(root / "Kconfig", "config A\n\tbool \"a\"\n")
    write(root / "scripts" / "kconfig" / "merge_config.sh", "#!/bin/sh\n")
    return root


def fake_tarball(tmp_path: Path) -> Path:
    tree = fake_source(tmp_path / "src" / "linux-6.1.99")
    out = tmp_path / "linux-6.1.99.tar.xz"
    with tarfile.open(out, "w:xz") as tar:
        tar.add(tree, arcname=tree.name)
    return out


def test_kernel_src_unpacks_once(tmp_path):
    s = load_settings(tmp_path, KERNEL_SOURCE=str(fake_tarball(tmp_path)))
    first = source.ensure_source(s)
    assert first.fresh and first.version == "6.1.99"
    assert (first.path / "Kconfig").is_file() and first.path == s.workdir / "linux"
    again = source.ensure_source(s)
    assert not again.fresh and again.marker == first.marker
    assert not list(s.workdir.glob(".linux.tmp-*"))


def test_kernel_src_truncated_tarball(tmp_path):
    good = fake_tarball(tmp_path)
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    s = load_settings(tmp_path, KERNEL_SOURCE=str(bad))
    with pytest.raises(UsageError) as e:
        source.ensure_source(s)
    assert e.value.message == f"KERNEL_SOURCE: {bad} is corrupt or truncated (tar failed)"
    assert not (s.workdir / "linux").exists()


def test_kernel_src_missing_and_not_a_tree(tmp_path):
    with pytest.raises(UsageError, match="^KERNEL_SOURCE: .*/nope.tar.xz: no such file or directory$"):
        source.ensure_source(load_settings(tmp_path, KERNEL_SOURCE=str(tmp_path / "nope.tar.xz")))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="is a directory but not a git tree"):
        source.ensure_source(load_settings(tmp_path, KERNEL_SOURCE=str(tmp_path / "plain")))


def test_kernel_src_debian_package_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "DEBIAN_SOURCE_DIR", tmp_path / "usr-src")
    with pytest.raises(UsageError) as e:
        source.ensure_source(load_settings(tmp_path))
    assert "apt-get install linux-source-6.1" in e.value.message
    assert e.value.message.startswith("KERNEL_SOURCE: debian: ")


def test_kernel_src_from_git_tree(tmp_path):
    repo = fake_source(tmp_path / "repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "fake"], check=True, env={"GIT_COMMITTER_DATE": "@1700000000",
                                                                      "GIT_AUTHOR_DATE": "@1700000000",
                                                                      "PATH": "/usr/bin:/bin"})
    s = load_settings(tmp_path, KERNEL_SOURCE=str(repo))
    tree = source.ensure_source(s)
    assert tree.fresh and tree.identity["kind"] == "git-tree" and tree.epoch == 1700000000
    assert not source.ensure_source(s).fresh
