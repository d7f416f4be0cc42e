"""IP-in-IP end to end inside the test VM (this machine's kernel has no ipip): see inner_ipip_e2e.py."""

from __future__ import annotations

import pytest

from tests.fixtures.vm import Vm

pytestmark = pytest.mark.vm

INNER_TESTS = 5


def test_ipip_end_to_end_in_vm(vm: Vm) -> None:
    result = vm.pytest("tests/encap/inner_ipip_e2e.py", "-x", "--durations=0",
                        modules=("ipip", "veth", "bridge"), timeout=900).check()
    assert f"{INNER_TESTS} passed" in result.output, result.output[-4000:]
