"""IP-in-IP end to end inside User-Mode Linux (this machine's kernel has no ipip): see inner_ipip_e2e.py."""

from __future__ import annotations

import pytest

from tests.fixtures.uml import Uml

pytestmark = pytest.mark.uml

INNER_TESTS = 5


def test_ipip_end_to_end_in_uml(uml: Uml) -> None:
    result = uml.pytest("tests/encap/inner_ipip_e2e.py", "-p", "no:randomly", "-x", "--durations=0",
                        modules=("ipip", "veth", "bridge"), timeout=420).check()
    assert f"{INNER_TESTS} passed" in result.output, result.output[-4000:]
