"""Run inside the test VM by tests/lab/test_cross_subnet_vm.py (its kernel has ipip): the cross-subnet lab.

``labs/cross-subnet`` exactly as an operator brings it up (``Lab.up()``: etcd, felix and bgpd on four
hosts, the CNI plugins through the CNI service, one workload per host), on a kernel with ``ipip``.
Proved with real packets:

- every workload reaches every other one (the full ping matrix);
- within a subnet the block routes are direct (``via`` the other host on ``eth1``); across r1 they
  are ``via <host> dev tunl0 onlink``;
- r1 (no BGP) never learns a workload address: its capture of w-h1 → w-h3 shows only IP protocol 4
  between the host addresses 10.0.1.11 and 10.0.2.11, and it has no route into the pool;
- ``lab down`` leaves no namespace behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from calyx.lab import fabric
from calyx.lab.runner import Lab
from calyx.lab.topology import resolve
from tests.fixtures.vm import SLOWDOWN
from tests.lab.conftest import instance_name, wait_until

pytestmark = pytest.mark.skipif(os.environ.get("CALYX_IN_VM") != "1", reason="runs inside the test VM only")

HOST_IP = {"h1": "10.0.1.11", "h2": "10.0.1.12", "h3": "10.0.2.11", "h4": "10.0.2.12"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab.create(resolve("cross-subnet"), instance=instance_name("v"), root=tmp_path_factory.mktemp("labs"))
    try:
        lab.up(ready_timeout=90 * SLOWDOWN)
        yield lab
    finally:
        if lab.owned:
            lab.down()
        assert fabric.list_netns(lab.state.prefix) == [], "namespaces of the cross-subnet lab left behind"


def _route(lab: Lab, node: str, dst: str) -> dict[str, Any] | None:
    out = lab.run(node, ["ip", "-j", "route", "show", dst], check=True).stdout
    routes = json.loads(out or "[]")
    return routes[0] if routes else None


def _block(lab: Lab, node: str) -> str:
    blocks = lab.blocks_of(node)
    assert blocks, f"{node} has no IPAM block"
    return blocks[0]


def test_every_workload_reaches_every_other(lab: Lab) -> None:
    assert len(lab.state.workloads) == 4

    def full() -> bool:
        return all(lab.ping_matrix(timeout=2).values())

    wait_until(full, 90 * SLOWDOWN, "the full ping matrix of the cross-subnet lab", interval=1)


def test_routes_are_direct_in_a_subnet_and_ipip_across_it(lab: Lab) -> None:
    for src, dst, tunnel in (("h1", "h2", False), ("h1", "h3", True), ("h4", "h2", True), ("h4", "h3", False)):
        block = _block(lab, dst)

        def installed(src: str = src, block: str = block) -> dict[str, Any] | None:
            return _route(lab, src, block)

        wait_until(installed, 60 * SLOWDOWN, f"{src}'s route to {dst}'s block {block}")
        r = installed()
        assert r is not None and r["gateway"] == HOST_IP[dst], r
        if tunnel:
            assert r["dev"] == "tunl0" and "onlink" in r.get("flags", []), r
        else:
            assert r["dev"] == "eth1", r
    tunl = json.loads(lab.run("h1", ["ip", "-j", "link", "show", "tunl0"], check=True).stdout)[0]
    assert tunl["mtu"] == 1480 and "UP" in tunl["flags"], tunl


def test_the_router_sees_only_ip_in_ip_between_host_addresses(lab: Lab) -> None:
    assert not any(d.startswith("10.67.") for d in lab.kernel_routes("r1")), lab.kernel_routes("r1")
    w1, w3 = lab.state.workloads["w-h1"], lab.state.workloads["w-h3"]
    assert w1.ip and w3.ip
    cap = subprocess.Popen(lab.exec_argv("r1", ["tcpdump", "-l", "-nn", "-i", "eth1", "icmp or ip proto 4"]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cap.stderr is not None
    for _ in range(3):
        if "listening" in cap.stderr.readline():
            break
    try:
        assert lab.ping("w-h1", w3.ip, count=3, timeout=2)
        time.sleep(0.3)
    finally:
        cap.terminate()
        text, _ = cap.communicate(timeout=10)
    a, b = re.escape(w1.ip), re.escape(w3.ip)
    assert re.search(rf"10\.0\.1\.11 > 10\.0\.2\.11: IP {a} > {b}: ICMP echo request", text), text
    assert re.search(rf"10\.0\.2\.11 > 10\.0\.1\.11: IP {b} > {a}: ICMP echo reply", text), text
    # nothing of the workloads' own addresses travels bare across r1
    assert not re.search(rf"^\S+ IP {a} > {b}", text, re.M), text
