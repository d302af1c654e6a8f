"""Compare two kernel configs as Kconfig sees them: check, normalise, diff, group (`kconfig diff`).

- `read_input` refuses what is not a kernel .config for this machine (missing, not config lines,
  another architecture) in one line naming GOOD or BAD;
- `Normaliser` runs `make olddefconfig` on a config in a scratch object tree of one source tree, so
  configs are compared after Kconfig filled in defaults and dropped what dependencies forbid;
- `diff` lists the options whose values differ (`Change`); an option without a prompt cannot be set,
  it only follows from others (`settable` False);
- `groups` puts together options that can only change together: one depends on, selects, or shares
  a `choice` with the other (what `kconfig diff` shows);
- `units` and `needs` are what bisection splits: a choice switch is one unit, and a change that turns
  an option on drags along the changed options its dependencies name.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from osbuilder import arch as arch_mod
from osbuilder.errors import UsageError
from osbuilder.fs import discard, publish, temp_beside
from osbuilder.kernel.kconfig import Definition, Expr, KconfigIndex, config_line, parse_expr, read_config
from osbuilder.kernel.source import SourceTree
from osbuilder.layout import Workdir
from osbuilder.run import run
from osbuilder.settings import Settings

# an architecture's own symbol, and the name `make ARCH=` and the config header use for it
ARCH_SYMBOLS = {"X86": "x86", "ARM64": "arm64", "ARM": "arm", "RISCV": "riscv", "PPC": "powerpc",
                "S390": "s390", "MIPS": "mips", "LOONGARCH": "loongarch", "SPARC": "sparc", "PARISC": "parisc",
                "ALPHA": "alpha", "M68K": "m68k", "SH": "sh", "XTENSA": "xtensa", "MICROBLAZE": "microblaze"}
_HEADER = re.compile(r"^# Linux/(\S+) ")


def read_input(path: Path, what: str) -> dict[str, str]:
    """The options of the config file `path` given as `what` (GOOD, BAD, --config), checked to be a
    kernel .config for this machine's architecture."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{what}: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: {path}: cannot read it as a kernel config ({getattr(e, 'strerror', e)})") from None
    values: dict[str, str] = {}
    header_arch = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        parsed = config_line(line)
        if parsed:
            values[parsed[0]] = parsed[1]
        elif _HEADER.match(line):
            header_arch = _HEADER.match(line).group(1)  # type: ignore[union-attr]
        elif line and not line.startswith("#"):
            raise UsageError(f"{what}: {path} is not a kernel config (line {number}: {line[:60]!r})")
    if not values:
        raise UsageError(f"{what}: {path} is not a kernel config (no CONFIG_ lines)")
    check_arch(values, header_arch, path, what)
    return values


def check_arch(values: dict[str, str], header_arch: str, path: Path, what: str) -> None:
    machine = platform.machine()
    record = arch_mod.of_machine(machine)  # the kernel's name of this machine (arch.py), if osbuilder has one
    arch = record.kernel_arch if record is not None else ""
    if not arch:
        return
    others = [name for sym, name in ARCH_SYMBOLS.items() if values.get(sym) == "y" and name != arch]
    found = others[0] if others else (header_arch if header_arch and header_arch != arch else "")
    if not found and arch == "x86" and (values.get("X86_32") == "y" or values.get("64BIT") == "n"):
        found = "i386 (32-bit x86)"
    if found:
        raise UsageError(f"{what}: {path} is a config for {found}, and this machine builds {machine} kernels")


def config_text(values: dict[str, str]) -> str:
    """A .config with these values, one line per option, sorted."""
    lines = [f"# CONFIG_{name} is not set" if value == "n" else f"CONFIG_{name}={value}"
             for name, value in sorted(values.items())]
    return "\n".join(lines) + "\n"


def values_hash(values: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(values.items())).encode()).hexdigest()


class Normaliser:
    """`make olddefconfig` of any config against one source tree, in a scratch object tree (under a
    file lock, so two runs in one WORKDIR take turns); results are remembered by input."""

    def __init__(self, src: Path, scratch: Path, *, make_vars: list[str], env: dict[str, str], logfile: Path,
                 verbose: bool = False) -> None:
        self.src = src
        self.scratch = scratch
        self.make_vars = make_vars
        self.env = env
        self.logfile = logfile
        self.verbose = verbose
        self._seen: dict[str, tuple[dict[str, str], str]] = {}

    def normalise(self, values: dict[str, str]) -> tuple[dict[str, str], str]:
        """(values, .config text) of `values` after olddefconfig."""
        key = values_hash(values)
        if key not in self._seen:
            self._seen[key] = self._olddefconfig(config_text(values))
        return self._seen[key]

    def _olddefconfig(self, text: str) -> tuple[dict[str, str], str]:
        self.scratch.mkdir(parents=True, exist_ok=True)
        config = self.scratch / ".config"
        with FileLock(str(self.scratch) + ".lock"):
            tmp = temp_beside(config)
            try:
                tmp.write_text(text)
                publish(tmp, config)
            finally:
                discard(tmp)
            run(["make", "-s", "-C", self.src, f"O={self.scratch}", *self.make_vars, "olddefconfig"],
                step="kconfig", logfile=self.logfile, env=self.env, verbose=self.verbose)
            out = config.read_text()
        return read_config(config), out


