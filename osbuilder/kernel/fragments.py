"""osbuilder's kernel config policy: which fragments apply, how they merge, and proof they were honoured.

The default fragment set is `default_fragments(arch)`: `COMMON_FRAGMENTS` (files in configs/, one
concern each), then the architecture's own (its record's `kernel_fragments`: the console, RTC, boot
image), then `lean`, applied in that order; the opt-in `OPTIONAL_FRAGMENTS` are debug and xfs.
KERNEL_FRAGMENTS adds files (or built-in names such as `debug` or `xfs`) after the defaults, and
later fragments win. The merged fragments go on top of `allnoconfig` (or of KERNEL_CONFIG) via the
kernel's own `scripts/kconfig/merge_config.sh` (`configure`); then every requested option is checked
against the final `.config`: Kconfig silently drops options whose dependencies are unmet, so each
dropped option is reported with the dependency that is not satisfied, read from the Kconfig files
(the general model is kconfig.py). `show` is the `osbuilder kconfig show` report.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from osbuilder.arch import Arch, host
from osbuilder.errors import UsageError
from osbuilder.kernel.compilers import host_compiler
from osbuilder.kernel.kconfig import (
    Definition,
    KconfigIndex,
    config_line,
    evaluate,
    honoured,
    parse_expr,
    read_config,
    unmet,
    valid_value,
)
from osbuilder.layout import Workdir
from osbuilder.run import run
from osbuilder.settings import Settings

CONFIGS_DIR = Path(__file__).parent / "configs"

COMMON_FRAGMENTS: tuple[str, ...] = (
    "base", "virtio", "block", "filesystems", "systemd", "cgroups", "namespaces",
    "seccomp", "network", "vsock", "shared-fs", "dax", "hotplug", "power-button",
)
LAST_FRAGMENT = "lean"  # last: it switches off what EXPERT exposes and requests back what the guest needs
OPTIONAL_FRAGMENTS: tuple[str, ...] = ("debug", "xfs")


def default_fragments(guest: Arch) -> tuple[str, ...]:
    """The names of the fragments osbuilder applies for `guest`, in order."""
    return (*COMMON_FRAGMENTS, *guest.kernel_fragments, LAST_FRAGMENT)


# ---------------------------------------------------------------------------------------------
# fragments


@dataclass(frozen=True)
class Request:
    """One option a fragment asks for. `value` is spelled as in .config ('y', 'm', 'n', '"s"', '42')."""

    name: str
    value: str
    source: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.source.name}:{self.line}"

    def spelled(self) -> str:
        return f"# CONFIG_{self.name} is not set" if self.value == "n" else f"CONFIG_{self.name}={self.value}"


def parse_fragment(path: Path) -> list[Request]:
    """The options a fragment file sets, in file order. Bad lines are a KERNEL_FRAGMENTS error."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"KERNEL_FRAGMENTS: {path}: cannot read ({e.strerror})") from None
    out: list[Request] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        parsed = config_line(line)
        if parsed is None and (not line or line.startswith("#")):
            continue
        if parsed is None or not valid_value(parsed[1]):
            raise UsageError(f"KERNEL_FRAGMENTS: {path}:{number}: not a config line: {line!r}",
                             "expected CONFIG_NAME=value or '# CONFIG_NAME is not set'")
        out.append(Request(parsed[0], parsed[1], path, number))
    return out


def builtin_fragment(name: str) -> Path:
    return CONFIGS_DIR / (name if name.endswith(".config") else f"{name}.config")


def resolve_fragments(settings: Settings) -> list[Path]:
    """The fragment files in the order they apply: osbuilder's defaults, then KERNEL_FRAGMENTS."""
    files = [builtin_fragment(name) for name in default_fragments(settings.guest)]
    for item in settings.kernel_fragments:
        path = Path(item).expanduser()
        if not path.is_file() and "/" not in item and builtin_fragment(item).is_file():
            path = builtin_fragment(item)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.config")))
            raise UsageError(f"KERNEL_FRAGMENTS: {item}: no such file", f"built-in fragment names: {known}")
        files.append(path.resolve())
    return files


@dataclass
class Merged:
    """The options of all fragments, later ones winning, with the history of each option."""

    fragments: list[Path]
    requests: dict[str, Request] = field(default_factory=dict)
    overridden: dict[str, list[Request]] = field(default_factory=dict)


def merge(fragments: list[Path]) -> Merged:
    merged = Merged(list(fragments))
    for path in fragments:
        for req in parse_fragment(path):
            old = merged.requests.get(req.name)
            if old is not None and old.value != req.value:
                merged.overridden.setdefault(req.name, []).append(old)
            merged.requests[req.name] = req
    return merged


# ---------------------------------------------------------------------------------------------
# verification


