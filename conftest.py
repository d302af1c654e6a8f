"""The repository's own pytest wiring: tests under boot_tests/ carry the `boot` marker.

The fixtures themselves come from osbuilder's pytest plugin (osbuilder/pytest_plugin.py), which
installing the package registers.
"""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "boot_tests" in item.path.parts:
            item.add_marker(pytest.mark.boot)
