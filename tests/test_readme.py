"""The README stays true: every setting and subcommand documented, CI runs the quick start's test command."""

import re
from pathlib import Path

import osbuilder.cli  # noqa: F401 - registers the subcommands
from osbuilder.settings import TABLE
from osbuilder.steps import STEPS as COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_quick_start_is_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "osbuilder image" in commands[0] and "osbuilder boot --check" in commands[0]


def test_ci_runs_the_readme_test_command():
    test_command = quick_start_commands()[1]
    assert test_command in (ROOT / ".ci/run").read_text()


def test_every_setting_is_in_the_table_with_its_default():
    for s in TABLE:
        row = f"| `{s.name}` / `{s.yaml_key}` / `{s.flag}` | " + (f"`{s.default}`" if s.default else '""')
        assert row in README, f"README settings table lacks {s.name}"


def test_every_subcommand_is_documented():
    """The Subcommands table has one row per subcommand, no more, no fewer (`osbuilder kernel` is
    not documented by `osbuilder kernel-src`'s row)."""
    section = README.split("## Subcommands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `osbuilder ([a-z-]+)[ `]", section, re.M)
    assert sorted(rows) == sorted(COMMANDS), rows


def test_tox_passes_every_setting_through():
    """`USE_DOCKER=yes tox -e boot` must not silently run on the host: every setting of the table, the
    per-user cache's base and osbuilder's own test variables reach pytest in every tox environment."""
    import configparser

    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    passed = {word.strip() for word in tox["testenv"]["passenv"].replace("\n", ",").split(",") if word.strip()}
    assert {s.name for s in TABLE} | {"XDG_CACHE_HOME", "OSBUILDER_*"} <= passed
    for section in tox.sections():
        if section.startswith("testenv:") and section != "testenv:lint":
            assert "passenv" not in tox[section], f"{section} would replace the list instead of inheriting it"
    assert "pytest" in tox["testenv"]["extras"]  # the plugin's extra: the CLI alone does not need pytest
