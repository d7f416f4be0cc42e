"""The cross-subnet lab with its daemons, inside the test VM (this machine's kernel has no ipip):
see inner_cross_subnet.py. On the host itself the lab refuses to start its daemons
(tests/lab/test_runner.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.vm import Vm

pytestmark = pytest.mark.vm

INNER_TESTS = 3


def test_cross_subnet_lab_in_vm(vm: Vm) -> None:
    result = vm.pytest("tests/lab/inner_cross_subnet.py", "-x", "--durations=0",
                       modules=("ipip", "veth", "bridge"), timeout=900).check()
    assert f"{INNER_TESTS} passed" in result.output, result.output[-4000:]
