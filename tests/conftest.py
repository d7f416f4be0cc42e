"""Shared pytest configuration: fixture plugins and marker gating.

Fixtures live in ``tests/fixtures/`` (one module per kind of real component: etcd, network
namespaces, routers, daemons...); every module there is loaded as a plugin. Tests marked
``privileged``, ``lab``, ``systemd``, ``vm`` or ``deb`` need root; they are skipped with a reason when
not root, never silently passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem != "__init__"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if {"privileged", "lab", "vm", "systemd", "deb"} & set(item.keywords):
            item.add_marker(skip)
