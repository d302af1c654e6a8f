"""The environment a user's own osbuilder or pytest run starts from in a test: this process's, without
pytest's variables and without any osbuilder setting (the test adds the ones it means)."""

from __future__ import annotations

import os

from osbuilder.settings import TABLE


def without_settings() -> dict[str, str]:
    names = {s.name for s in TABLE}
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k not in names}
