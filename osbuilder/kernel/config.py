"""Kernel config fragments: parse, merge, resolve with Kconfig, and verify the result.

The default fragment set is `DEFAULT_FRAGMENTS`, applied in that order; the other files in configs/
are the opt-in `OPTIONAL_FRAGMENTS` (debug, xfs). KERNEL_FRAGMENTS adds files (or built-in names
such as `debug` or `xfs`) after the defaults.
Later fragments win. The merged fragments go on top of `allnoconfig` (or of KERNEL_CONFIG) via the
kernel's own `scripts/kconfig/merge_config.sh`, and then every requested option is checked against
the final `.config`: Kconfig silently drops options whose dependencies are unmet, so each dropped
option is reported with the dependency that is not satisfied, read from the Kconfig files.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from osbuilder.errors import UsageError
from osbuilder.run import run
from osbuilder.settings import Settings

CONFIGS_DIR = Path(__file__).parent / "configs"

DEFAULT_FRAGMENTS: tuple[str, ...] = (
    "base", "serial", "virtio", "block", "filesystems", "systemd", "cgroups", "namespaces",
    "seccomp", "network", "vsock", "shared-fs", "dax", "hotplug", "kvm-guest", "power-button",
    "lean",  # last: it switches off what EXPERT exposes and requests back what the guest needs
)
OPTIONAL_FRAGMENTS: tuple[str, ...] = ("debug", "xfs")

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


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
        unset = _UNSET.match(line)
        if unset:
            out.append(Request(unset.group(1), "n", path, number))
            continue
        if not line or line.startswith("#"):
            continue
        match = _SET.match(line)
        if not match or not _valid_value(match.group(2)):
            raise UsageError(f"KERNEL_FRAGMENTS: {path}:{number}: not a config line: {line!r}",
                             "expected CONFIG_NAME=value or '# CONFIG_NAME is not set'")
        out.append(Request(match.group(1), match.group(2), path, number))
    return out


def _valid_value(value: str) -> bool:
    if value in ("y", "m", "n"):
        return True
    if value.startswith('"'):
        return len(value) >= 2 and value.endswith('"')
    return re.fullmatch(r"-?[0-9]+|0[xX][0-9a-fA-F]+", value) is not None


def builtin_fragment(name: str) -> Path:
    return CONFIGS_DIR / (name if name.endswith(".config") else f"{name}.config")


def resolve_fragments(settings: Settings) -> list[Path]:
    """The fragment files in the order they apply: osbuilder's defaults, then KERNEL_FRAGMENTS."""
    files = [builtin_fragment(name) for name in DEFAULT_FRAGMENTS]
    for item in settings.kernel_fragments:
        path = Path(item).expanduser()
        if not path.is_file() and "/" not in item and builtin_fragment(item).is_file():
            path = builtin_fragment(item)
        if not path.is_file():
            known = ", ".join(OPTIONAL_FRAGMENTS + DEFAULT_FRAGMENTS)
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


