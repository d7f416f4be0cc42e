"""``calyxctl node status``: what felix and bgpd report about a node, read from leased status keys.

The peer table follows ``calicoctl node status``: peer address, peer type, state (``up`` when the
session is established, ``start`` otherwise), since, and info (the BGP state and the last error).
A node whose daemons stopped shows no status at all: the keys expire with their leases.
"""

from __future__ import annotations

import ipaddress

from calyx import model
from calyx.cli.output import boxed
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.model import BGPPeerStatus, FelixStatus, ModelError

_STATE_NAMES = {
    "established": "Established", "up": "Established", "idle": "Idle", "connect": "Connect",
    "active": "Active", "opensent": "OpenSent", "openconfirm": "OpenConfirm", "down": "Idle",
}


def _peer_sort(p: BGPPeerStatus) -> tuple[int, int | str]:
    try:
        addr = ipaddress.ip_address(p.peer_ip)
        return (addr.version, int(addr))
    except ValueError:
        return (9, p.peer_ip)


def node_status(ds: Datastore, node: str) -> tuple[str, bool]:
    """Render one node's status; the bool says whether every daemon reported and all peers are up."""
    kvs, _ = ds.get_prefix(keys.status_prefix(node))
    felix: FelixStatus | None = None
    peers: list[BGPPeerStatus] = []
    problems: list[str] = []
    for kv in kvs:
        try:
            obj = model.decode(kv.key, kv.value)
        except ModelError as exc:
            problems.append(f"malformed status: {exc}")
            continue
        if isinstance(obj, FelixStatus):
            felix = obj
        elif isinstance(obj, BGPPeerStatus):
            peers.append(obj)
    lines = [f"Node {node}"]
    healthy = True
    if felix is None:
        lines.append("felix: not running (no status reported)")
        healthy = False
    else:
        sync = "in sync" if felix.in_sync else "NOT in sync"
        fwd = {True: "on", False: "OFF", None: "unknown"}[felix.ip_forwarding]
        lines.append(
            f"felix: running, {sync}, {felix.endpoints} local endpoint(s), last apply {felix.last_apply or '-'}, "
            f"ip forwarding {fwd}"
        )
        for err in felix.errors:
            lines.append(f"  error: {err}")
        healthy = healthy and felix.in_sync and not felix.errors
    if not peers:
        lines.append("bgpd: no BGP sessions reported")
    else:
        lines.append("")
        v4 = [p for p in peers if ":" not in p.peer_ip]
        v6 = [p for p in peers if ":" in p.peer_ip]
        for title, group in (("IPv4 BGP status", v4), ("IPv6 BGP status", v6)):
            if not group:
                continue
            rows = []
            for p in sorted(group, key=_peer_sort):
                up = p.state in ("established", "up")
                healthy = healthy and up
                info = _STATE_NAMES.get(p.state, p.state)
                if p.last_error and not up:
                    info += f" ({p.last_error})"
                if up:
                    info += f", {p.prefixes_received} received, {p.prefixes_sent} sent"
                rows.append([p.peer_ip, p.peer_type or "-", "up" if up else "start", p.since or "-", info])
            lines.append(title)
            lines.append(boxed(["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"], rows).rstrip("\n"))
            lines.append("")
    lines.extend(problems)
    return "\n".join(lines).rstrip("\n") + "\n", healthy


def status_nodes(ds: Datastore) -> list[str]:
    """Every node that has a node key or reports status."""
    names: set[str] = set()
    for prefix in (keys.NODES_PREFIX, keys.STATUS_PREFIX):
        kvs, _ = ds.get_prefix(prefix)
        for kv in kvs:
            info = keys.parse_key(kv.key)
            if info is not None:
                names.add(info.node or info.name)
    return sorted(names)
