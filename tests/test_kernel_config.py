"""Unit tests for kernel config fragments, Kconfig reading and verification, kernel-src and the kernel
cache key (no build)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from osbuilder import arch as arch_mod
from osbuilder import settings as settings_mod
from osbuilder.arch import X86_64
from osbuilder.errors import UsageError
from osbuilder.kernel import build, fragments, kconfig, source
from osbuilder.kernel.fragments import (
    COMMON_FRAGMENTS,
    check_names,
    default_fragments,
    merge,
    parse_fragment,
    resolve_fragments,
    verify,
)
from osbuilder.kernel.kconfig import KconfigIndex, evaluate, parse_expr, read_config, unmet
from osbuilder.layout import UserCache, Workdir


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_settings(tmp_path: Path, **cli: str):
    values = {"WORKDIR": str(tmp_path / "work"), "CACHE_DIR": str(tmp_path / "cache"), **cli}
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
    assert kconfig.honoured("y", "y") and not kconfig.honoured("y", "m")
    assert kconfig.honoured("n", None) and kconfig.honoured("n", "n") and not kconfig.honoured("n", "y")
    assert kconfig.honoured('"x"', values["S"])


def test_default_fragments_cover_configs_dir(tmp_path):
    # What a build applies, not the constants: without KERNEL_FRAGMENTS every file in configs/
    # applies for some architecture except the opt-in ones, and each opt-in one is reachable by its name.
    on_disk = set(fragments.CONFIGS_DIR.glob("*.config"))
    applied: set[Path] = set()
    for name in ("x86_64", "arm64"):
        files = resolve_fragments(load_settings(tmp_path, ARCH=name))
        assert len(files) == len(set(files))
        applied |= set(files)
    opt_in = on_disk - applied
    assert applied <= on_disk and {p.stem for p in opt_in} == {"debug", "xfs"}
    for path in opt_in:
        assert resolve_fragments(load_settings(tmp_path, KERNEL_FRAGMENTS=path.stem))[-1] == path


def test_lean_has_the_last_word(tmp_path):
    # lean.config trims what the others switched on and requests back what the guest needs: of the
    # default set it applies last, so each of its requests is what the merge keeps.
    lean = fragments.CONFIGS_DIR / "lean.config"
    applied = resolve_fragments(load_settings(tmp_path))
    assert applied[-1] == lean
    merged = merge(applied)
    wanted = parse_fragment(lean)
    assert wanted
    for req in wanted:
        assert merged.requests[req.name] == req, req.name


def test_every_fragment_starts_with_a_header_comment():
    for path in fragments.CONFIGS_DIR.glob("*.config"):
        assert path.read_text().startswith("# "), path.name


def test_xfs_is_opt_in_by_name(tmp_path):
    assert "XFS_FS" not in merge(resolve_fragments(load_settings(tmp_path))).requests
    files = resolve_fragments(load_settings(tmp_path, KERNEL_FRAGMENTS="xfs"))
    assert files[-1] == fragments.CONFIGS_DIR / "xfs.config"
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


# What the runtime's NVDIMM boot needs (issue 9): the NFIT region, /dev/pmem0, and the pfn support that
# reads the image's DAX header and gives the namespace struct pages (fsdax); without NVDIMM_PFN the
# namespace stays raw: ext4 refuses `dax` on it and /dev/pmem0p1 is not the image's partition.
NVDIMM_DAX_BOOT = ("ACPI_NFIT", "LIBNVDIMM", "BLK_DEV_PMEM", "NVDIMM_PFN", "ZONE_DEVICE", "FS_DAX",
                   "MEMORY_HOTPLUG", "MEMORY_HOTREMOVE", "SPARSEMEM_VMEMMAP", "MSDOS_PARTITION", "EXT4_FS")


def test_default_fragments_request_what_the_nvdimm_dax_boot_needs(tmp_path):
    merged = merge(resolve_fragments(load_settings(tmp_path)))
    missing = [name for name in NVDIMM_DAX_BOOT if name not in merged.requests]
    assert not missing, f"not requested by any fragment, so the fragment verification cannot keep them: {missing}"
    assert all(merged.requests[name].value == "y" for name in NVDIMM_DAX_BOOT)
    assert merged.requests["NVDIMM_PFN"].source.name == "dax.config"


def test_kernel_fragments_adds_files_and_builtin_names(tmp_path):
    extra = write(tmp_path / "mine.config", "CONFIG_VIRTIO_BLK=y\n")
    s = load_settings(tmp_path, KERNEL_FRAGMENTS=f"debug {extra}")
    files = resolve_fragments(s)
    assert files[-2].name == "debug.config" and files[-1] == extra.resolve()
    assert files[:-2] == resolve_fragments(load_settings(tmp_path))  # after the defaults, in their order
    assert [p.stem for p in files[:-2]] == list(default_fragments(X86_64))


def test_each_architecture_has_its_own_fragments_between_the_common_ones_and_lean(tmp_path):
    x86 = [p.stem for p in resolve_fragments(load_settings(tmp_path, ARCH="x86_64"))]
    arm = [p.stem for p in resolve_fragments(load_settings(tmp_path, ARCH="arm64"))]
    assert x86[:len(COMMON_FRAGMENTS)] == arm[:len(COMMON_FRAGMENTS)] == list(COMMON_FRAGMENTS)
    assert x86[-1] == arm[-1] == "lean"
    assert "serial" in x86 and "x86" in x86 and "serial-pl011" in arm and "arm64" in arm
    x86_requests, arm_requests = (merge(resolve_fragments(load_settings(tmp_path, ARCH=a))).requests
                                  for a in ("x86_64", "arm64"))
    # no x86 option reaches the arm64 kernel, and each has a serial console driver
    assert not [name for name in arm_requests if name.startswith("X86") or "8250" in name]
    assert x86_requests["SERIAL_8250_CONSOLE"].value == arm_requests["SERIAL_AMBA_PL011_CONSOLE"].value == "y"


def test_missing_fragment_names_kernel_fragments(tmp_path):
    with pytest.raises(UsageError) as e:
        resolve_fragments(load_settings(tmp_path, KERNEL_FRAGMENTS=str(tmp_path / "nope.config")))
    assert e.value.message == f"KERNEL_FRAGMENTS: {tmp_path / 'nope.config'}: no such file"
    for path in fragments.CONFIGS_DIR.glob("*.config"):  # the hint names every built-in fragment
        assert path.stem in e.value.detail


def test_kconfig_show_lists_fragments_and_origins(tmp_path):
    extra = write(tmp_path / "mine.config", "# CONFIG_VIRTIO_BLK is not set\n")
    s = load_settings(tmp_path, KERNEL_FRAGMENTS=str(extra))
    write(Workdir.of(s).kernel_build / ".config", "CONFIG_VIRTIO_CONSOLE=y\n")
    text = fragments.show(s)
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
    error = fragments.report_problems([problem])
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
def real_tree(osbuilder_settings) -> source.SourceTree:
    """The real Linux source (unpacked once into the per-user cache, like `osbuilder kernel-src`)."""
    if osbuilder_settings.kernel_source == "debian" and not list(Path("/usr/src").glob("linux-source-*.tar.*")):
        pytest.skip("no kernel source: Debian's linux-source package is not installed")
    return source.ensure_source(osbuilder_settings)


@pytest.fixture(scope="module")
def real_index(real_tree) -> KconfigIndex:
    return KconfigIndex.load(real_tree.path)


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


def test_real_kconfig_a_config_without_pfn_support_fails_the_verification(real_index, tmp_path):
    """The kernel that could not boot as an NVDIMM (issue 9: `# CONFIG_NVDIMM_PFN is not set`, which
    allnoconfig gives when no fragment asks for it) no longer passes the fragment verification."""
    merged = merge(resolve_fragments(load_settings(tmp_path)))
    final = {name: req.value for name, req in merged.requests.items() if req.value != "n"}
    final.update({"ND_CLAIM": "y", "ND_PFN": "y", "MMU": "y", "ARCH_HAS_PTE_DEVMAP": "y"})
    final.pop("NVDIMM_PFN")
    final.pop("NVDIMM_DAX")  # depends on NVDIMM_PFN
    problems = {p.request.name: p for p in verify(merged, final, real_index)}
    assert {"NVDIMM_PFN", "NVDIMM_DAX"} <= set(problems)
    assert "unmet dependency: NVDIMM_PFN" in problems["NVDIMM_DAX"].describe()


def test_real_kconfig_pmem_needs_a_claim_provider(real_index):
    """/dev/pmem0 needs ND_CLAIM (devm_nsio_enable), which only NVDIMM_PFN or BTT select: the reason
    the kernel without them found the NVDIMM but never made /dev/pmem0 (issue 9)."""
    selectors = {symbol for symbol, _ in real_index.selected_by.get("ND_CLAIM", [])}
    assert selectors == {"NVDIMM_PFN", "BTT"}
    merged = merge(resolve_fragments(settings_mod.load({"WORKDIR": "/w"}, env={})))
    assert any(merged.requests.get(name) and merged.requests[name].value == "y" for name in selectors)


def _configure_arm64(real_tree, tmp_path, **cli):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("no aarch64-linux-gnu-gcc (Debian's gcc-aarch64-linux-gnu): an arm64 kernel cannot be configured")
    s = load_settings(tmp_path, ARCH="arm64", **cli)
    return fragments.configure(s, real_tree.path, tmp_path / "kernel-build-arm64", cc=build.compiler(s.guest)[0],
                               logfile=tmp_path / "kernel.log", env=build.build_env(s, real_tree))


def test_real_arm64_fragments_configure_an_arm64_kernel_with_every_option_honoured(real_tree, tmp_path):
    """The arm64 kernel's .config, made by Kconfig with ARCH=arm64 and the cross compiler: the fragments'
    verification passes (configure raises otherwise), and the result is an arm64 kernel with the PL011
    console, UEFI boot and the NVDIMM driver, and nothing of x86."""
    merged, path = _configure_arm64(real_tree, tmp_path)
    values = read_config(path)
    assert values.get("ARM64") == "y" and values.get("X86") is None
    for name in ("SERIAL_AMBA_PL011_CONSOLE", "EFI_STUB", "ACPI", "ACPI_NFIT", "BLK_DEV_PMEM", "VIRTIO_PCI",
                 "VIRTIO_CONSOLE", "VSOCKETS", "PCI_HOST_GENERIC"):
        assert values.get(name) == "y", name
    assert "arm64.config" in {p.name for p in merged.fragments}


def test_real_arm64_nvdimm_driver_needs_the_pmem_api_and_the_verification_says_so(real_tree, tmp_path):
    """On arm64 the NFIT driver depends on ARCH_HAS_PMEM_API, which only ARM64_PMEM selects (x86 has it
    always): without it, Kconfig drops ACPI_NFIT silently, and osbuilder stops before compiling."""
    no_pmem = write(tmp_path / "no-pmem.config", "# CONFIG_ARM64_PMEM is not set\n")
    with pytest.raises(UsageError) as e:
        _configure_arm64(real_tree, tmp_path, KERNEL_FRAGMENTS=str(no_pmem))
    assert "CONFIG_ACPI_NFIT=y (dax.config:" in e.value.detail
    assert "ARCH_HAS_PMEM_API" in e.value.detail


def ccache_outcomes(stats_log: Path) -> dict[str, str]:
    """Input file -> hit or miss, from ccache's statistics log (CCACHE_STATSLOG) of one step."""
    found: dict[str, str] = {}
    source = ""
    for line in stats_log.read_text().splitlines() if stats_log.exists() else []:
        if line.startswith("# "):
            source = line[2:]
        elif line in ("direct_cache_hit", "cache_miss"):
            found[source] = "hit" if line == "direct_cache_hit" else "miss"
    return found