def check_names(merged: Merged, index: KconfigIndex) -> None:
    """Fail on options that exist in no Kconfig file (typos), before anything runs."""
    bad = [r for r in merged.requests.values() if not index.exists(r.name)]
    for history in merged.overridden.values():
        bad += [r for r in history if not index.exists(r.name)]
    if not bad:
        return
    lines = []
    for r in bad:
        hint = index.suggest(r.name)
        lines.append(f"CONFIG_{r.name} in {r.source}:{r.line}: no such option"
                     + (f" (did you mean CONFIG_{hint}?)" if hint else ""))
    first = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise UsageError(f"KERNEL_FRAGMENTS: CONFIG_{first.name} in {first.source}: no such option in "
                     f"Linux {index.version or '?'}{more}", "\n".join(lines))


@dataclass(frozen=True)
class Problem:
    """A requested option the final config does not honour, and why."""

    request: Request
    got: str | None
    reasons: tuple[str, ...]
    unmet: tuple[str, ...] = ()

    def describe(self) -> str:
        got = "not set" if self.got in (None, "n") else self.got
        return f"{self.request.spelled()} ({self.request.where}): got {got}; " + "; ".join(self.reasons)


def verify(merged: Merged, config: dict[str, str], index: KconfigIndex) -> list[Problem]:
    """Every requested option that does not have its requested value in `config`."""
    problems = []
    for req in merged.requests.values():
        got = config.get(req.name)
        if not honoured(req.value, got):
            problems.append(explain(req, got, config, index, merged))
    return problems


def explain(req: Request, got: str | None, config: dict[str, str], index: KconfigIndex,
            merged: Merged) -> Problem:
    definitions = index.symbols.get(req.name, [])
    if not definitions:
        return Problem(req, got, (f"no such option in Linux {index.version}",))
    if req.value == "m" and config.get("MODULES") != "y":
        return Problem(req, got, ("=m needs CONFIG_MODULES=y and modules are off; use =y",), ("MODULES",))
    if req.value != "n":
        need = 1 if req.value == "m" else 2
        problem = _unmet_dependency(req, got, config, definitions, need, merged)
        if problem:
            return problem
        if not any(d.prompt for d in definitions):
            return Problem(req, got, ("it has no prompt: only another option's `select` can set it",))
    else:
        on = [f"CONFIG_{s}" for s, cond in index.selected_by.get(req.name, [])
              if config.get(s) in ("y", "m") and (not cond or evaluate(parse_expr(cond), config))]
        if on:
            return Problem(req, got, (f"selected by {', '.join(on)}",))
    return Problem(req, got, (f"Kconfig resolved it to {got or 'n'} (range, choice or default)",))


def _unmet_dependency(req: Request, got: str | None, config: dict[str, str], definitions: list[Definition],
                      need: int, merged: Merged) -> Problem | None:
    best: Definition | None = None
    for d in definitions:
        if evaluate(d.dependency(), config) >= need:
            best = None
            break
        best = best or d
    if best is None:
        visible = [d for d in definitions if d.prompt]
        for d in visible:
            for cond in d.prompt_if:
                atoms = unmet(parse_expr(cond), config, need)
                if atoms:
                    return Problem(req, got, (f"its prompt is only visible if {cond} ({', '.join(atoms)}; "
                                              f"{d.file}:{d.line})",), tuple(atoms))
        return None
    atoms = unmet(best.dependency(), config, need)
    notes = []
    for atom in atoms:
        name = re.sub(r"^!|[=!<> (].*$", "", atom)
        req_other = merged.requests.get(name)
        if req_other:
            notes.append(f"CONFIG_{name} is requested in {req_other.where} but was dropped too"
                         if not honoured(req_other.value, config.get(name)) else "")
    deps = " && ".join(f"({t})" if "||" in t else t for t in best.all_deps())
    reason = f"unmet dependency: {', '.join(atoms)} in `depends on {deps}` ({best.file}:{best.line})"
    return Problem(req, got, tuple([reason] + [n for n in notes if n]), tuple(atoms))


def report_problems(problems: list[Problem]) -> UsageError:
    first = problems[0]
    why = f" (unmet: {', '.join(first.unmet)})" if first.unmet else ""
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return UsageError(
        f"KERNEL_FRAGMENTS: CONFIG_{first.request.name} from {first.request.where} was dropped by Kconfig{why}{more}",
        "\n".join(p.describe() for p in problems))


# ---------------------------------------------------------------------------------------------
# generating the .config


