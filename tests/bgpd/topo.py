"""Building blocks of bgpd's privileged tests: hosts in namespaces running ``bgpd run`` against etcd.

- :class:`EtcdForward`: etcd listens on the machine's loopback; a host namespace cannot reach it,
  so this relay listens on ``127.0.0.1:2379`` *inside* the host's namespace (a socket keeps the
  namespace it was created in) and connects each client to etcd from the test process. Nothing
  is added to the machine's links or routes.
- :class:`Bgpd`: ``bgpd run`` as a subprocess inside a host namespace (state and run directories
  of its own), with helpers to find its ExaBGP child, kill either with SIGKILL and start again.
- :class:`Cluster`: writes the datastore objects (nodes, peers, pools, blocks, workloads).
- kernel and ping helpers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from calyx.datastore import keys
from calyx.datastore.client import Datastore
from tests.fixtures.etcd import TcpProxy
from tests.fixtures.netns import Netns
from tests.fixtures.routers import wait_for

PROTO_BGPD = 79
ROOT = Path(__file__).resolve().parents[2]


class EtcdForward(TcpProxy):
    """127.0.0.1:2379 inside ``ns`` → etcd on the machine's loopback (the shared :class:`TcpProxy`)."""

    def __init__(self, ns: Netns, upstream_port: int, port: int = 2379) -> None:
        super().__init__(upstream_port, netns=ns.name, port=port)


class Bgpd:
    """``bgpd run`` for node ``node`` inside ``ns``."""

    def __init__(self, ns: Netns, node: str, workdir: Path, etcd_endpoint: str, *, metrics_port: int = 0,
                 env: dict[str, str] | None = None) -> None:
        self.ns = ns
        self.metrics_port = metrics_port
        self.extra_env = dict(env or {})
        self.node = node
        self.dir = workdir / f"bgpd-{node}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "calyx.toml").write_text("")
        self.log = self.dir / "bgpd.log"
        self.etcd_endpoint = etcd_endpoint
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Bgpd:
        env = {
            **os.environ,
            "CALYX_CONFIG": str(self.dir / "calyx.toml"),
            "CALYX_STATE_DIR": str(self.dir / "state"),
            "CALYX_RUN_DIR": str(self.dir / "run"),
            "CALYX_STATUS_TTL": "10",
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns.name, sys.executable, "-m", "bgpd.cli", "run", "--node-name",
                 self.node, "--etcd-endpoints", self.etcd_endpoint, "--metrics-port", str(self.metrics_port),
                 "--log-level", "info"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=str(ROOT),
            )  # fmt: skip
        self.ns.procs.append(self.proc)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self, pid: int) -> list[int]:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def exabgp_pid(self) -> int | None:
        if self.proc is None:
            return None
        for child in self.children(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"exabgp" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return child
        return None

    def kill(self) -> None:
        """SIGKILL bgpd (its ExaBGP follows by its parent-death signal)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """Datastore writes for a test topology."""

    def __init__(self, ds: Datastore) -> None:
        self.ds = ds

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.ds.put(key, json.dumps(value))

    def cluster(self, **value: Any) -> None:
        self.put(keys.CLUSTER_CONFIG_KEY, value)

    def node(self, name: str, ipv4: str, **value: Any) -> None:
        self.put(keys.node_key(name), {"ipv4": ipv4, **value})

    def peer(self, name: str, **value: Any) -> None:
        self.put(keys.bgp_peer_key(name), value)

    def pool(self, name: str, cidr: str, **value: Any) -> None:
        self.put(keys.ippool_key(name), {"cidr": cidr, **value})

    def block(self, cidr: str, node: str | None) -> None:
        self.put(keys.ipam_block_key(cidr), {"cidr": cidr, "affinity": f"node:{node}" if node else None})

    def delete_block(self, cidr: str) -> None:
        self.ds.delete(keys.ipam_block_key(cidr))

    def workload(self, node: str, name: str, *addrs: str) -> None:
        self.put(keys.workload_key(node, "test", name, "eth0"),
                 {"iface": "cali" + name[:11], "ipv4_nets": list(addrs)})

    def delete_workload(self, node: str, name: str) -> None:
        self.ds.delete(keys.workload_key(node, "test", name, "eth0"))

    def peer_status(self, node: str) -> dict[str, dict[str, Any]]:
        kvs, _ = self.ds.get_prefix(keys.status_prefix(node) + "bgp/")
        return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}


def kernel_routes(ns: Netns, proto: int | None = PROTO_BGPD) -> dict[str, dict[str, Any]]:
    """dst → ``ip -j route`` entry for routes of ``proto`` (None: all) in the main table."""
    args = ["route", "show"] + (["proto", str(proto)] if proto is not None else [])
    out = {}
    for r in ns.ip_json(*args):
        dst = r["dst"]
        out[dst if "/" in dst or dst == "default" else f"{dst}/32"] = r
    return out


def gateways(entry: dict[str, Any]) -> list[str]:
    if "nexthops" in entry:
        return sorted(h["gateway"] for h in entry["nexthops"])
    return [entry["gateway"]] if "gateway" in entry else []


def add_address(ns: Netns, cidr: str, dev: str = "lo") -> None:
    ns.ip("addr", "add", cidr, "dev", dev)


class Pinger:
    """``ping -i 0.02`` in the background; :meth:`stop` returns (sent, received)."""

    def __init__(self, ns: Netns, src: str, dst: str, interval: float = 0.02) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, "ping", "-n", "-q", "-i", str(interval), "-W", "1", "-I", src, dst],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        ns.procs.append(self.proc)

    def stop(self) -> tuple[int, int, str]:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            if "packets transmitted" in line:
                parts = line.split(",")
                sent = int(parts[0].split()[0])
                received = int(parts[1].split()[0])
                return sent, received, out
        return 0, 0, out


def ping_ok(ns: Netns, src: str, dst: str, count: int = 3) -> bool:
    proc = subprocess.run(["ip", "netns", "exec", ns.name, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1",
                           "-I", src, dst], capture_output=True, timeout=30, check=False)
    return proc.returncode == 0


def wait_established(cluster: Cluster, node: str, peers: list[str], bgpd: Bgpd, timeout: float = 40) -> None:
    def ok() -> bool:
        if not bgpd.alive:
            raise AssertionError(f"bgpd {node} exited:\n{bgpd.log_tail()}")
        st = cluster.peer_status(node)
        return all(st.get(p, {}).get("state") == "established" for p in peers)

    try:
        wait_for(ok, timeout, f"{node}: sessions {peers} established")
    except AssertionError:
        print(bgpd.log_tail())
        raise


def network(text: str) -> str:
    return str(ipaddress.ip_network(text))


def wait_route(ns: Netns, dst: str, want: list[str] | None, timeout: float = 20, what: str = "") -> dict[str, Any]:
    """Wait until ``dst`` (proto 79) has exactly the gateways ``want`` (None: until it is gone)."""

    def check() -> Any:
        r = kernel_routes(ns).get(dst)
        if want is None:
            return r is None
        return r if r is not None and gateways(r) == sorted(want) else None

    result = wait_for(check, timeout, what or f"{dst} via {want} in {ns.name}")
    return result if isinstance(result, dict) else {}


def now() -> float:
    return time.monotonic()
