"""The runtime's configuration as the runtime reads it, and the change an install makes to it.

What the runtime reads (`layers`, `effective`): its configuration file, then, for a runtime with drop-ins
(Kata 2.5+), every entry of `config.d/` beside it in lexical order, each file overriding the keys it
sets (tables merge key by key, any other value replaces: Go's katautils.updateFromDropIn and runtime-rs's
drop_in merge). A drop-in that is not valid TOML, or a directory there, makes Kata fail to start a pod,
so it is refused here too. The guest is named in the one `[hypervisor.<name>]` table (Kata ships one
per configuration-<hypervisor>.toml; with several it would pick one at random).

The change (`plan`): osbuilder's keys in that table (`keys_for`: `image`, or `initrd`, with the other set
to "" so the two never conflict; `kernel`) go
- into a drop-in, `config.d/50-osbuilder.toml`, merged with what an earlier install put there (an image
  install keeps the kernel key and the reverse); the configuration file is not touched; or
- into the configuration file itself (a runtime without drop-ins, or DROP_IN=no), edited with tomlkit so
  comments, inline ones too, and layout stay; the key that is not booted is commented out.
Either way the result is read back with the runtime's precedence and must name exactly the installed
paths (a later drop-in that overrides a key is named in the refusal), and an edit must leave every
other value as it was.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.items
from tomlkit.exceptions import TOMLKitError

from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.placement import Located

DROP_IN_NAME = "50-osbuilder.toml"
DROP_IN_HEADER = (
    "Written by osbuilder (install-image, install-initrd, install-kernel): the files it installed.",
    "Kata reads config.d/ after its configuration file, in lexical order; the last file to set a key wins.",
    "`osbuilder uninstall` takes osbuilder's keys out again (and this file, if nothing else is in it).",
)

# A runtime boots either an image or an initrd: pointing at one unsets the other.
EXCLUSIVE = {"image": "initrd", "initrd": "image"}


def keys_for(key: str, value: str) -> dict[str, str]:
    """osbuilder's keys for pointing `key` at `value`; "" is "none" (a drop-in sets it, an edit comments it out)."""
    other = EXCLUSIVE.get(key)
    return {key: value, other: ""} if other else {key: value}


@dataclass(frozen=True)
class Change:
    """What an install writes to the runtime's configuration: `new` as `target` (the drop-in, or the
    configuration file), which holds `old` now (None: it does not exist)."""

    located: Located
    target: Path
    drop_in: bool
    section: str
    keys: dict[str, str]
    old: bytes | None
    new: bytes

    @property
    def changes(self) -> bool:
        return self.new != self.old

    def diff(self) -> str:
        """The change as a unified diff (a new file: against /dev/null)."""
        old = (self.old or b"").decode()
        before = str(self.target) if self.old is not None else "/dev/null"
        return "".join(difflib.unified_diff(old.splitlines(True), self.new.decode().splitlines(True), before,
                                            str(self.target)))


# -- reading, with the runtime's precedence ----------------------------------------------------------


