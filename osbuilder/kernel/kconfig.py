"""The general Kconfig model: .config files, Kconfig expressions and the Kconfig tree of a kernel.

Nothing here knows about osbuilder's fragments or settings; it answers questions about any Linux
source tree and any .config:

- `read_config`, `config_line`, `valid_value`, `honoured`: the `.config` format (`CONFIG_X=value`,
  `# CONFIG_X is not set`) and whether a value asked for is the value obtained;
- `parse_expr`, `evaluate`, `unmet`, `show_expr`: Kconfig's `depends on` / `if` expressions, a small
  recursive-descent parser and a tristate evaluator that names the atoms keeping an expression down;
- `KconfigIndex`, `Definition`: every symbol the Kconfig files (for one architecture) define, on
  what each depends, whether it has a prompt, and who selects whom;
- `kernel_release`: '6.1' from a tree's top Makefile.
"""

from __future__ import annotations

import difflib
import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")
_NUMBER = re.compile(r"-?[0-9]+|0[xX][0-9a-fA-F]+")


# ---------------------------------------------------------------------------------------------
# .config files


def config_line(line: str) -> tuple[str, str] | None:
    """(NAME, value) of one .config line, value 'n' for '# CONFIG_X is not set'; None for any other line."""
    line = line.strip()
    unset = _UNSET.match(line)
    if unset:
        return unset.group(1), "n"
    match = _SET.match(line)
    return (match.group(1), match.group(2)) if match else None


def valid_value(value: str) -> bool:
    """Whether `value` is spelled as .config spells a value: y, m, n, a quoted string or a number."""
    if value in ("y", "m", "n"):
        return True
    if value.startswith('"'):
        return len(value) >= 2 and value.endswith('"')
    return _NUMBER.fullmatch(value) is not None


def read_config(path: Path) -> dict[str, str]:
    """A .config as {NAME: value}, with 'n' for '# CONFIG_X is not set' lines."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        parsed = config_line(raw)
        if parsed:
            values[parsed[0]] = parsed[1]
    return values


def honoured(requested: str, got: str | None) -> bool:
    """Whether a .config value `got` (None: absent) is what was `requested` ('n' is also met by absence)."""
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
    if name in ("y", "m", "n") or (name not in config and _NUMBER.fullmatch(name)):
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
    defaults: list[str] = field(default_factory=list)  # `default VALUE [if COND]` as written
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
            if word.startswith("def_") and rest:
                d.defaults.append(_strip_comment(rest))
            elif rest:
                self.prompt(d, rest)
        elif word == "default":
            d.defaults.append(_strip_comment(rest))
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


def help_text(root: Path, definition: Definition) -> str:
    """The `help` text of one definition, dedented ('' when it has none)."""
    try:
        lines = (root / definition.file).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    i = definition.line  # the line after `config NAME`
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped in ("help", "---help---"):
            end = _skip_help(lines, i + 1)
            body = [line.expandtabs(8) for line in lines[i + 1:end]]
            indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
            return "\n".join(b[indent:].rstrip() for b in body).strip()
        if lines[i][:1] not in (" ", "\t", "") and not stripped.startswith("#"):
            return ""  # the next entry began: no help
        i += 1
    return ""
