"""Boot tests: failure reports name the directory holding the boot's console log, QMP transcript
and timings. (`--dist loadgroup` comes from pyproject's addopts, so the good-path guest's tests
stay on one xdist worker; the `boot` marker is added by the repository's conftest.py.)
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    dirs = getattr(item, "_osbuilder_boot_logs", [])
    if report.failed and dirs:
        report.sections.append(("boot logs", "\n".join(str(d) for d in dirs)))
