"""Shared pytest configuration: fixture plugins and marker gating.

Fixtures live in ``tests/fixtures/`` (one module per kind of real component: etcd, network
namespaces, ...). Tests marked ``privileged`` need root; they are skipped with a reason when not
root, never silently passed.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.netns",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "privileged" in item.keywords or "lab" in item.keywords or "uml" in item.keywords:
            item.add_marker(skip)
