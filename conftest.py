"""The repository's own pytest wiring: tests under boot_tests/ carry the `boot` marker, the longest
modules are handed to the xdist workers first, the osbuilder processes the tests interrupt with SIGINT
can be interrupted, and with OSBUILDER_TIMELINE=file each worker appends when every test's setup, call
and teardown started and ended (bench/timeline.py reads it: where a run's time goes, worker by worker).

The fixtures themselves come from osbuilder's pytest plugin (osbuilder/pytest_plugin.py), which
installing the package registers.
"""

import json
import os
import resource
import signal

import pytest

# The modules that hold a worker longest, longest first (bench/timeline.py on a cold run: their setup builds
# what no other module shares, or they boot many guests). xdist would start the groups with the most tests
# first, and one of these started late ends the run alone while the other worker waits. The kernel's
# build is the longest chain (the bisect-run, kconfig-bisect and gate tests wait on it), so it starts first.
LONGEST_FIRST = (
    "boot_tests/test_bisect_run.py",
    "tests/test_container.py",
    "tests/test_rootfs_contents.py",
    "boot_tests/test_multihost.py",
    "boot_tests/test_arm64.py",
    "boot_tests/test_kconfig_bisect.py",
    "boot_tests/test_config_gates.py",
    "tests/test_base_tree.py",
    "boot_tests/test_runtime_agents.py",
    "tests/test_rootless.py",
    "boot_tests/test_loaded_host.py",
    "boot_tests/test_initrd.py",
    "boot_tests/test_pipeline.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist keeps the order pytest_collection_modifyitems gives
    # A shell starts a background job (`.ci/run &`, `nohup ... &`) with SIGINT ignored, and an ignored
    # signal stays ignored across fork and exec: every osbuilder a test starts would ignore the Ctrl-C the
    # test sends it. A handler is reset to the default by exec, so the children get Python's usual one.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "boot_tests" in item.path.parts:
            item.add_marker(pytest.mark.boot)
    rank = {module: n for n, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest as collected


def worker_cpu() -> float:
    """CPU seconds (user + system) of this worker and the children it waited for, so far: the difference
    between two of a worker's records is what its test spent in between (not daemons it left running)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    timeline = os.environ.get("OSBUILDER_TIMELINE")
    if not timeline or hasattr(report, "node"):  # `node`: xdist's controller relaying a worker's report
        return
    record = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": report.nodeid, "when": report.when,
              "start": round(report.start, 3), "stop": round(report.stop, 3), "outcome": report.outcome,
              "cpu": round(worker_cpu(), 2)}
    with open(timeline, "a") as f:  # one short line per write: two workers' appends do not interleave
        f.write(json.dumps(record) + "\n")