def read_config(path: Path) -> dict[str, str]:
    """A .config as {NAME: value}, with 'n' for '# CONFIG_X is not set' lines."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        unset = _UNSET.match(line)
        if unset:
            values[unset.group(1)] = "n"
            continue
        match = _SET.match(line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def honoured(requested: str, got: str | None) -> bool:
    if requested == "n":
        return got in (None, "n")
    return got == requested


# ---------------------------------------------------------------------------------------------
# Kconfig expressions: a small recursive-descent parser and a tristate evaluator

Expr = tuple


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith(("&&", "||", "!=", "<=", ">="), i):
            tokens.append(text[i:i + 2])
            i += 2
        elif c in "!()=<>":
            tokens.append(c)
            i += 1
        elif c in "\"'":
            end = i + 1
            while end < len(text) and text[end] != c:
                end += 2 if text[end] == "\\" else 1
            tokens.append(text[i:end + 1])
            i = end + 1
        elif text.startswith("$(", i):
            depth, end = 0, i + 1
            while end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
                if depth == 0:
                    break
            tokens.append(text[i:end])
            i = end
        else:
            match = re.match(r"[^\s!()=<>&|\"']+", text[i:])
            if not match:
                raise ValueError(f"unexpected {c!r} in {text!r}")
            tokens.append(match.group(0))
            i += len(match.group(0))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ValueError(f"unexpected end of {self.text!r}")
        self.pos += 1
        return token

    def parse(self) -> Expr:
        expr = self.parse_or()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r} in {self.text!r}")
        return expr

    def parse_or(self) -> Expr:
        left = self.parse_and()
        while self.peek() == "||":
            self.take()
            left = ("or", left, self.parse_and())
        return left

    def parse_and(self) -> Expr:
        left = self.parse_not()
        while self.peek() == "&&":
            self.take()
            left = ("and", left, self.parse_not())
        return left

    def parse_not(self) -> Expr:
        if self.peek() == "!":
            self.take()
            return ("not", self.parse_not())
        return self.parse_atom()

    def parse_atom(self) -> Expr:
        token = self.take()
        if token == "(":
            expr = self.parse_or()
            if self.take() != ")":
                raise ValueError(f"missing ')' in {self.text!r}")
            return expr
        left = _operand(token)
        if self.peek() in ("=", "!=", "<", ">", "<=", ">="):
            op = self.take()
            return ("cmp", op, left, _operand(self.take()))
        return left


def _operand(token: str) -> Expr:
    if token.startswith("$("):
        return ("macro", token)
    if token[0] in "\"'":
        return ("const", token[1:-1])
    return ("sym", token)


def parse_expr(text: str) -> Expr:
    return _Parser(text).parse()


def _raw(config: dict[str, str], name: str) -> str:
    if name in ("y", "m", "n") or (name not in config and re.fullmatch(r"-?[0-9]+|0[xX][0-9a-fA-F]+", name)):
        return name  # a constant
    value = config.get(name, "n")
    return value[1:-1] if value.startswith('"') else value


def _tri(value: str) -> int:
    return {"y": 2, "m": 1}.get(value, 0)


def _operand_text(expr: Expr, config: dict[str, str]) -> str:
    if expr[0] == "sym":
        return _raw(config, expr[1])
    return expr[1] if expr[0] == "const" else ""


def _compare(op: str, left: str, right: str) -> bool:
    if op in ("=", "!="):
        return (left == right) == (op == "=")
    try:
        a, b = int(left, 0), int(right, 0)
    except ValueError:
        a, b = left, right  # type: ignore[assignment]
    return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


def evaluate(expr: Expr, config: dict[str, str]) -> int:
    """Tristate value of `expr` (0 n, 1 m, 2 y). Macros like $(cc-option,...) count as y."""
    kind = expr[0]
    if kind == "sym":
        return _tri(_raw(config, expr[1]))
    if kind == "const":
        return _tri(expr[1])
    if kind == "macro":
        return 2
    if kind == "not":
        return 2 - evaluate(expr[1], config)
    if kind == "and":
        return min(evaluate(expr[1], config), evaluate(expr[2], config))
    if kind == "or":
        return max(evaluate(expr[1], config), evaluate(expr[2], config))
    if kind == "cmp":
        if any(side[0] == "macro" or "$(" in str(side[1]) for side in expr[2:]):
            return 2
        return 2 if _compare(expr[1], _operand_text(expr[2], config), _operand_text(expr[3], config)) else 0
    raise ValueError(f"bad expression {expr!r}")


def unmet(expr: Expr, config: dict[str, str], need: int = 2) -> list[str]:
    """The atoms that keep `expr` below `need`, e.g. ['BLK_DEV=n'] or ['!X86_32 (X86_32=y)']."""
    if evaluate(expr, config) >= need:
        return []
    kind = expr[0]
    if kind == "and":
        return unmet(expr[1], config, need) + unmet(expr[2], config, need)
    if kind == "or":
        return unmet(expr[1], config, need) + unmet(expr[2], config, need)
    if kind == "not":
        return [f"!{show_expr(expr[1])} ({show_value(expr[1], config)})"]
    if kind == "sym":
        return [f"{expr[1]}={_raw(config, expr[1])}"]
    if kind == "cmp":
        return [f"{show_expr(expr)} ({show_value(expr[2], config)})"]
    return [show_expr(expr)]


def show_value(expr: Expr, config: dict[str, str]) -> str:
    if expr[0] == "sym":
        return f"{expr[1]}={_raw(config, expr[1])}"
    return f"{show_expr(expr)}={'ynm'[[2, 0, 1].index(evaluate(expr, config))]}"


def show_expr(expr: Expr) -> str:
    kind = expr[0]
    if kind == "sym" or kind == "macro":
        return expr[1]
    if kind == "const":
        return f'"{expr[1]}"'
    if kind == "not":
        inner = show_expr(expr[1])
        return f"!{inner}" if expr[1][0] in ("sym", "macro") else f"!({inner})"
    if kind in ("and", "or"):
        op = " && " if kind == "and" else " || "
        parts = []
        for child in expr[1:]:
            text = show_expr(child)
            parts.append(f"({text})" if kind == "and" and child[0] == "or" else text)
        return op.join(parts)
    return f"{show_expr(expr[2])}{expr[1]}{show_expr(expr[3])}"


# ---------------------------------------------------------------------------------------------
# Kconfig files: which symbols exist, and on what each depends


@dataclass
class _Block:
    """An enclosing `if`, `menu` or `choice`: its conditions apply to every entry inside."""

    kind: str
    deps: list[str] = field(default_factory=list)


@dataclass
class Definition:
    """One `config`/`menuconfig` entry of a symbol (a symbol may be defined in several places)."""

    name: str
    file: Path
    line: int
    type: str = ""
    prompt: bool = False
    prompt_if: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)
    enclosing: list[_Block] = field(default_factory=list)

    def all_deps(self) -> list[str]:
        return [d for block in self.enclosing for d in block.deps] + self.deps

    def dependency(self) -> Expr:
        parts = [parse_expr(text) for text in self.all_deps()]
        expr: Expr = ("const", "y")
        for part in parts:
            expr = part if expr == ("const", "y") else ("and", expr, part)
        return expr


_TYPES = ("bool", "tristate", "string", "hex", "int", "def_bool", "def_tristate")


@dataclass
class KconfigIndex:
    """Every symbol the Kconfig tree (for one architecture) defines, and who selects whom."""

    root: Path
    version: str = ""
    symbols: dict[str, list[Definition]] = field(default_factory=dict)
    selected_by: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path, srcarch: str = "x86") -> KconfigIndex:
        index = cls(root, kernel_release(root))
        _KconfigReader(index, srcarch).read(root / "Kconfig")
        return index

    def exists(self, name: str) -> bool:
        return name in self.symbols

    def suggest(self, name: str) -> str | None:
        close = difflib.get_close_matches(name, self.symbols.keys(), n=1, cutoff=0.85)
        return close[0] if close else None


def kernel_release(root: Path) -> str:
    """'6.1' from the top Makefile (VERSION and PATCHLEVEL), '' if it cannot be read."""
    try:
        head = (root / "Makefile").read_text(errors="replace")[:2000]
    except OSError:
        return ""
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL)\s*=\s*(\S+)", head, re.M))
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}" if len(fields) == 2 else ""


class _KconfigReader:
    """Reads Kconfig files line by line, following `source` statements."""

    def __init__(self, index: KconfigIndex, srcarch: str) -> None:
        self.index = index
        self.srcarch = srcarch
        self.stack: list[_Block] = []
        self.current: Definition | _Block | None = None
        self.seen: set[Path] = set()

    def read(self, path: Path) -> None:
        if path in self.seen or not path.is_file():
            return
        self.seen.add(path)
        for number, line in _logical_lines(path.read_text(errors="replace")):
            self.statement(path, number, line)

    def statement(self, path: Path, number: int, line: str) -> None:
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word in ("config", "menuconfig"):
            self.define(path, number, rest)
        elif word in ("menu", "choice"):
            self.current = _Block(word)
            self.stack.append(self.current)
        elif word == "if":
            self.stack.append(_Block("if", [_strip_comment(rest)]))
            self.current = None
        elif word in ("endif", "endmenu", "endchoice"):
            if self.stack:
                self.stack.pop()
            self.current = None
        elif word == "comment":
            self.current = _Block("comment")
        elif word in ("source", "rsource", "osource", "orsource"):
            self.include(path, word, rest)
        elif word == "depends" and rest.startswith("on ") and self.current is not None:
            self.current.deps.append(_strip_comment(rest[3:]))
        elif isinstance(self.current, Definition):
            self.attribute(self.current, word, rest)

    def define(self, path: Path, number: int, name: str) -> None:
        definition = Definition(name.strip(), path.relative_to(self.index.root), number, enclosing=list(self.stack))
        self.index.symbols.setdefault(definition.name, []).append(definition)
        self.current = definition

    def attribute(self, d: Definition, word: str, rest: str) -> None:
        if word in _TYPES:
            d.type = word.removeprefix("def_")
            if not word.startswith("def_") and rest:
                self.prompt(d, rest)
        elif word == "prompt":
            self.prompt(d, rest)
        elif word == "select":
            target, _, cond = _strip_comment(rest).partition(" if ")
            self.index.selected_by.setdefault(target.strip(), []).append((d.name, cond.strip()))

    @staticmethod
    def prompt(d: Definition, rest: str) -> None:
        d.prompt = True
        match = re.match(r'^("(?:[^"\\]|\\.)*"|\'[^\']*\')\s*(?:if\s+(.+))?$', rest)
        if match and match.group(2):
            d.prompt_if.append(_strip_comment(match.group(2)))

    def include(self, path: Path, word: str, rest: str) -> None:
        target = _strip_comment(rest).strip("\"'")
        target = target.replace("$(SRCARCH)", self.srcarch).replace("$(srctree)/", "")
        base = path.parent if word.startswith(("r", "or")) else self.index.root
        pattern = str(base / target)
        matches = sorted(glob.glob(pattern)) if any(c in target for c in "*?[") else [pattern]
        saved = self.current
        for match in matches:
            self.read(Path(match))
        self.current = saved if saved is not None else None


def _strip_comment(text: str) -> str:
    out, quote = [], ""
    for c in text:
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        out.append(c)
    return "".join(out).strip()


def _logical_lines(text: str):
    """(line number, statement) pairs: continuations joined, comments and help text skipped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped in ("help", "---help---"):
            i = _skip_help(lines, i)
            continue
        yield number, " ".join(stripped.split())