@dataclass(frozen=True)
class Change:
    """One option whose value differs: `good`/`bad` as .config spells them, None when absent."""

    name: str
    good: str | None
    bad: str | None
    settable: bool = True

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "good": self.good, "bad": self.bad, "settable": self.settable}


def show(value: str | None) -> str:
    return "not set" if value in (None, "n") else value


def diff(good: dict[str, str], bad: dict[str, str], index: KconfigIndex) -> list[Change]:
    """Every option whose value differs ('n' and absent are the same), sorted by name."""
    out = []
    for name in sorted(set(good) | set(bad)):
        g, b = good.get(name), bad.get(name)
        if (g or "n") == (b or "n"):
            continue
        settable = any(d.prompt for d in index.symbols.get(name, []))
        out.append(Change(name, g, b, settable))
    return out


def symbols_in(expr: Expr) -> set[str]:
    kind = expr[0]
    if kind == "sym":
        return {expr[1]}
    if kind == "cmp":
        return symbols_in(expr[2]) | symbols_in(expr[3])
    if kind in ("and", "or", "not"):
        return set().union(*(symbols_in(e) for e in expr[1:]))
    return set()


def _dependency_symbols(definitions: Iterable[Definition]) -> set[str]:
    names: set[str] = set()
    for d in definitions:
        names |= symbols_in(d.dependency())
        for cond in d.prompt_if:
            try:
                names |= symbols_in(parse_expr(cond))
            except ValueError:
                continue
    return names


def _choices(definitions: Iterable[Definition]) -> set[int]:
    return {id(block) for d in definitions for block in d.enclosing if block.kind == "choice"}


