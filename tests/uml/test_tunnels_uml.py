"""The tunl0 driver, proven inside User-Mode Linux (this host's kernel has no ipip)."""

from __future__ import annotations

import pytest

from tests.fixtures.uml import Uml

pytestmark = pytest.mark.uml


def test_tunl0_driver_in_uml(uml: Uml) -> None:
    result = uml.pytest("tests/uml/inner_tunnels.py", "-p", "no:randomly").check()
    assert "1 passed" in result.output
