"""`osbuilder kconfig bisect`: which option(s) between a good and a bad .config break the guest.

ktest's config bisect, aware of Kconfig: both configs are normalised against the same source tree
(configdiff.py); the options that differ are split, part of them is applied onto GOOD (with the
changed options they depend on, and choice switches whole), the result normalised and — unless
normalisation collapsed it into GOOD or BAD, in which case another split is tried without a
build — built and tested (verdicts.py). A good result becomes the new GOOD, a bad one the new BAD,
until no split is left: one option, or a set that cannot be separated, reported as it is.

    steps: confirm GOOD passes, confirm BAD fails, then at most ceil(log2 n) splits for one
    culprit among n options

Skips (infrastructure, a config that does not compile) are retried once when a retry can help,
then routed around: another split is tested instead. The state (current GOOD and BAD, every
step's verdict) is saved in WORKDIR/bisect after each step, so the same command resumes after
Ctrl-C or a reboot; `--reset` starts over, and a different pair is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osbuilder.errors import UsageError
from osbuilder.fs import write_atomically
from osbuilder.kernel import configdiff
from osbuilder.kernel.configdiff import Change, Normaliser
from osbuilder.kernel.kconfig import KconfigIndex, help_text
from osbuilder.kernel.verdicts import BAD, GOOD, SKIP, StepTest, Verdict, parse_test
from osbuilder.layout import Workdir
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")

STATE_FORMAT = 1
FOUND, NOT_AS_CLAIMED, INFRASTRUCTURE = "found", "not-as-claimed", "infrastructure"
EXIT_CODES = {FOUND: 0, NOT_AS_CLAIMED: 1, INFRASTRUCTURE: 125}

Tester = Callable[[Path, str], Verdict]


def pair_key(good_text: str, bad_text: str, test: str, source: dict[str, Any]) -> str:
    """What makes a saved bisection the same one: both files, the test and the kernel source."""
    blob = json.dumps([good_text, bad_text, test, source], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class State:
    """A bisection in progress (WORKDIR/bisect/state.json): the current GOOD and BAD as hashes of
    normalised configs kept in WORKDIR/bisect/configs, and every step done."""

    pair: str
    good_file: str
    bad_file: str
    test: str
    start_good: str = ""
    start_bad: str = ""
    good: str = ""
    bad: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None

    def step_of(self, sha: str) -> dict[str, Any] | None:
        """The last step that tested this config (its verdict stands), None if none did."""
        return next((s for s in reversed(self.steps) if s["config"] == sha), None)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("kconfig bisect: %s is unreadable; starting over", path)
            return None
        if data.pop("format", None) != STATE_FORMAT:
            return None
        return cls(**data)

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps({"format": STATE_FORMAT, **self.__dict__}, indent=2) + "\n")


@dataclass
class Configs:
    """Normalised configs by content hash, stored in WORKDIR/bisect/configs."""

    workdir: Workdir
    normaliser: Normaliser

    def add(self, values: dict[str, str]) -> tuple[str, dict[str, str]]:
        normal, text = self.normaliser.normalise(values)
        sha = configdiff.values_hash(normal)
        path = self.workdir.bisect_config(sha)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, text)
        return sha, normal

    def path(self, sha: str) -> Path:
        return self.workdir.bisect_config(sha)

    def values(self, sha: str) -> dict[str, str]:
        return configdiff.read_config(self.path(sha))


class Bisection:
    """The loop. `test(config, name)` judges one config; `index` is the source tree's Kconfig."""

    def __init__(self, state: State, configs: Configs, index: KconfigIndex, test: Tester, state_path: Path,
                 progress: Callable[[str], None] = log.info) -> None:
        self.state = state
        self.configs = configs
        self.index = index
        self.test = test
        self.state_path = state_path
        self.progress = progress

    # -- the steps ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.state.result is not None and self.state.result["status"] == INFRASTRUCTURE:
            self.state.result = None  # the machine may be fixed: try again
        if self.state.result is not None:
            self.progress(f"kconfig bisect: already finished ({len(self.state.steps)} steps); `--reset` runs it again")
            return self.state.result
        if self.state.steps:
            self.progress(f"kconfig bisect: resuming after {len(self.state.steps)} steps (state: {self.state_path})")
        for role, sha in (("GOOD", self.state.start_good), ("BAD", self.state.start_bad)):
            verdict = self.verdict_of(sha, f"confirm {role}", self.changes_between(self.state.start_good, sha))
            self.state.save(self.state_path)
            expected = GOOD if role == "GOOD" else BAD
            if verdict.verdict == SKIP:
                return self.finish(INFRASTRUCTURE, f"{role} could not be tested: {verdict.reason}")
            if verdict.verdict != expected:
                how = (f"fails the test in phase '{verdict.phase}': {verdict.reason}" if expected == GOOD
                       else "passes the test")
                return self.finish(NOT_AS_CLAIMED, f"{role} ({self.file_of(role)}) {how}")
        while True:
            changes = self.changes_between(self.state.good, self.state.bad)
            parts = configdiff.units(changes, self.index)
            if len(parts) <= 1:
                return self.finish(FOUND, "")
            if not self.split_step(changes, parts):
                return self.finish(FOUND, "no further split could be tested: every part collapsed into GOOD or "
                                          "BAD under normalisation, or was skipped")

    def split_step(self, changes: list[Change], parts: list[list[str]]) -> bool:
        """Test one split that normalisation does not collapse and that is not known to skip; move GOOD
        or BAD to it. False when no split is left."""
        good, bad = self.configs.values(self.state.good), self.configs.values(self.state.bad)
        for chosen in splits(parts):
            names = configdiff.needs([n for unit in chosen for n in unit], changes, self.index)
            applied = [c for c in changes if c.name in names]
            sha, values = self.configs.add(configdiff.apply(good, applied))
            if values == good or values == bad:
                log.info("kconfig bisect: %s collapse%s into %s under olddefconfig; splitting differently",
                         plural(len(applied), "option"), "s" if len(applied) == 1 else "",
                         "GOOD" if values == good else "BAD")
                continue
            if self.state.step_of(sha) is not None:
                continue  # tested before: skipped, or a config GOOD or BAD already moved past
            verdict = self.verdict_of(sha, "split", applied)
            if verdict.verdict == GOOD:
                self.state.good = sha
            elif verdict.verdict == BAD:
                self.state.bad = sha
            self.state.save(self.state_path)
            if verdict.verdict != SKIP:
                return True
        return False

    def verdict_of(self, sha: str, role: str, applied: list[Change]) -> Verdict:
        """The verdict for a config: remembered from an earlier step, or tested (a skip that a retry can
        help is retried once) and recorded; the caller saves the state once it has acted on it."""
        previous = self.state.step_of(sha)
        if previous is not None and previous["verdict"] in (GOOD, BAD):
            return Verdict(previous["verdict"], previous["phase"], previous["reason"])
        left = len([c for c in self.changes_between(self.state.good, self.state.bad) if c.settable])
        number = len(self.state.steps) + 1
        self.progress(f"kconfig bisect: step {number} of at most {self.bound()}: {role}, "
                      f"{plural(len(applied), 'option')} applied onto GOOD, {plural(left, 'option')} left; "
                      f"config {sha[:12]}")
        verdict = self.test(self.configs.path(sha), f"bisect-{sha[:12]}")
        if verdict.verdict == SKIP and verdict.retry:
            self.progress(f"kconfig bisect: step {number}: skip ({verdict.reason}); retrying once")
            verdict = self.test(self.configs.path(sha), f"bisect-{sha[:12]}-retry")
        self.state.steps.append({"step": number, "role": role, "config": sha, "options": [c.name for c in applied],
                                 **verdict.as_dict()})
        self.progress(f"kconfig bisect: step {number}: {verdict.verdict} (phase {verdict.phase}: {verdict.reason}) "
                      f"in {verdict.seconds.get('total', 0):.0f}s")
        return verdict

    def bound(self) -> int:
        """Steps done, plus at most what is left: the confirmations not done yet, then one split per
        halving of the options between the current GOOD and BAD."""
        roles = {s["role"] for s in self.state.steps}
        confirms = sum(1 for role in ("confirm GOOD", "confirm BAD") if role not in roles)
        parts = len(configdiff.units(self.changes_between(self.state.good, self.state.bad), self.index))
        return len(self.state.steps) + confirms + math.ceil(math.log2(max(parts, 1)))

    # -- the answer -----------------------------------------------------------------------------

    def changes_between(self, good_sha: str, bad_sha: str) -> list[Change]:
        return configdiff.diff(self.configs.values(good_sha), self.configs.values(bad_sha), self.index)

    def file_of(self, role: str) -> str:
        return self.state.good_file if role == "GOOD" else self.state.bad_file

    def finish(self, status: str, note: str) -> dict[str, Any]:
        result: dict[str, Any] = {"status": status, "note": note, "good_file": self.state.good_file,
                                  "bad_file": self.state.bad_file, "test": self.state.test, "steps": self.state.steps}
        if status == FOUND:
            start_good = self.configs.values(self.state.start_good)
            start_bad = self.configs.values(self.state.start_bad)
            remaining = self.changes_between(self.state.good, self.state.bad)
            cause = self.sole_cause(remaining)
            result["culprits"] = [self.describe(c, start_good, start_bad) for c in remaining if c.name in cause]
            result["follow"] = [c.as_dict() for c in remaining if c.name not in cause]
            adopted = configdiff.diff(start_good, self.configs.values(self.state.good), self.index)
            result["adopted"] = [c.as_dict() for c in adopted if c.settable]
            result["final_good_config"] = str(self.configs.path(self.state.good))
            result["final_bad_config"] = str(self.configs.path(self.state.bad))
        self.state.result = result
        self.state.save(self.state_path)
        return result

    def sole_cause(self, remaining: list[Change]) -> set[str]:
        """The settable options that could not be separated — unless applying one unit of them (with
        what it needs) onto GOOD already gives BAD: then that unit is the cause and the rest follow
        (e.g. options that only became visible, at their defaults, when the culprit came on)."""
        settable = {c.name for c in remaining if c.settable}
        good, bad = self.configs.values(self.state.good), self.configs.values(self.state.bad)
        causes = []
        candidates = configdiff.units(remaining, self.index) + [[name] for name in sorted(settable)]
        for unit in candidates:
            names = configdiff.needs(unit, remaining, self.index)
            if len(names) < len(settable):
                _, values = self.configs.add(configdiff.apply(good, [c for c in remaining if c.name in names]))
                if values == bad:
                    causes.append(names)
        return min(causes, key=len) if causes else settable

    def describe(self, change: Change, start_good: dict[str, str], start_bad: dict[str, str]) -> dict[str, Any]:
        definitions = self.index.symbols.get(change.name, [])
        text = next((t for t in (help_text(self.index.root, d) for d in definitions) if t), "")
        where = f"{definitions[0].file}:{definitions[0].line}" if definitions else ""
        return {"name": change.name, "good": start_good.get(change.name), "bad": start_bad.get(change.name),
                "tested_good": change.good, "tested_bad": change.bad, "help": text, "defined_at": where}


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def splits(parts: list[list[str]]) -> Iterator[list[list[str]]]:
    """Candidate subsets of `parts` to apply, best first: the halves (balanced by option count), then
    thirds and quarters, then each part alone."""
    seen: set[tuple[str, ...]] = set()
    for pieces in (2, 3, 4):
        for chunk in chunks(parts, pieces):
            key = tuple(n for unit in chunk for n in unit)
            if chunk and len(chunk) < len(parts) and key not in seen:
                seen.add(key)
                yield chunk
    for unit in parts:
        if (tuple(unit)) not in seen:
            seen.add(tuple(unit))
            yield [unit]