def test_a_second_object_tree_is_configured_with_kconfigs_programs_from_ccache(real_tree, tmp_path):
    """kbuild compiles its own programs (Kconfig's conf, fixdep, ...) in every new object tree, even to
    configure it. HOSTCC goes through ccache-gcc like CC, so a second object tree's are ccache hits (a
    configure took 3.3 CPU-s, 1.9 with them), and its .config is the same."""
    if shutil.which("ccache") is None:
        pytest.skip("ccache is not installed (the kernel builds without it then)")
    s = load_settings(tmp_path)  # CACHE_DIR of its own: an empty ccache

    def configure(where: str) -> tuple[str, dict[str, str]]:
        env = {**build.build_env(s, real_tree), "CCACHE_STATSLOG": str(tmp_path / f"{where}.stats")}
        (tmp_path / where).mkdir()
        build.link_source(tmp_path / where, real_tree, env)
        _, path = fragments.configure(s, real_tree.path, tmp_path / where, cc=build.compiler(s.guest)[0],
                                      logfile=tmp_path / f"{where}.log", env=env)
        outcomes = ccache_outcomes(tmp_path / f"{where}.stats")
        return path.read_text(), {name: outcome for name, outcome in outcomes.items() if "scripts/kconfig/" in name}

    first, compiled = configure("first")
    second, again = configure("second")
    assert second == first
    assert len(compiled) >= 8 and set(compiled.values()) == {"miss"}, compiled  # conf's sources, through ccache
    assert again == {name: "hit" for name in compiled}, again


