"""The repository's own pytest wiring: tests under boot_tests/ carry the `boot` marker, and the
osbuilder processes the tests interrupt with SIGINT can be interrupted.

The fixtures themselves come from osbuilder's pytest plugin (osbuilder/pytest_plugin.py), which
installing the package registers.
"""

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