def chunks(parts: list[list[str]], pieces: int) -> list[list[list[str]]]:
    """`parts` cut into `pieces` consecutive runs of about equal option counts."""
    total = sum(len(u) for u in parts)
    out: list[list[list[str]]] = [[] for _ in range(pieces)]
    done = 0
    for unit in parts:
        index = min(pieces - 1, (2 * done + len(unit)) * pieces // (2 * total))  # where its middle falls
        out[index].append(unit)
        done += len(unit)
    return [c for c in out if c]


def format_result(result: dict[str, Any]) -> str:
    """The text report: the verdict, the culprit(s) with values and help, and the step log."""
    lines = []
    status = result["status"]
    if status == FOUND:
        culprits = result["culprits"]
        what = "the culprit" if len(culprits) == 1 else f"{len(culprits)} options that could not be separated"
        lines.append(f"kconfig bisect: found {what} in {len(result['steps'])} steps")
        if result["note"]:
            lines.append(f"  ({result['note']})")
        for c in culprits:
            lines.append(f"  CONFIG_{c['name']}: GOOD {configdiff.show(c['good'])}, BAD {configdiff.show(c['bad'])}"
                         f"  ({c['defined_at']})")
            for help_line in (c["help"] or "(no help text)").splitlines()[:12]:
                lines.append(f"      {help_line}")
        if result["adopted"]:
            lines.append(f"  tested on top of GOOD plus {len(result['adopted'])} options from BAD that passed: "
                         + ", ".join(a["name"] for a in result["adopted"][:12])
                         + (" ..." if len(result["adopted"]) > 12 else ""))
        if result["follow"]:
            lines.append("  with them change (no prompt, they follow): "
                         + ", ".join(f["name"] for f in result["follow"][:12]))
    elif status == NOT_AS_CLAIMED:
        lines.append(f"kconfig bisect: {result['note']}")
    else:
        lines.append(f"kconfig bisect: infrastructure made it impossible: {result['note']}")
    lines.append("  steps:")
    for s in result["steps"]:
        seconds = s.get("seconds", {})
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items() if k != "total")
        lines.append(f"    {s['step']:>2}. {s['role']:<13} config {s['config'][:12]}  {s['verdict']:<4}  "
                     f"phase {s['phase']:<10} {seconds.get('total', 0):6.0f}s  ({parts})  {s['reason'][:80]}")
    return "\n".join(lines)


