"""A pytest run inside a test: a small project of its own (its own rootdir and pytest.ini, none of this
repository's options), for the tests of the plugin's options (--osbuilder-kernel-config, --osbuilder-arch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def pytest_in(project: Path, tests: str, *args: str, drop: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run pytest on `tests` (written as test_inner.py) in `project`; environment variables starting with
    PYTEST_ or one of `drop` are left out, RESULTS is `project`, `env` is added."""
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_inner.py").write_text(tests)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", *drop))}
    run_env.update(RESULTS=str(project), **(env or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project,
                          env=run_env, capture_output=True, text=True, timeout=300)


def collected(project: Path, tests: str, *args: str, **kw: object) -> list[str]:
    """The node ids (after the file name) pytest collects."""
    proc = pytest_in(project, tests, "--collect-only", "-q", *args, **kw)  # type: ignore[arg-type]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line]
