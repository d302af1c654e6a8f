"""Reading what systemd prints in the guest: time spans, `systemd-analyze time`, failed units."""

from __future__ import annotations

import re

SPAN = re.compile(r"(?P<num>\d+(?:\.\d+)?)(?P<unit>min|ms|us|h|s)")
STARTUP = re.compile(r"Startup finished in (?P<parts>.*?) = (?P<total>[^\n]+?)\s*$", re.MULTILINE)
UNIT_SECONDS = {"h": 3600.0, "min": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def parse_span(text: str) -> float:
    """systemd's time span ("1min 2.5s", "865ms") in seconds."""
    return round(sum(float(m["num"]) * UNIT_SECONDS[m["unit"]] for m in SPAN.finditer(text)), 3)


def parse_startup(text: str) -> dict[str, float]:
    """`systemd-analyze time` output -> {"kernel": s, "initrd": s, "userspace": s, "total": s}."""
    m = STARTUP.search(text)
    if not m:
        return {}
    out = {}
    for part in m["parts"].split(" + "):
        label = re.search(r"\((\w+)\)", part)
        if label:
            out[label.group(1)] = parse_span(part)
    out["total"] = parse_span(m["total"])
    return out


def parse_failed_units(text: str) -> list[str]:
    """Unit names from `systemctl list-units --failed --no-legend --plain`."""
    names = []
    for line in text.splitlines():
        words = line.replace("●", " ").split()
        if words:
            names.append(words[0])
    return names
