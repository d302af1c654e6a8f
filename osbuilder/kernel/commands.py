"""CLI handlers for `osbuilder kernel-src`, `osbuilder kernel` and `osbuilder kconfig show`."""

from __future__ import annotations

import argparse
from pathlib import Path

from osbuilder.kernel.build import build_dir, build_kernel
from osbuilder.kernel.config import Merged, honoured, merge, read_config, resolve_fragments
from osbuilder.kernel.source import ensure_source
from osbuilder.settings import Settings


def kernel_src(settings: Settings, args: argparse.Namespace) -> None:
    tree = ensure_source(settings)
    origin = tree.marker.get("spec", {}).get("location", settings.kernel_source)
    state = "unpacked" if tree.fresh else "already there, nothing to do"
    print(f"kernel source: {tree.path}: Linux {tree.version} from {origin} ({state})")


def kernel(settings: Settings, args: argparse.Namespace) -> None:
    result = build_kernel(settings, settings.workdir)
    meta = result.metadata
    print(f"kernel: Linux {result.version} built in {meta['duration_seconds']:.0f}s "
          f"(ccache: {meta['ccache'] or 'off'})")
    for name in ("vmlinuz.container", "vmlinux.container", "config.container", "System.map.container",
                 "kernel-metadata.json"):
        print(f"  {result.out_dir / name}")


def kconfig(settings: Settings, args: argparse.Namespace) -> None:
    if args.action == "show":
        print(show(settings))


def latest_config(settings: Settings) -> Path | None:
    for path in (build_dir(settings) / ".config", settings.workdir / "config.container"):
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
