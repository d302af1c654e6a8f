"""Where a test run's time goes, worker by worker: reads the file OSBUILDER_TIMELINE names.

    OSBUILDER_TIMELINE=/tmp/run.jsonl .venv/bin/python -m pytest -n 2 --dist loadgroup tests boot_tests
    python3 bench/timeline.py /tmp/run.jsonl [--top 25]

Prints the run's wall time; per worker its busy time, when it finished and how long it then sat idle
while the other still ran; the longest tests (setup, where the build fixtures run, shown apart from the
call); and the time per module. conftest.py writes one line per test phase from the worker that ran it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    records = load(args.timeline)
    if not records:
        raise SystemExit(f"{args.timeline}: no records (was OSBUILDER_TIMELINE set for the run?)")
    begin, end = min(r["start"] for r in records), max(r["stop"] for r in records)
    print(f"wall {end - begin:.0f}s, {len({r['test'] for r in records})} tests")

    per_worker: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        per_worker[r["worker"]].append(r)
    for worker, rs in sorted(per_worker.items()):
        busy = sum(r["stop"] - r["start"] for r in rs)
        finished = max(r["stop"] for r in rs)
        print(f"{worker}: busy {busy:.0f}s, finished at {finished - begin:.0f}s, idle at the end {end - finished:.0f}s")

    tests: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    started: dict[str, tuple[float, str]] = {}
    for r in records:
        tests[r["test"]][r["when"]] += r["stop"] - r["start"]
        if r["when"] == "setup":
            started[r["test"]] = (r["start"] - begin, r["worker"])
    print(f"\nlongest {args.top} (seconds: total = setup + call + teardown; started at, on)")
    ranked = sorted(tests.items(), key=lambda kv: -sum(kv[1].values()))
    for name, phases in ranked[:args.top]:
        at, worker = started.get(name, (0.0, "?"))
        split = f"{phases['setup']:5.0f} + {phases['call']:5.0f} + {phases['teardown']:4.0f}"
        print(f"{sum(phases.values()):7.0f} = {split}   at {at:5.0f}s on {worker}  {name}")

    cpu = cpu_per_test(per_worker)
    if cpu:
        print(f"\nCPU (user + system of each worker and the children it waited for): {sum(cpu.values()):.0f}s; "
              f"most, top {args.top}")
        for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"{seconds:7.0f}  {name}")

    modules: dict[str, float] = defaultdict(float)
    for name, phases in tests.items():
        modules[name.split("::")[0]] += sum(phases.values())
    print("\nmodules, longest first")
    for module, seconds in sorted(modules.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{seconds:7.0f}  {module}")


def cpu_per_test(per_worker: dict[str, list[dict]]) -> dict[str, float]:
    """Each test's CPU seconds: a worker's cumulative `cpu` at each record, minus that at its previous record
    (the first test's includes the worker's start; empty for a timeline written before records carried
    `cpu`). Work a test hands to a daemon (podman's conmon, an sshd on another host) is not counted."""
    spent: dict[str, float] = defaultdict(float)
    for rs in per_worker.values():
        last = 0.0
        for r in sorted(rs, key=lambda r: r["stop"]):
            if "cpu" not in r:
                return {}
            spent[r["test"]] += r["cpu"] - last
            last = r["cpu"]
    return dict(spent)


if __name__ == "__main__":
    main()