def test_real_config_is_the_same_whatever_arch_and_cross_compile_the_shell_holds(real_tree, tmp_path, monkeypatch):
    """osbuilder's ARCH setting is an environment variable, and make takes its ARCH from the environment
    unless told: `ARCH=x86_64 osbuilder kernel` gave a .config (and autoconf.h, which every file includes)
    headed "Linux/x86_64" where the same build without ARCH said "Linux/x86", so not one file was a ccache
    hit across the two. A CROSS_COMPILE left in the shell must not reach a native build either."""
    def configure(where: str) -> str:
        s = load_settings(tmp_path)
        _, path = fragments.configure(s, real_tree.path, tmp_path / where, cc=build.compiler(s.guest)[0],
                                      logfile=tmp_path / f"{where}.log", env=build.build_env(s, real_tree))
        return path.read_text()

    monkeypatch.delenv("ARCH", raising=False)
    monkeypatch.delenv("CROSS_COMPILE", raising=False)
    plain = configure("plain")
    host = arch_mod.host()
    monkeypatch.setenv("ARCH", host.name)  # x86_64 on this host: the setting's name, not the kernel's
    monkeypatch.setenv("CROSS_COMPILE", "no-such-prefix-")
    assert configure("from-a-shell") == plain
    assert f"# Linux/{host.kernel_arch} " in plain