class _Sets:
    """Union-find over names."""

    def __init__(self, names: Iterable[str]) -> None:
        self.parent = {n: n for n in names}

    def find(self, n: str) -> str:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def classes(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.parent:
            out.setdefault(self.find(n), []).append(n)
        return sorted((sorted(v) for v in out.values()), key=lambda v: v[0])


def _join_choices(sets: _Sets, changes: list[Change], index: KconfigIndex) -> None:
    owner: dict[int, str] = {}
    for c in changes:
        for choice in _choices(index.symbols.get(c.name, [])):
            if choice in owner:
                sets.union(c.name, owner[choice])
            owner.setdefault(choice, c.name)


def _default_symbols(definitions: Iterable[Definition]) -> set[str]:
    """The symbols a definition's `default` lines name (value and condition)."""
    names: set[str] = set()
    for d in definitions:
        for text in d.defaults:
            for part in text.split(" if ", 1):
                try:
                    names |= symbols_in(parse_expr(part))
                except ValueError:
                    continue
    return names


def groups(changes: list[Change], index: KconfigIndex) -> list[list[Change]]:
    """Changes that can only change together: connected by `depends on`, `select` or a shared choice,
    and an option without a prompt with the options its defaults name."""
    by_name = {c.name: c for c in changes}
    sets = _Sets(by_name)
    for c in changes:
        definitions = index.symbols.get(c.name, [])
        related = _dependency_symbols(definitions) | (set() if c.settable else _default_symbols(definitions))
        for other in related & by_name.keys():
            sets.union(c.name, other)
        for selector, _ in index.selected_by.get(c.name, []):
            if selector in by_name:
                sets.union(c.name, selector)
    _join_choices(sets, changes, index)
    return [[by_name[n] for n in names] for names in sets.classes()]


def follows(change: Change, changes: list[Change], index: KconfigIndex) -> bool:
    """Whether a change is only the consequence of another: the option is not even visible in BAD, and
    one of its dependencies changed (EXT4_FS_SECURITY disappears when EXT4_FS goes off)."""
    if change.bad is not None or not change.settable:
        return False
    changed = {c.name for c in changes} - {change.name}
    return bool(_dependency_symbols(index.symbols.get(change.name, [])) & changed)


def units(changes: list[Change], index: KconfigIndex) -> list[list[str]]:
    """What bisection splits: each settable option alone, except that the members of one choice
    switch together (setting one member on without the other off is undone by Kconfig); options that
    only disappear with a changed dependency are not split off (they follow it). Ordered group by
    group (`groups`), so that a half keeps related options together."""
    settable = [c for c in changes if c.settable and not follows(c, changes, index)]
    sets = _Sets(c.name for c in settable)
    _join_choices(sets, settable, index)
    order = {c.name: i for i, group in enumerate(groups(changes, index)) for c in group}
    return sorted(sets.classes(), key=lambda unit: (order.get(unit[0], 0), unit))


def needs(names: Iterable[str], changes: list[Change], index: KconfigIndex) -> set[str]:
    """`names` plus every changed settable option they depend on, transitively, where the change turns
    the option on (turning one off takes its dependents along by itself)."""
    by_name = {c.name: c for c in changes if c.settable}
    out = set(names)
    todo = list(out)
    while todo:
        c = by_name.get(todo.pop())
        if c is None or c.bad in (None, "n"):
            continue
        for dep in _dependency_symbols(index.symbols.get(c.name, [])) & by_name.keys():
            if dep not in out:
                out.add(dep)
                todo.append(dep)
    return out


def apply(base: dict[str, str], changes: Iterable[Change]) -> dict[str, str]:
    """`base` with the BAD value of each change."""
    values = dict(base)
    for c in changes:
        values[c.name] = c.bad if c.bad is not None else "n"
    return values


def report(changes: list[Change], index: KconfigIndex, *, good: Path, bad: Path) -> str:
    """`kconfig diff`'s text: each group of options that change together, with both values."""
    found = groups(changes, index)
    settable = sum(c.settable for c in changes)
    lines = [f"kconfig diff: GOOD={good} BAD={bad} (both normalised with olddefconfig against Linux "
             f"{index.version or '?'})",
             f"{len(changes)} options differ ({settable} settable, {len(changes) - settable} follow from others), "
             f"in {len(found)} groups of options that change together:"]
    width = max((len(c.name) for c in changes), default=0) + 7
    for number, group in enumerate(found, 1):
        lines.append(f"  group {number}:")
        for c in group:
            note = "" if c.settable else "  (no prompt: follows from others)"
            lines.append(f"    {'CONFIG_' + c.name:<{width}} {show(c.good):>12} -> {show(c.bad)}{note}")
    return "\n".join(lines)


def report_json(changes: list[Change], index: KconfigIndex, *, good: Path, bad: Path) -> str:
    return json.dumps({"good": str(good), "bad": str(bad), "kernel": index.version,
                       "options": len(changes),
                       "groups": [[c.as_dict() for c in g] for g in groups(changes, index)]}, indent=2)


@dataclass
class Against:
    """A source tree to compare configs against: its Kconfig index and a normaliser."""

    tree: SourceTree
    index: KconfigIndex
    normaliser: Normaliser


def against_source(settings: Settings, logfile: Path) -> Against:
    """KERNEL_SOURCE's tree (unpacked if needed), with the compiler and environment a build uses (Kconfig
    asks the compiler what it supports)."""
    from osbuilder.kernel.build import build_env, compiler
    from osbuilder.kernel.fragments import make_vars
    from osbuilder.kernel.source import ensure_source

    tree = ensure_source(settings, logfile=logfile)
    normaliser = Normaliser(tree.path, Workdir.of(settings).kconfig_scratch, make_vars=make_vars(compiler()[0]),
                            env=build_env(settings, tree), logfile=logfile, verbose=settings.debug)
    return Against(tree, KconfigIndex.load(tree.path), normaliser)


def require_different(good: dict[str, str], bad: dict[str, str], good_path: Path, bad_path: Path,
                      when: str = "") -> None:
    if good == bad:
        raise UsageError(f"BAD: {bad_path} is the same config as GOOD {good_path}{when}; nothing differs")


def kconfig_diff(settings: Settings, good_path: Path, bad_path: Path) -> tuple[list[Change], KconfigIndex]:
    """`osbuilder kconfig diff GOOD BAD`: both checked, normalised against KERNEL_SOURCE, compared."""
    good, bad = read_input(good_path, "GOOD"), read_input(bad_path, "BAD")
    require_different(good, bad, good_path, bad_path)
    source = against_source(settings, Workdir.of(settings).log("kconfig"))
    good_norm, _ = source.normaliser.normalise(good)
    bad_norm, _ = source.normaliser.normalise(bad)
    return diff(good_norm, bad_norm, source.index), source.index
