"""`kconfig diff` and the bisection loop, against the real Linux source and real `make olddefconfig`.

The loop's tests judge each config with a rule instead of a build and a boot (`Judge`): they are
about the search — how many steps, what it names, how it handles skips, collapses and a resumed
state. The real builds and boots of a bisection are in boot_tests/test_kconfig_bisect.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from osbuilder import cli
from osbuilder import settings as settings_mod
from osbuilder.errors import InfrastructureError, OsbuilderError
from osbuilder.kernel import bisect, configdiff, verdicts
from osbuilder.kernel.build import ConfigureError, KernelBuild
from osbuilder.kernel.kconfig import read_config
from osbuilder.kernel.source import SourceTree
from osbuilder.kernel.verdicts import BAD, GOOD, SKIP, Verdict
from osbuilder.layout import KernelFiles, Workdir

# Nineteen options BAD changes relative to the defaults (GOOD): booleans, a choice switch, an int, a
# string, options that depend on each other (INET, UNIX, PACKET on NET; EXT4_FS pulls in crypto).
BAD_CHANGES = {"IKCONFIG": "y", "MAGIC_SYSRQ": "y", "PRINTK_TIME": "y", "LOG_BUF_SHIFT": "14",
               "DEFAULT_HOSTNAME": '"bisect"', "HZ_100": "y", "HZ_250": "n", "NET": "y", "INET": "y",
               "UNIX": "y", "PACKET": "y", "EXT4_FS": "y", "TMPFS": "y", "PANIC_TIMEOUT": "5", "SWAP": "n",
               "CRC16": "y", "SYSVIPC": "n", "POSIX_MQUEUE": "y", "IKHEADERS": "n"}


@pytest.fixture(scope="module")
def against(osbuilder_settings, tmp_path_factory):
    if osbuilder_settings.kernel_source == "debian" and not list(Path("/usr/src").glob("linux-source-*.tar.*")):
        pytest.skip("no kernel source: Debian's linux-source package is not installed")
    settings = osbuilder_settings.with_values(WORKDIR=str(tmp_path_factory.mktemp("kconfig-work")))
    return settings, configdiff.against_source(settings, Workdir.of(settings).log("kconfig"))


@pytest.fixture(scope="module")
def pair(against, tmp_path_factory):
    """GOOD (Kconfig's defaults) and BAD (BAD_CHANGES on top), as files."""
    _, source = against
    good, good_text = source.normaliser.normalise({})
    _, bad_text = source.normaliser.normalise({**good, **BAD_CHANGES})
    where = tmp_path_factory.mktemp("pair")
    (where / "good.config").write_text(good_text)
    (where / "bad.config").write_text(bad_text)
    return where / "good.config", where / "bad.config"


class Judge:
    """A test that calls a config bad when `rule(values)` says so; counts what it was asked."""

    def __init__(self, rule: Callable[[dict[str, str]], bool], skip: Callable[[dict[str, str]], bool] | None = None):
        self.rule = rule
        self.skip = skip
        self.asked: list[str] = []

    def __call__(self, config: Path, name: str) -> Verdict:
        values = read_config(config)
        self.asked.append(name)
        if self.skip and self.skip(values):
            return Verdict(SKIP, "boot", "accelerator broke", retry=True)
        return Verdict(BAD if self.rule(values) else GOOD, "agent" if self.rule(values) else "powerdown", "judged")


def start(against, pair, judge: Judge, workdir: Path, test: str = "boot") -> bisect.Bisection:
    settings, source = against
    wd = Workdir(workdir)
    configs = bisect.Configs(wd, source.normaliser)
    good_sha, _ = configs.add(read_config(pair[0]))
    bad_sha, _ = configs.add(read_config(pair[1]))
    state = bisect.State.load(wd.bisect_state) or bisect.State(
        "pair", str(pair[0]), str(pair[1]), test, good_sha, bad_sha, good_sha, bad_sha)
    return bisect.Bisection(state, configs, source.index, judge, wd.bisect_state, progress=lambda line: None)


def settable_changes(against, pair) -> list[configdiff.Change]:
    _, source = against
    changes = configdiff.diff(read_config(pair[0]), read_config(pair[1]), source.index)
    return [c for c in changes if c.settable]


def test_pair_changes_at_least_sixteen_options(against, pair):
    assert len(settable_changes(against, pair)) >= 16


def test_one_culprit_is_named_within_the_step_bound(against, pair, tmp_path):
    judge = Judge(lambda v: v.get("PRINTK_TIME") == "y")
    result = start(against, pair, judge, tmp_path).run()
    assert result["status"] == bisect.FOUND
    assert [c["name"] for c in result["culprits"]] == ["PRINTK_TIME"]
    n = len(settable_changes(against, pair))
    assert len(judge.asked) == len(result["steps"]) <= math.ceil(math.log2(n)) + 2
    culprit = result["culprits"][0]
    assert (culprit["good"], culprit["bad"]) == ("n", "y")
    assert "time stamps of the printk()" in culprit["help"]  # the kernel's own help text of PRINTK_TIME
    assert [s["role"] for s in result["steps"][:2]] == ["confirm GOOD", "confirm BAD"]


def test_a_culprit_that_needs_its_dependency_is_found_with_it_applied(against, pair, tmp_path):
    judge = Judge(lambda v: v.get("PACKET") == "y")  # PACKET depends on NET, which GOOD lacks
    result = start(against, pair, judge, tmp_path).run()
    assert [c["name"] for c in result["culprits"]] == ["PACKET"]
    assert "NET" in [a["name"] for a in result["adopted"]]  # tested on top of NET from BAD


def test_options_that_break_only_together_are_reported_honestly(against, pair, tmp_path):
    judge = Judge(lambda v: v.get("IKCONFIG") == "y" and v.get("TMPFS") == "y")
    result = start(against, pair, judge, tmp_path).run()
    names = [c["name"] for c in result["culprits"]]
    adopted = [a["name"] for a in result["adopted"]]
    # the last one applied is named; the other is among the options it was tested on top of
    assert len(names) == 1 and names[0] in ("IKCONFIG", "TMPFS")
    assert ({"IKCONFIG", "TMPFS"} - set(names)) <= set(adopted)
    assert "tested on top of GOOD plus" in bisect.format_result(result)


def test_a_choice_switch_is_one_unit(against, pair, tmp_path):
    judge = Judge(lambda v: v.get("HZ_100") == "y")
    result = start(against, pair, judge, tmp_path).run()
    assert sorted(c["name"] for c in result["culprits"]) == ["HZ_100", "HZ_250"]
    assert "2 options that could not be separated" in bisect.format_result(result)


def test_skips_are_retried_once_then_routed_around(against, pair, tmp_path):
    class BrokenAccelerator(Judge):
        """The first split's config cannot be tested: it and its retry skip."""

        def __call__(self, config: Path, name: str) -> Verdict:
            if len(self.asked) in (2, 3):
                self.asked.append(name)
                return Verdict(SKIP, "kernel", "KVM internal error", retry=True)
            return super().__call__(config, name)

    judge = BrokenAccelerator(lambda v: v.get("MAGIC_SYSRQ") == "y")
    result = start(against, pair, judge, tmp_path).run()
    assert [c["name"] for c in result["culprits"]] == ["MAGIC_SYSRQ"]
    skipped = result["steps"][2]
    name = f"bisect-{skipped['config'][:12]}"
    assert skipped["verdict"] == SKIP and judge.asked[2:4] == [name, name + "-retry"]
    assert skipped["config"] not in [s["config"] for s in result["steps"][3:]]  # routed around it
    assert {c["name"] for c in result["follow"]} >= {"MAGIC_SYSRQ_SERIAL"}  # visible only with MAGIC_SYSRQ


def test_an_untestable_good_is_infrastructure(against, pair, tmp_path):
    judge = Judge(lambda v: False, skip=lambda v: True)
    result = start(against, pair, judge, tmp_path).run()
    assert result["status"] == bisect.INFRASTRUCTURE and bisect.EXIT_CODES[result["status"]] == 125
    assert len(judge.asked) == 2  # once and the retry, then stop


def test_good_that_fails_or_bad_that_passes_is_exit_1(against, pair, tmp_path):
    result = start(against, pair, Judge(lambda v: True), tmp_path / "a").run()
    assert result["status"] == bisect.NOT_AS_CLAIMED and "GOOD" in result["note"] and "fails" in result["note"]
    result = start(against, pair, Judge(lambda v: False), tmp_path / "b").run()
    assert result["status"] == bisect.NOT_AS_CLAIMED and "BAD" in result["note"] and "passes" in result["note"]
    assert bisect.EXIT_CODES[result["status"]] == 1


def test_an_interrupted_bisection_resumes_where_it_stopped(against, pair, tmp_path):
    rule = lambda v: v.get("LOG_BUF_SHIFT") == "14"  # noqa: E731
    full = start(against, pair, Judge(rule), tmp_path / "full").run()

    class Interrupted(Judge):
        def __call__(self, config: Path, name: str) -> Verdict:
            if len(self.asked) == 3:
                raise KeyboardInterrupt
            return super().__call__(config, name)

    with pytest.raises(KeyboardInterrupt):
        start(against, pair, Interrupted(rule), tmp_path / "resumed").run()
    saved = json.loads((Workdir(tmp_path / "resumed").bisect_state).read_text())
    assert len(saved["steps"]) == 3 and saved["result"] is None
    judge = Judge(rule)
    result = start(against, pair, judge, tmp_path / "resumed").run()
    assert len(judge.asked) == len(full["steps"]) - 3  # only what was left
    assert [s["config"] for s in result["steps"]] == [s["config"] for s in full["steps"]]
    assert result["culprits"] == full["culprits"]
    again = Judge(rule)
    assert start(against, pair, again, tmp_path / "resumed").run() == result and again.asked == []


def test_splits_cover_halves_then_finer():
    parts = [["A"], ["B"], ["C", "D"], ["E"]]
    found = list(bisect.splits(parts))
    assert found[0] == [["A"], ["B"]] and found[1] == [["C", "D"], ["E"]]
    assert [["E"]] in found and all(0 < len(s) < len(parts) for s in found)


# --- kconfig diff ------------------------------------------------------------------------------


def test_diff_groups_options_that_change_together(against, pair):
    _, source = against
    changes = configdiff.diff(read_config(pair[0]), read_config(pair[1]), source.index)
    groups = {tuple(c.name for c in g) for g in configdiff.groups(changes, source.index)}
    of = {name: g for g in groups for name in g}
    assert of["INET"] == of["NET"] == of["PACKET"]  # depends on NET
    assert of["HZ_100"] == of["HZ_250"]  # one choice
    assert of["HZ"] == of["HZ_100"]  # HZ has no prompt: its default follows HZ_100
    assert of["PRINTK_TIME"] == ("PRINTK_TIME",)
    assert of["PRINTK_TIME"] != of["NET"]


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_kconfig_diff_cli_text_and_json(against, pair, capsys):
    settings, _ = against
    code, out, _ = run_cli("kconfig", "diff", str(pair[0]), str(pair[1]), "--workdir", str(settings.workdir),
                           capsys=capsys)
    assert code == 0 and "CONFIG_PRINTK_TIME" in out and "not set -> y" in out
    code, out, _ = run_cli("kconfig", "diff", str(pair[0]), str(pair[1]), "--json", "--workdir",
                           str(settings.workdir), capsys=capsys)
    data = json.loads(out)
    names = {c["name"]: c for g in data["groups"] for c in g}
    assert code == 0 and names["LOG_BUF_SHIFT"]["good"] == "17" and names["LOG_BUF_SHIFT"]["bad"] == "14"


# --- bad input: one line, exit 2, nothing built -------------------------------------------------


def bad_input(tmp_path: Path, capsys, *argv: str) -> str:
    workdir = tmp_path / "work"
    code, _, err = run_cli(*argv, "--workdir", str(workdir), capsys=capsys)
    assert code == 2, err
    assert err.startswith("osbuilder: error: ")
    built = [p.name for p in workdir.iterdir() if p.name != "logs"] if workdir.exists() else []
    assert built == [], f"something was built: {built}"
    return err.splitlines()[0]


@pytest.fixture
def configs(tmp_path, pair) -> dict[str, Path]:
    files = {"good": pair[0], "bad": pair[1]}
    texts = {"yaml": "workdir: /srv\nos_version: bookworm\n",
             "arm64": "# Linux/arm64 6.1.0 Kernel Configuration\nCONFIG_ARM64=y\nCONFIG_64BIT=y\n",
             "i386": "# Linux/x86 6.1.0 Kernel Configuration\nCONFIG_X86=y\nCONFIG_X86_32=y\n"
                     "# CONFIG_64BIT is not set\n",
             "comments": "# only comments\n\n"}
    for name, text in texts.items():
        files[name] = tmp_path / f"{name}.config"
        files[name].write_text(text)
    return files


@pytest.mark.parametrize("good, bad, expected", [
    ("missing", "bad", "GOOD: {missing}: no such file"),
    ("good", "yaml", "BAD: {yaml} is not a kernel config"),
    ("comments", "bad", "GOOD: {comments} is not a kernel config (no CONFIG_ lines)"),
    ("arm64", "bad", "GOOD: {arm64} is a config for arm64"),
    ("good", "i386", "BAD: {i386} is a config for i386"),
    ("good", "good", "is the same config as GOOD"),
])
@pytest.mark.parametrize("command", ["diff", "bisect"])
def test_bad_pairs_are_one_line_exit_2(command, good, bad, expected, configs, tmp_path, capsys):
    configs["missing"] = tmp_path / "missing.config"
    first = bad_input(tmp_path, capsys, "kconfig", command, "--good", str(configs[good]), "--bad", str(configs[bad]))
    assert expected.format(**{k: str(v) for k, v in configs.items()}) in first


def test_a_test_command_that_does_not_exist_is_exit_2(configs, tmp_path, capsys):
    first = bad_input(tmp_path, capsys, "kconfig", "bisect", "--good", str(configs["good"]), "--bad",
                      str(configs["bad"]), "--test", "no-such-program --flag")
    assert "--test: no-such-program: no such command" in first


def test_the_state_of_another_pair_is_refused(against, configs, tmp_path, capsys):
    workdir = tmp_path / "work"
    wd = Workdir(workdir)
    wd.bisect.mkdir(parents=True)
    bisect.State("another pair", "/old/good.config", "/old/bad.config", "build").save(wd.bisect_state)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    code, _, err = run_cli("kconfig", "bisect", "--good", str(configs["good"]), "--bad", str(configs["bad"]),
                           "--test", "build", "--workdir", str(workdir), capsys=capsys)
    assert code == 2 and "holds a bisection of another pair (GOOD=/old/good.config" in err.splitlines()[0]
    assert "--reset" in err.splitlines()[0]
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*") if p.relative_to(workdir).parts[0] != "logs")
    assert after == before


# --- one step's verdict -------------------------------------------------------------------------


def step_test(tmp_path: Path, spec: str) -> verdicts.StepTest:
    settings = settings_mod.load({"WORKDIR": str(tmp_path / "work")}, env={}, cwd=tmp_path)
    tree = SourceTree(tmp_path / "linux", {"content": "x", "version": "6.1"}, False)
    return verdicts.StepTest(settings, spec, tree=tree, out=KernelFiles(tmp_path / "out"), logfile=tmp_path / "log")


@pytest.mark.parametrize("script, expected", [
    ("exit 0", GOOD), ("exit 1", BAD), ("exit 124", BAD), ("exit 125", SKIP), ("exit 126", BAD), ("exit 127", BAD),
])
def test_a_command_is_judged_with_git_bisect_exit_codes(tmp_path, script, expected):
    test = step_test(tmp_path, f"sh -c '{script}; echo never'")
    built = KernelBuild(tmp_path / "out", {"kernel_version": "6.1"})
    assert test.command_verdict(built).verdict == expected


def test_a_command_sees_the_kernel_it_judges(tmp_path):
    test = step_test(tmp_path, 'sh -c \'test "$OSBUILDER_KERNEL" = "$1" && test -n "$OSBUILDER_KERNEL_CONFIG"\' sh '
                     + str(KernelFiles(tmp_path / "out").vmlinuz))
    assert test.command_verdict(KernelBuild(tmp_path / "out", {})).verdict == GOOD


def test_a_command_killed_by_a_signal_stops_the_bisection(tmp_path):
    test = step_test(tmp_path, "sh -c 'kill -TERM $$'")
    with pytest.raises(OsbuilderError, match="killed by signal 15; stopping the bisection"):
        test.command_verdict(KernelBuild(tmp_path / "out", {}))


@pytest.mark.parametrize("error, spec, expected", [
    (InfrastructureError("kernel: no space left on device"), "boot", (SKIP, True)),
    (InfrastructureError("kernel: no space left on device"), "build", (SKIP, True)),
    (OsbuilderError("kernel: the kernel source does not build: fs/x.c: error"), "boot", (SKIP, False)),
    (OsbuilderError("kernel: the kernel source does not build: fs/x.c: error"), "build", (BAD, False)),
    (ConfigureError("kernel: does not configure"), "boot", (SKIP, False)),
    (ConfigureError("kernel: does not configure"), "build", (BAD, False)),
])
def test_build_failures_are_skip_or_bad_by_what_is_tested(tmp_path, monkeypatch, error, spec, expected):
    def failing_build(*args, **kwargs):
        raise error

    monkeypatch.setattr(verdicts, "build_kernel", failing_build)
    verdict = step_test(tmp_path, spec)(tmp_path / "x.config", "step")
    assert (verdict.verdict, verdict.retry) == expected
    assert verdict.phase == "build" and error.message in verdict.reason
    assert set(verdict.seconds) == {"build", "total"}