def test_real_kconfig_typo(real_tree, real_index, tmp_path):
    frag = write(tmp_path / "f.config", "CONFIG_VIRTIO_BLKK=y\n")
    with pytest.raises(UsageError) as e:
        check_names(merge([frag]), real_index)
    release = ".".join(real_tree.version.split(".")[:2])  # from `make kernelversion`, for any KERNEL_SOURCE
    assert e.value.message == f"KERNEL_FRAGMENTS: CONFIG_VIRTIO_BLKK in {frag}: no such option in Linux {release}"
    assert "did you mean CONFIG_VIRTIO_BLK?" in e.value.detail


# --- kernel-src with small fake sources ------------------------------------------------------


FAKE_MAKEFILE = "VERSION = 6\nPATCHLEVEL = 1\nkernelversion:\n\t@echo 6.1.99\n"


def fake_source(root: Path) -> Path:
    write(root / "Makefile", FAKE_MAKEFILE)
    write(root / "Kconfig", "config A\n\tbool \"a\"\n")
    write(root / "scripts" / "kconfig" / "merge_config.sh", "#!/bin/sh\n")
    return root


def fake_tarball(tmp_path: Path, sublevel: int = 99) -> Path:
    tree = fake_source(tmp_path / f"src-{sublevel}" / f"linux-6.1.{sublevel}")
    (tree / "Makefile").write_text(FAKE_MAKEFILE.replace("6.1.99", f"6.1.{sublevel}"))
    out = tmp_path / f"linux-6.1.{sublevel}.tar.xz"
    with tarfile.open(out, "w:xz") as tar:
        tar.add(tree, arcname=tree.name)
    return out


