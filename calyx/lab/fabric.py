"""The lab's network: one namespace per node, veths for the links, a management bridge.

What it owns: every namespace whose name starts with the lab's prefix (``cx-<lab>.``; lab names
cannot contain a dot, so one lab's prefix never matches another's), and the links inside them.
Links are created directly inside the two namespaces they join (``ip link add eth1 netns A type
veth peer name eth1 netns B``), so no interface ever appears in the machine's own namespace, and
interface names are the containerlab ones (eth1...) in every node.

The management network mirrors containerlab's: a bridge ``mgmt0`` in the namespace
``<prefix>_mgmt`` with the subnet's first address, and an ``eth0`` in every node with its
``mgmt-ipv4``; the peer ends are ``m<index>`` inside the management namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from calyx.lab.topology import Topology

MGMT = "_mgmt"
NETNS_DIR = Path("/run/netns")


class FabricError(RuntimeError):
    """An ``ip`` command failed while building the lab network."""


def prefix_for(instance: str) -> str:
    return f"cx-{instance}."


def run_ip(args: Sequence[str], *, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if check and r.returncode != 0:
        raise FabricError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def ip_batch(lines: Sequence[str], *, netns: str | None = None) -> None:
    """Run several ``ip`` commands in one process (``ip -batch -``), stopping at the first error."""
    if not lines:
        return
    cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    r = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False, timeout=60)
    if r.returncode != 0:
        raise FabricError(f"ip {'-n ' + netns + ' ' if netns else ''}-batch: {r.stderr.strip()}")


def list_netns(prefix: str) -> list[str]:
    """Namespaces whose name starts with ``prefix``."""
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add_netns(name: str) -> None:
    if netns_exists(name):
        raise FabricError(f"namespace {name} already exists (is the lab already up? `calyxctl lab down` first)")
    run_ip(["netns", "add", name])
    run_ip(["link", "set", "lo", "up"], netns=name)


def delete_netns(name: str) -> None:
    """Delete a namespace (its interfaces go with it); missing is fine."""
    if netns_exists(name):
        run_ip(["netns", "delete", name], check=False)


def build(topo: Topology, prefix: str) -> None:
    """Create the namespaces of every node and the management network, then the links."""
    mgmt_ns = prefix + MGMT
    add_netns(mgmt_ns)
    gw = topo.mgmt_subnet[1]
    ip_batch([
        "link add mgmt0 type bridge",
        f"addr add {gw}/{topo.mgmt_subnet.prefixlen} dev mgmt0",
        "link set mgmt0 up",
    ], netns=mgmt_ns)
    for i, node in enumerate(topo.nodes.values()):
        ns = prefix + node.name
        add_netns(ns)
        run_ip(["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"m{i}", "netns", mgmt_ns])
        ip_batch([f"link set m{i} master mgmt0", f"link set m{i} up"], netns=mgmt_ns)
        ip_batch([f"addr add {node.mgmt_ipv4}/{topo.mgmt_subnet.prefixlen} dev eth0", "link set eth0 up"],
                 netns=ns)
    for link in topo.links:
        (na, ia), (nb, ib) = link.a, link.b
        run_ip(["link", "add", ia, "netns", prefix + na, "type", "veth", "peer", "name", ib, "netns", prefix + nb])
        run_ip(["link", "set", ia, "up"], netns=prefix + na)
        run_ip(["link", "set", ib, "up"], netns=prefix + nb)


def run_exec(netns: str, argv: Sequence[str]) -> None:
    """Run one of a node's ``exec`` lines inside its namespace."""
    r = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False, timeout=30)
    if r.returncode != 0:
        raise FabricError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip() or 'exit ' + str(r.returncode)}")