def parse(data: bytes, where: Path, *, then: str = "") -> dict[str, Any]:
    """`data` (the content of `where`) as TOML; a usage error naming the file if it is not."""
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError:
        raise UsageError(f"RUNTIME_CONFIG: {where} is not UTF-8 text{then}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"RUNTIME_CONFIG: {where} is not valid TOML ({e}){then}") from None


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: cannot read {path}: {e.strerror}") from None


def drop_in_files(config_d: Path | None) -> list[Path]:
    """Every entry of config.d, in the order the runtime reads them (lexical, by bytes)."""
    if config_d is None or not config_d.is_dir():
        return []
    return [config_d / name for name in sorted(os.listdir(config_d), key=os.fsencode)]


def layers(located: Located, replace: dict[str, bytes | None] | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """What the runtime reads, in its order: (file, its TOML) for the configuration file and each drop-in;
    `replace` stands in other content for drop-ins by name (None: as if absent)."""
    replace = replace or {}
    out = [(located.file, parse(read(located.file), located.file))]
    files = drop_in_files(located.drop_ins)
    names = {f.name for f in files}
    if located.drop_ins is not None:
        files += [located.drop_ins / name for name, data in replace.items() if data is not None and name not in names]
    broken = "; the runtime would fail to load its configuration"
    for f in sorted(files, key=lambda p: os.fsencode(p.name)):
        if f.name in replace:
            data = replace[f.name]
            if data is not None:
                out.append((f, parse(data, f, then=broken)))
            continue
        if not f.is_file():
            raise UsageError(f"RUNTIME_CONFIG: {f} is not a file; the runtime reads every entry of "
                             f"{f.parent} as a drop-in and would fail to load its configuration")
        out.append((f, parse(read(f), f, then=broken)))
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` applied to `base` as the runtime applies a drop-in: tables merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective(read_layers: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for _, parsed in read_layers:
        result = merge(result, parsed)
    return result


def hypervisor_section(parsed: dict[str, Any], where: str) -> str:
    """The name of the one [hypervisor.<name>] table."""
    tables = parsed.get("hypervisor", {})
    names = [name for name, table in tables.items() if isinstance(table, dict)] if isinstance(tables, dict) else []
    if not names:
        raise UsageError(f"RUNTIME_CONFIG: {where} has no [hypervisor.*] section")
    if len(names) > 1:
        raise UsageError(f"RUNTIME_CONFIG: {where} configures several hypervisors ({', '.join(names)}); "
                         "the runtime uses one of them")
    return names[0]


def section_of(parsed: dict[str, Any], section: str) -> dict[str, Any]:
    table = parsed.get("hypervisor", {}).get(section, {})
    return table if isinstance(table, dict) else {}


def check_points(read_layers: list[tuple[Path, dict[str, Any]]], section: str, keys: dict[str, str],
                 ours: Path) -> None:
    """The runtime, reading `read_layers`, ends up with exactly `keys` in [hypervisor.<section>] ("" also
    stands for absent); else a one-line refusal naming the file that sets the key last."""
    final = section_of(effective(read_layers), section)
    for key, value in keys.items():
        got = final.get(key, "")
        if got == value:
            continue
        setter = next((f for f, parsed in reversed(read_layers) if key in section_of(parsed, section)), ours)
        if setter != ours:
            raise UsageError(f"RUNTIME_CONFIG: {setter} sets {key} = {got!r} after {ours}, and the runtime reads "
                             f"it last: it would not use {value or 'none'!r}",
                             "drop-ins are read in lexical order, the last one to set a key wins; remove "
                             f"{key} from {setter.name}")
        raise OsbuilderError(f"RUNTIME_CONFIG: writing {ours} would not set {key} to {value!r} (read back "
                             f"{got!r}); not changed")


# -- planning the change ------------------------------------------------------------------------------


def plan(located: Located, keys: dict[str, str]) -> Change:
    """The change pointing the runtime at `keys`: its drop-in, or its configuration file, edited."""
    return plan_drop_in(located, keys) if located.drop_ins is not None else plan_edit(located, keys)


def drop_in_path(located: Located) -> Path:
    assert located.drop_ins is not None
    return located.drop_ins / DROP_IN_NAME


def read_drop_in(target: Path) -> bytes | None:
    """osbuilder's drop-in as it is now (None: absent); refused if something else has its name."""
    if target.is_symlink() or (os.path.lexists(target) and not target.is_file()):
        raise UsageError(f"RUNTIME_CONFIG: {target} is not osbuilder's drop-in (not a plain file); "
                         "move it away first")
    return read(target) if target.exists() else None


def plan_drop_in(located: Located, keys: dict[str, str]) -> Change:
    target = drop_in_path(located)
    old = read_drop_in(target)
    section = hypervisor_section(effective(layers(located, {target.name: None})), located.shown)
    doc = tomlkit.parse(old.decode()) if old is not None else new_drop_in()
    if old is not None:
        parse(old, target)
        stray = [name for name in doc.get("hypervisor", {}) if name != section]
        if stray:
            raise UsageError(f"RUNTIME_CONFIG: {target} sets [hypervisor.{stray[0]}], but {located.shown} "
                             f"configures {section}; run `osbuilder uninstall` first")
    table = doc.setdefault("hypervisor", tomlkit.table(is_super_table=True)).setdefault(section, tomlkit.table())
    for key, value in keys.items():
        table[key] = value
    new = tomlkit.dumps(doc).encode()
    check_points(layers(located, {target.name: new}), section, keys, target)
    return Change(located, target, True, section, keys, old, new)


def new_drop_in() -> tomlkit.TOMLDocument:
    doc = tomlkit.document()
    for line in DROP_IN_HEADER:
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    return doc


def plan_edit(located: Located, keys: dict[str, str]) -> Change:
    old = read(located.file)
    try:
        text = old.decode()
    except UnicodeDecodeError:
        raise UsageError(f"RUNTIME_CONFIG: {located.file} is not UTF-8 text") from None
    section = hypervisor_section(parse(old, located.file), str(located.file))
    new = edit_text(text, section, keys, located.file).encode()
    return Change(located, located.file, False, section, keys, old, new)


def edit_text(text: str, section: str, keys: dict[str, str], where: Path) -> str:
    """`text` with `keys` set in [hypervisor.<section>] (a "" value: the key commented out), comments and
    layout kept; refused unless it reads back as exactly the old values with those keys changed."""
    before = parse(text.encode(), where)
    try:
        doc = tomlkit.parse(text)
        table = doc["hypervisor"][section]
        for key, value in keys.items():
            if value == "":
                comment_out(table, key)
            else:
                set_key(table, key, value)
        result = tomlkit.dumps(doc)
    except (TOMLKitError, KeyError, TypeError) as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: cannot edit {where} ({e}); not changed") from None
    try:
        after = tomllib.loads(result)
    except tomllib.TOMLDecodeError as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: editing {where} would leave invalid TOML ({e}); not changed")
    wanted = copy.deepcopy(before)
    for key, value in keys.items():
        if value:
            wanted["hypervisor"][section][key] = value
        else:
            wanted["hypervisor"][section].pop(key, None)
    if after != wanted:
        changed = sorted(set(section_of(after, section).items()) ^ set(section_of(wanted, section).items()))
        raise OsbuilderError(f"RUNTIME_CONFIG: editing {where} would not set exactly {keys} "
                             f"(read back differs: {changed or 'outside the section'}); not changed")
    return result


def point_config(text: str, key: str, value: str, where: Path) -> str:
    """`text` of a configuration file with `key` pointed at `value` in its [hypervisor.*] table (and the
    image or initrd that is not booted commented out)."""
    section = hypervisor_section(parse(text.encode(), where), str(where))
    return edit_text(text, section, keys_for(key, value), where)


def body_index(table: Any, key: str) -> int | None:
    """Where `key` is in a tomlkit table's body (None: not there, or not a plain table)."""
    if not isinstance(table, tomlkit.items.Table):
        return None
    for i, (k, _) in enumerate(table.value.body):
        if k is not None and k.key == key:
            return i
    return None


def set_key(table: Any, key: str, value: str) -> None:
    """Set `key`: in place when it is there (its inline comment and indent stay), else after the line that
    has it commented out, else after the table's last key (before the comments and blank lines that lead
    to the next table)."""
    if key in table or not isinstance(table, tomlkit.items.Table):
        table[key] = value
        return
    body = table.value.body
    commented = re.compile(rf"#\s*{re.escape(key)}\s*=")
    hints = [i for i, (k, item) in enumerate(body)
             if k is None and isinstance(item, tomlkit.items.Comment) and commented.match(item.as_string().strip())]
    last = hints[-1] if hints else max((i for i, (k, _) in enumerate(body) if k is not None), default=-1)
    if last + 1 < len(body):
        table.value._insert_at(last + 1, key, value)  # tomlkit has no public positional insert
    else:
        table[key] = value


def comment_out(table: Any, key: str) -> None:
    """Turn `key = value  # comment` into `# key = value  # comment` on its own line; nothing if absent."""
    if key not in table:
        return
    i = body_index(table, key)
    if i is None:
        del table[key]
        return
    k, item = table.value.body[i]
    line = f"{k.as_string()}{k.sep}{item.as_string()}{item.trivia.comment_ws}{item.trivia.comment}"
    table.remove(key)  # leaves a placeholder at i that no key refers to
    trivia = tomlkit.items.Trivia(indent=item.trivia.indent, comment_ws="", comment="# " + line.strip(),
                                  trail=item.trivia.trail or "\n")
    table.value.body[i] = (None, tomlkit.items.Comment(trivia))


# -- taking osbuilder's keys out again ----------------------------------------------------------------


def without_keys(data: bytes, section: str, keys: list[str], where: Path) -> bytes | None:
    """A drop-in without osbuilder's `keys` (an emptied table goes too); None when no key is left in it."""
    doc = tomlkit.parse(data.decode())
    hypervisor = doc.get("hypervisor", {})
    table = hypervisor.get(section)
    for key in keys:
        if table is not None and key in table:
            del table[key]
    if table is not None and not table:
        del hypervisor[section]
    if "hypervisor" in doc and not doc["hypervisor"]:
        del doc["hypervisor"]
    if not doc:
        return None
    result = tomlkit.dumps(doc).encode()
    parse(result, where)
    return result
