"""The repository's own pytest wiring: tests under boot_tests/ carry the `boot` marker, the
osbuilder processes the tests interrupt with SIGINT can be interrupted, and with OSBUILDER_TIMELINE=file
each worker appends when every test's setup, call and teardown started and ended (bench/timeline.py
reads it: where a run's time goes, worker by worker).

The fixtures themselves come from osbuilder's pytest plugin (osbuilder/pytest_plugin.py), which
installing the package registers.
"""

import json
import os
import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`.ci/run &`, `nohup ... &`) with SIGINT ignored, and an ignored
    # signal stays ignored across fork and exec: every osbuilder a test starts would ignore the Ctrl-C the
    # test sends it. A handler is reset to the default by exec, so the children get Python's usual one.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "boot_tests" in item.path.parts:
            item.add_marker(pytest.mark.boot)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    timeline = os.environ.get("OSBUILDER_TIMELINE")
    if not timeline or hasattr(report, "node"):  # `node`: xdist's controller relaying a worker's report
        return
    record = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": report.nodeid, "when": report.when,
              "start": round(report.start, 3), "stop": round(report.stop, 3), "outcome": report.outcome}
    with open(timeline, "a") as f:  # one short line per write: two workers' appends do not interleave
        f.write(json.dumps(record) + "\n")