def shared_trees(s) -> list[Path]:
    """The unpacked trees in the per-user cache (not locks, not temporaries)."""
    root = UserCache.of(s).kernel_sources
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def no_unpacking(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the source was unpacked again")

    monkeypatch.setattr(source, "_unpack", fail)


def test_kernel_src_unpacks_once(tmp_path):
    s = load_settings(tmp_path, KERNEL_SOURCE=str(fake_tarball(tmp_path)))
    first = source.ensure_source(s)
    assert first.fresh and first.version == "6.1.99"
    assert (first.path / "Kconfig").is_file() and first.path == Workdir.of(s).linux
    # WORKDIR/linux is a link to the one tree in the per-user cache, which carries the marker
    assert first.path.is_symlink() and [first.path.resolve()] == shared_trees(s)
    assert source.read_marker(first.path)["identity"] == first.identity
    again = source.ensure_source(s)
    assert not again.fresh and again.marker == first.marker
    assert not list(s.workdir.glob(".linux.tmp-*"))
    assert not list(UserCache.of(s).kernel_sources.glob(".*.tmp-*"))


def test_second_workdir_shares_the_unpacked_tree(tmp_path, monkeypatch):
    tarball = fake_tarball(tmp_path)
    one = load_settings(tmp_path, KERNEL_SOURCE=str(tarball))
    two = one.with_values(WORKDIR=str(tmp_path / "work2"))
    assert UserCache.of(one) == UserCache.of(two) and Workdir.of(one) != Workdir.of(two)
    first = source.ensure_source(one)
    assert first.fresh
    no_unpacking(monkeypatch)  # from here on, tar must not run
    second = source.ensure_source(two)
    assert not second.fresh and second.path == Workdir.of(two).linux
    assert second.path.resolve() == first.path.resolve()
    assert (second.path / "Kconfig").is_file() and second.version == "6.1.99"
    # the same content under another name (and mtime) is the same tree, with its own timestamp
    copy = tmp_path / "elsewhere" / "linux.tar.xz"
    copy.parent.mkdir()
    copy.write_bytes(tarball.read_bytes())
    third = source.ensure_source(one.with_values(WORKDIR=str(tmp_path / "work3"), KERNEL_SOURCE=str(copy)))
    assert not third.fresh and third.path.resolve() == first.path.resolve()
    assert third.epoch == int(copy.stat().st_mtime) and third.marker["spec"]["location"] == str(copy)
    assert len(shared_trees(one)) == 1


def test_kernel_src_switches_source_and_back(tmp_path, monkeypatch):
    a, b = fake_tarball(tmp_path, 98), fake_tarball(tmp_path, 99)
    s = load_settings(tmp_path, KERNEL_SOURCE=str(a))
    first = source.ensure_source(s).path.resolve()
    other = source.ensure_source(s.with_values(KERNEL_SOURCE=str(b)))
    assert other.fresh and other.version == "6.1.99" and Workdir.of(s).linux.resolve() != first
    assert (Workdir.of(s).linux / "Makefile").read_text().count("6.1.99") == 1
    no_unpacking(monkeypatch)
    back = source.ensure_source(s)
    assert not back.fresh and back.version == "6.1.98"
    assert source.read_marker(Workdir.of(s).linux)["version"] == "6.1.98"
    assert len(shared_trees(s)) == 2


def test_kernel_src_replaces_a_tree_unpacked_into_workdir(tmp_path):
    s = load_settings(tmp_path, KERNEL_SOURCE=str(fake_tarball(tmp_path)))
    old = fake_source(Workdir.of(s).linux)  # how an older osbuilder left WORKDIR/linux
    tree = source.ensure_source(s)
    assert old.is_symlink() and tree.path == old and (old / source.MARKER).is_file()


def test_kernel_manifest_does_not_unpack(tmp_path):
    tarball = fake_tarball(tmp_path)
    s = load_settings(tmp_path, KERNEL_SOURCE=str(tarball))
    before = build.kernel_manifest(s)
    assert not Workdir.of(s).linux.exists() and not Workdir.of(s).linux.is_symlink()
    assert shared_trees(s) == []
    assert not list(tmp_path.rglob(source.MARKER))  # no tree anywhere
    # the key does not change once the tree is there, and follows the tarball's content
    source.ensure_source(s)
    assert build.kernel_manifest(s).key == before.key
    fake_tarball(tmp_path / "other").replace(tarball)  # same name, other bytes
    assert build.kernel_manifest(s).key != before.key


def test_kernel_src_truncated_tarball(tmp_path):
    good = fake_tarball(tmp_path)
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    s = load_settings(tmp_path, KERNEL_SOURCE=str(bad))
    with pytest.raises(UsageError) as e:
        source.ensure_source(s)
    assert e.value.message == f"KERNEL_SOURCE: {bad} is corrupt or truncated (tar failed)"
    assert not Workdir.of(s).linux.is_symlink() and not Workdir.of(s).linux.exists()
    assert shared_trees(s) == [] and not list(UserCache.of(s).kernel_sources.glob(".*.tmp-*"))


def test_kernel_src_missing_and_not_a_tree(tmp_path):
    with pytest.raises(UsageError, match=r"^KERNEL_SOURCE: .*/nope.tar.xz: no such file or directory \(give debian"):
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
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert tree.identity["commit"] == head == tree.marker["content"]


def git_repo(root: Path) -> list[str]:
    """A git repository holding a fake source tree on branch `main`; the git command to work in it."""
    fake_source(root)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    commit(git, "fake")
    return git


def commit(git: list[str], message: str) -> str:
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", message], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_a_git_url_is_keyed_by_the_commit_its_branch_points_at(tmp_path):
    """A moving branch is fetched again: the identity is the commit `git ls-remote` reports now."""
    repo = tmp_path / "upstream"
    git = git_repo(repo)
    s = load_settings(tmp_path, KERNEL_SOURCE=f"file://{repo}#main")
    first = source.ensure_source(s)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert first.fresh and first.identity["commit"] == head == first.marker["content"]
    key = build.kernel_manifest(s).key
    assert not source.ensure_source(s).fresh and build.kernel_manifest(s).key == key
    (repo / "Makefile").write_text(FAKE_MAKEFILE.replace("6.1.99", "6.1.100"))
    moved = commit(git, "upstream moved on")
    assert build.kernel_manifest(s).key != key
    second = source.ensure_source(s)
    assert second.fresh and second.identity["commit"] == moved == second.marker["content"]
    assert second.version == "6.1.100" and len(shared_trees(s)) == 2


def test_a_git_url_pinned_to_a_commit_or_tag(tmp_path):
    repo = tmp_path / "upstream"
    git = git_repo(repo)
    old = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([*git, "tag", "-a", "-m", "v1", "v1"], check=True)  # an annotated tag: its commit counts
    (repo / "Makefile").write_text(FAKE_MAKEFILE.replace("6.1.99", "6.1.100"))
    commit(git, "later")
    tagged = source.ensure_source(load_settings(tmp_path, KERNEL_SOURCE=f"file://{repo}#v1"))
    assert tagged.identity["commit"] == old and tagged.version == "6.1.99"
    pinned = source.ensure_source(load_settings(tmp_path / "p", KERNEL_SOURCE=f"file://{repo}#{old}"))
    assert pinned.identity["commit"] == old and pinned.marker["content"] == old and pinned.version == "6.1.99"
    with pytest.raises(UsageError, match=r"^KERNEL_SOURCE: file://.* has no branch or tag 'nope'$"):
        build.kernel_manifest(load_settings(tmp_path, KERNEL_SOURCE=f"file://{repo}#nope"))
    with pytest.raises(UsageError, match="is not a branch, tag or commit name"):
        build.kernel_manifest(load_settings(tmp_path, KERNEL_SOURCE=f"file://{repo}#--upload-pack=touch /tmp/x"))


def test_kernel_key_follows_osbuilders_kernel_code(tmp_path, monkeypatch):
    """No hand-bumped recipe number: the code that configures and builds is part of the key."""
    copies = []
    for path in build.CODE_FILES:
        copies.append(tmp_path / "code" / path.name)
        write(copies[-1], path.read_text())
    monkeypatch.setattr(build, "CODE_FILES", tuple(copies))
    s = load_settings(tmp_path, KERNEL_SOURCE=str(fake_tarball(tmp_path)))
    keys = {build.kernel_manifest(s).key}
    for copy in copies:
        copy.write_text(copy.read_text() + "# changed\n")
        keys.add(build.kernel_manifest(s).key)
    assert len(keys) == 1 + len(copies)


def test_kernel_key_follows_binutils_and_the_host_architecture(tmp_path, monkeypatch):
    s = load_settings(tmp_path, KERNEL_SOURCE=str(fake_tarball(tmp_path)))
    before = build.kernel_manifest(s).key
    arm64 = s.with_values(ARCH="arm64")
    if shutil.which("aarch64-linux-gnu-gcc"):
        assert build.kernel_manifest(arm64).key != before
        assert build.kernel_manifest(arm64).inputs["compiler"].startswith("aarch64-linux-gnu-gcc")
    fake_ld = write(tmp_path / "bin" / "ld", "#!/bin/sh\necho 'GNU ld (GNU Binutils for Debian) 2.99'\n")
    fake_ld.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_ld.parent}:{os.environ['PATH']}")
    with_other_ld = build.kernel_manifest(s)
    assert with_other_ld.key != before and with_other_ld.inputs["binutils"].endswith("2.99")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert build.kernel_manifest(s).key not in (before, with_other_ld.key)