def make_vars(cc: str, guest: Arch | None = None) -> list[str]:
    """make's variables for a kernel of `guest` (default: this host's) compiled with `cc`: the kernel's
    ARCH and CROSS_COMPILE (binutils come from CROSS_COMPILE; CC names the compiler itself); and HOSTCC,
    for kbuild's own programs (compilers.host_compiler).

    Both are always given, native builds included, because make takes the environment's otherwise, and
    osbuilder's own ARCH setting is an environment variable: `ARCH=x86_64 osbuilder kernel` left kbuild
    with ARCH=x86_64, whose .config and autoconf.h say "Linux/x86_64" where a build without ARCH says
    "Linux/x86". Every file then missed ccache, and the two configs differed. A CROSS_COMPILE left in a
    user's shell would give a native build another architecture's binutils."""
    guest = guest or host()
    return [f"ARCH={guest.kernel_arch}", f"CROSS_COMPILE={guest.cross_compile()}", *([f"CC={cc}"] if cc else []),
            f"HOSTCC={host_compiler()}"]


def generate(settings: Settings, src: Path, build_dir: Path, merged: Merged, *, cc: str,
             logfile: Path, env: dict[str, str]) -> Path:
    """Write build_dir/.config: fragments merged by merge_config.sh on allnoconfig or KERNEL_CONFIG."""
    build_dir.mkdir(parents=True, exist_ok=True)
    base = settings.kernel_config
    if base is not None and not base.is_file():
        raise UsageError(f"KERNEL_CONFIG: {base}: no such file")
    merge_script = src / "scripts" / "kconfig" / "merge_config.sh"
    inputs = ([base.resolve()] if base else []) + [Path(f) for f in merged.fragments]
    run([merge_script, "-m", "-O", build_dir, *inputs], step="kconfig", logfile=logfile, cwd=src, env=env,
        verbose=settings.debug)
    make: list[str | Path] = ["make", "-C", src, f"O={build_dir}", *make_vars(cc, settings.guest)]
    if base is None:
        allconfig = build_dir / "osbuilder-fragments.config"
        os.replace(build_dir / ".config", allconfig)
        run([*make, f"KCONFIG_ALLCONFIG={allconfig}", "allnoconfig"], step="kconfig", logfile=logfile, env=env,
            verbose=settings.debug)
    else:
        run([*make, "olddefconfig"], step="kconfig", logfile=logfile, env=env, verbose=settings.debug)
    return build_dir / ".config"


@dataclass(frozen=True)
class Checked:
    """The merged fragments whose option names the source's Kconfig knows, and that index."""

    merged: Merged
    index: KconfigIndex


def check_fragments(settings: Settings, src: Path) -> Checked:
    """Resolve, merge and check the names: every fragment error that needs no object tree, so a build
    raises it before it waits for the object tree's lock (held by another build for minutes)."""
    merged = merge(resolve_fragments(settings))
    index = KconfigIndex.load(src, settings.guest.kernel_arch)
    check_names(merged, index)
    return Checked(merged, index)


def configure(settings: Settings, src: Path, build_dir: Path, *, cc: str, logfile: Path,
              env: dict[str, str], checked: Checked | None = None) -> tuple[Merged, Path]:
    """Check (`checked`, else `check_fragments`), generate and verify; raise before anything compiles
    if an option is lost."""
    checked = checked or check_fragments(settings, src)
    merged = checked.merged
    config_path = generate(settings, src, build_dir, merged, cc=cc, logfile=logfile, env=env)
    problems = verify(merged, read_config(config_path), checked.index)
    if problems:
        raise report_problems(problems)
    return merged, config_path


# ---------------------------------------------------------------------------------------------
# `osbuilder kconfig show`


def latest_config(settings: Settings) -> Path | None:
    """The .config of the last configure in WORKDIR, else the config of the last published kernel."""
    workdir = Workdir.of(settings)
    for path in (workdir.kernel_build_for(settings.guest) / ".config", workdir.kernel.config):
        if path.is_file():
            return path
    return None


def show(settings: Settings) -> str:
    """Fragments in order, then each option: value, origin, overrides, and whether .config honours it."""
    merged = merge(resolve_fragments(settings))
    config_path = latest_config(settings)
    lines = ["fragments (applied in this order; later ones win):"]
    lines += [f"  {i:2d}. {p}" for i, p in enumerate(merged.fragments, 1)]
    base = settings.kernel_config or "allnoconfig"
    lines.append(f"base: {base}")
    lines.append(f"checked against: {config_path}" if config_path else "checked against: (no .config generated yet)")
    lines.append("")
    lines += _option_lines(merged, read_config(config_path) if config_path else None)
    return "\n".join(lines)


def _option_lines(merged: Merged, config: dict[str, str] | None) -> list[str]:
    width = max((len(r.spelled()) for r in merged.requests.values()), default=0)
    lines = []
    for name in sorted(merged.requests):
        req = merged.requests[name]
        text = f"  {req.spelled():<{width}}  {req.where:<22}"
        if config is not None:
            got = config.get(name)
            text += "  ok" if honoured(req.value, got) else f"  NOT HONOURED (got {got or 'n'})"
        older = merged.overridden.get(name)
        if older:
            text += "  overrides " + ", ".join(f"{o.value} from {o.where}" for o in older)
        lines.append(text.rstrip())
    return lines
