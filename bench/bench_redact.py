"""Benchmark: hiding credentials in a line of output, against the pattern osbuilder used before (issue 20, item 3).

Every line every tool prints goes through `run.redact_bytes` (and values shown through `run.redact`).
The old pattern, `([A-Za-z][A-Za-z0-9+.-]*://)[^/\\s@]+@`, backtracks over every run of scheme-like
characters: quadratic in a long word. Prints, for each kind of line and length, the best of N rounds of
the old pattern and of the new redaction, and their ratio; the old pattern is only timed on lines short
enough to finish (it takes minutes at 200 KB).

Usage: python3 bench/bench_redact.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import re
import time

from osbuilder.run import redact, redact_bytes

OLD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
OLD_BYTES = re.compile(OLD.pattern.encode())
OLD_LIMIT = 50_000  # characters: longer lines take the old pattern minutes


def kinds(size: int) -> dict[str, str]:
    return {
        "one long word": "a" * size,
        "a credential after a long word": "a" * size + " http://u:Xq7@Zr9@h/debian",
        "apt's output": ("Get:1 http://deb.debian.org/debian bookworm/main amd64 libc6 2.36-9 [2757 kB] a@b.c "
                         * (size // 85 + 1))[:size],
        "dense credentials (worst case)": ("http://u:p@h/x " * (size // 15 + 1))[:size],
    }


def best(fn, arg, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for size in (10_000, 50_000, 1 << 20):
        for kind, line in kinds(size).items():
            data = line.encode()
            new = best(redact, line, args.rounds)
            new_bytes = best(redact_bytes, data, args.rounds)
            if size <= OLD_LIMIT:
                old = best(lambda t: OLD.sub(r"\1***@", t), line, args.rounds)
                old_bytes = best(lambda b: OLD_BYTES.sub(rb"\1***@", b), data, args.rounds)
                ratio = f"old/new {old / new:8.1f}x (bytes {old_bytes / new_bytes:8.1f}x)"
                old_text = f"old {old * 1000:9.2f} ms"
            else:
                ratio, old_text = "old not timed (minutes)", " " * 16
            print(f"{size:>8} chars  {kind:<32} {old_text}  new {new * 1000:7.2f} ms "
                  f"(bytes {new_bytes * 1000:7.2f} ms)  {ratio}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
