"""Subcommands as records: one `Step` per subcommand, owning every fact about it.

A step record says what the subcommand does (its handler and help), which flags of its own it takes,
which programs it needs (`check-deps`, and checked before it runs), which WORKDIR locks it holds while
it runs (the first exclusively, the others shared), and whether it runs in the USE_DOCKER tools
container. The parser (`cli.build_parser`), the locks (`cli.guard_process`), `check-deps`, the tools
image's package list and the container dispatch all read the records; none of them lists subcommands.

The records of osbuilder's own subcommands are in `cli.py`, next to their handlers. To add a
subcommand: write its handler there and `register(Step(...))`; a test may register one for its own
duration with `registered`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from osbuilder.deps import Tool
from osbuilder.errors import UsageError
from osbuilder.layout import Workdir
from osbuilder.settings import Settings

Handler = Callable[[Settings, argparse.Namespace], "int | None"]
Tools = tuple[Tool, ...] | Callable[[Settings], tuple[Tool, ...]]
Packages = tuple[str, ...] | Callable[[Settings], tuple[str, ...]]
Locks = Callable[[Workdir, Settings, argparse.Namespace], tuple[Path, ...]]


def no_locks(wd: Workdir, settings: Settings, args: argparse.Namespace) -> tuple[Path, ...]:
    return ()


def no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Step:
    name: str
    run: Handler
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = no_arguments  # adds the step's own flags
    tools: Tools = ()  # the programs it needs (a callable when they depend on the settings)
    packages: Packages = ()  # Debian packages it needs that have no program to look for (headers, sources)
    locks: Locks = no_locks  # WORKDIR lock files it holds while it runs: the first exclusively
    in_container: bool = False  # USE_DOCKER=yes runs it in the tools container
    # bisect-run's `--config` is the kernel config, as `git bisect run` users expect; its profile is --profile
    profile_flag: str = "--config"
    timed: bool = True  # logs "done in Ns" when it finishes
    console: Callable[[argparse.Namespace], bool] = lambda args: False  # it gives the user a terminal
    reads: tuple[str, ...] = ()  # the groups of settings it reads besides the general ones (its --help lists them)
    usage_exit: int = 2  # the exit code of a usage error (bisect-run: 128, which stops `git bisect run`)

    def needs(self, settings: Settings) -> tuple[Tool, ...]:
        """The programs this step runs under these settings."""
        return self.tools(settings) if callable(self.tools) else self.tools

    def needs_packages(self, settings: Settings) -> tuple[str, ...]:
        """Every Debian package this step needs under these settings: its programs' and the others."""
        others = self.packages(settings) if callable(self.packages) else self.packages
        return (*(t.package for t in self.needs(settings)), *others)


STEPS: dict[str, Step] = {}


def register(step: Step) -> Step:
    if step.name in STEPS:
        raise ValueError(f"step {step.name!r} is registered twice")
    STEPS[step.name] = step
    return step


@contextmanager
def registered(step: Step) -> Iterator[Step]:
    """`step` registered for the duration of a `with` block (tests)."""
    register(step)
    try:
        yield step
    finally:
        del STEPS[step.name]


def get(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise UsageError(f"no subcommand {name!r}; known: {', '.join(STEPS)}") from None


def packages(settings: Settings) -> list[str]:
    """Every Debian package the steps need under these settings (`check-deps --install`, the tools image)."""
    return sorted({pkg for step in STEPS.values() for pkg in step.needs_packages(settings)})


def in_container() -> tuple[str, ...]:
    """The subcommands USE_DOCKER=yes runs in the tools container."""
    return tuple(name for name, step in STEPS.items() if step.in_container)
