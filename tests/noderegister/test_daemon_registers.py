"""A real felix or bgpd, started in a host namespace with no Node key, registers its node.

The host namespace has an uplink with a default route; etcd runs on the machine's loopback and is
reached from inside the namespace through a relay (:class:`~tests.fixtures.etcd.TcpProxy`). The
daemon runs as its console script, as the units run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.kernel.autodetect import Method
from calyx.noderegister import NodeRegistration
from tests.fixtures.etcd import EtcdMember, TcpProxy
from tests.fixtures.netns import Netns
from tests.fixtures.routers import wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]

BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
HOST_ADDR = "192.168.77.2/24"


class Host:
    """A host namespace (uplink ``up0`` with ``HOST_ADDR``, default route) and its daemon."""

    def __init__(self, make_ns: Callable[[], Netns], etcd: EtcdMember, tmp: Path) -> None:
        self.ns, far = make_ns(), make_ns()
        self.ns.ip("link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", far.name)
        self.ns.ip("addr", "add", HOST_ADDR, "dev", "up0")
        self.ns.ip("link", "set", "up0", "up")
        far.ip("addr", "add", "192.168.77.1/24", "dev", "eth0")
        far.ip("link", "set", "eth0", "up")
        self.ns.ip("route", "add", "default", "via", "192.168.77.1")
        self.relay = TcpProxy(etcd.client_port, netns=self.ns.name, port=2379)
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "daemon.log"

    def start(self, daemon: str, node: str, toml: str = "") -> None:
        (self.tmp / "calyx.toml").write_text(toml)
        env = {
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "CALYX_CONFIG": str(self.tmp / "calyx.toml"),
            "CALYX_NODE_NAME": node,
            "CALYX_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
            "CALYX_STATE_DIR": str(self.tmp / "state"),
            "CALYX_RUN_DIR": str(self.tmp / "run"),
            "CALYX_METRICS_PORT": "0",
            "CALYX_IPTABLES_BACKEND": "legacy",
            "CALYX_LOG_LEVEL": "info",
        }
        with open(self.log, "wb") as log:
            self.proc = self.ns.popen(str(BIN / daemon), "run", env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # `ip netns exec` execs: the pid is the daemon's
        return self.proc.wait(30)

    def close(self) -> None:
        self.relay.close()


@pytest.fixture
def host(netns: Callable[[], Netns], etcd: EtcdMember, tmp_path: Path) -> Iterator[Host]:
    h = Host(netns, etcd, tmp_path)
    try:
        yield h
    finally:
        h.close()


def node_value(ds: Datastore, node: str) -> dict[str, Any] | None:
    kv = ds.get(keys.node_key(node))
    return None if kv is None else json.loads(kv.value)


@pytest.mark.parametrize("daemon", ["felix", "bgpd"])
def test_a_daemon_creates_its_node_with_the_detected_address(daemon: str, host: Host, etcd: EtcdMember) -> None:
    node = f"reg-{daemon}"
    ds = etcd.client()
    ds.delete(keys.node_key(node))
    host.start(daemon, node, 'node_as_number = 65001\n[node_labels]\nrack = "r1"\n')
    value = wait_for(lambda: node_value(ds, node), 30, f"{keys.node_key(node)} created by {daemon}")
    assert value == {"ipv4": HOST_ADDR, "as_number": 65001, "labels": {"rack": "r1"},
                     "self_registered": {"as_number": "65001", "ipv4": HOST_ADDR, "labels.rack": "r1"}}, (
        host.log_text())
    assert f"node registration: updated {keys.node_key(node)}: ipv4={HOST_ADDR}, as_number=65001, labels.rack=r1 " \
           "(default-route on up0)" in host.log_text()
    assert host.stop() == 0, host.log_text()


def test_an_operators_node_is_left_as_written(host: Host, etcd: EtcdMember) -> None:
    node = "reg-operator"
    written = {"ipv4": "10.0.1.11/24", "labels": {"rack": "r1"}}
    ds = etcd.client()
    ds.put(keys.node_key(node), json.dumps(written))
    host.start("felix", node)
    wait_for(lambda: "the operator's 10.0.1.11/24 is kept" in host.log_text(), 30, "felix's note on the address")
    assert node_value(ds, node) == written
    assert host.stop() == 0, host.log_text()


def test_the_periodic_recheck_follows_a_host_that_moved(netns: Callable[[], Netns], etcd: EtcdMember) -> None:
    """Detection in a namespace and registration together, re-checked on a short interval: the host's
    address changes (renumbered uplink), and the Node follows without a restart."""
    h, far = netns(), netns()
    h.ip("link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", far.name)
    h.ip("addr", "add", "10.20.0.5/24", "dev", "up0")
    h.ip("link", "set", "up0", "up")
    h.ip("route", "add", "default", "via", "10.20.0.1")
    ds = etcd.client()
    node = "reg-moves"
    ds.delete(keys.node_key(node))
    reg = NodeRegistration(ds, node, method=Method.parse("default-route"), netns=h.name, recheck_interval=0.2)

    async def scenario() -> None:
        task = asyncio.create_task(reg.run())
        try:
            await asyncio.wait_for(reg.first_pass.wait(), 30)
            first = node_value(ds, node)
            assert first is not None and first["ipv4"] == "10.20.0.5/24"
            await asyncio.to_thread(h.ip, "addr", "replace", "10.30.0.7/16", "dev", "up0")
            await asyncio.to_thread(h.ip, "addr", "del", "10.20.0.5/24", "dev", "up0")
            await asyncio.to_thread(h.ip, "route", "replace", "default", "via", "10.30.0.1")
            for _ in range(150):
                value = node_value(ds, node)
                if value is not None and value["ipv4"] == "10.30.0.7/16":
                    break
                await asyncio.sleep(0.1)
            assert node_value(ds, node) == {"ipv4": "10.30.0.7/16", "self_registered": {"ipv4": "10.30.0.7/16"}}
        finally:
            task.cancel()

    asyncio.run(scenario())
