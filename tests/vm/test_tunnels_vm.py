"""The tunl0 driver, proven inside the test VM's kernel (this host's kernel has no ipip)."""

from __future__ import annotations

import pytest

from tests.fixtures.vm import Vm

pytestmark = pytest.mark.vm


def test_tunl0_driver_in_vm(vm: Vm) -> None:
    result = vm.pytest("tests/vm/inner_tunnels.py").check()
    assert "1 passed" in result.output