def check_resume(state: State | None, pair: str, state_path: Path, reset: bool) -> State | None:
    """The saved state to resume, None to start over; another pair's state is refused (unless reset)."""
    if state is None or reset:
        return None
    if state.pair != pair:
        raise UsageError(f"WORKDIR: {state_path} holds a bisection of another pair (GOOD={state.good_file}, "
                         f"BAD={state.bad_file}, --test {state.test}); run with --reset to start over")
    return state


def kconfig_bisect(settings: Settings, good_path: Path, bad_path: Path, test: str = "boot", *,
                   reset: bool = False) -> dict[str, Any]:
    """`osbuilder kconfig bisect`: check every input before anything is built, then resume or start."""
    from osbuilder.kernel.source import origin
    from osbuilder.vm import check

    good, bad = configdiff.read_input(good_path, "GOOD"), configdiff.read_input(bad_path, "BAD")
    configdiff.require_different(good, bad, good_path, bad_path)
    parse_test(test)
    image = check.boot_image(settings) if test == "boot" else None
    wd = Workdir.of(settings)
    pair = pair_key(good_path.read_text(), bad_path.read_text(), test, origin(settings).identity)
    state = check_resume(State.load(wd.bisect_state), pair, wd.bisect_state, reset)
    logfile = wd.log("bisect")
    source = configdiff.against_source(settings, logfile)
    configs = Configs(wd, source.normaliser)
    if state is None:
        good_sha, good_norm = configs.add(good)
        bad_sha, bad_norm = configs.add(bad)
        configdiff.require_different(good_norm, bad_norm, good_path, bad_path, " after olddefconfig")
        state = State(pair, str(good_path), str(bad_path), test, good_sha, bad_sha, good_sha, bad_sha)
        state.save(wd.bisect_state)
    tester = StepTest(settings, test, tree=source.tree, out=wd.bisect_kernel, logfile=logfile, image=image)
    return Bisection(state, configs, source.index, tester, wd.bisect_state).run()
