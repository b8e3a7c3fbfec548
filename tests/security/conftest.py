"""The `security` section (issue 5): every test under tests/security/ carries the `security` marker,
so `pytest -m security` runs the section on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.security)