def _skip_help(lines: list[str], i: int) -> int:
    indent = None
    while i < len(lines):
        line = lines[i].expandtabs(8)
        if not line.strip():
            i += 1
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            if depth == 0:
                return i
            indent = depth
        elif depth < indent:
            return i
        i += 1
    return i


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


def make_vars(cc: str) -> list[str]:
    return [f"CC={cc}"] if cc else []


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
    make = ["make", "-C", src, f"O={build_dir}", *make_vars(cc)]
    if base is None:
        allconfig = build_dir / "osbuilder-fragments.config"
        os.replace(build_dir / ".config", allconfig)
        run([*make, f"KCONFIG_ALLCONFIG={allconfig}", "allnoconfig"], step="kconfig", logfile=logfile, env=env,
            verbose=settings.debug)
    else:
        run([*make, "olddefconfig"], step="kconfig", logfile=logfile, env=env, verbose=settings.debug)
    return build_dir / ".config"


def configure(settings: Settings, src: Path, build_dir: Path, *, cc: str, logfile: Path,
              env: dict[str, str]) -> tuple[Merged, Path]:
    """Resolve, check, generate and verify; raise before anything compiles if an option is lost."""
    merged = merge(resolve_fragments(settings))
    index = KconfigIndex.load(src)
    check_names(merged, index)
    config_path = generate(settings, src, build_dir, merged, cc=cc, logfile=logfile, env=env)
    problems = verify(merged, read_config(config_path), index)
    if problems:
        raise report_problems(problems)
    return merged, config_path
