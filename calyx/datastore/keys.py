"""The etcd key schema: the one module that knows how Calyx keys are spelled.

Every key under ``/calyx/v1/`` is a public contract (docs/datastore.md). Writers build keys with the
``*_key`` functions; readers turn a key back into a :class:`KeyInfo` with :func:`parse_key`, which
returns ``None`` for keys that are not ours or not in this layout (they are ignored, never fatal).

Names are path segments: they must be non-empty and must not contain ``/``. IPAM block keys spell the
CIDR with ``-`` in place of ``/`` (``10.65.0.0-26``), as Calico does.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

PREFIX = "/calyx/v1/"


class Kind(enum.StrEnum):
    """Every kind of object in the datastore contract."""

    CLUSTER_CONFIG = "ClusterConfig"
    NODE = "Node"
    BGP_PEER = "BGPPeer"
    IP_POOL = "IPPool"
    IPAM_BLOCK = "IPAMBlock"
    IPAM_HANDLE = "IPAMHandle"
    IPAM_RESERVATION = "IPAMReservation"
    WORKLOAD = "WorkloadEndpoint"
    PROFILE = "Profile"
    POLICY = "Policy"
    FELIX_STATUS = "FelixStatus"
    BGP_STATUS = "BGPPeerStatus"
    ENDPOINT_STATUS = "EndpointStatus"


class KeyNameError(ValueError):
    """A name cannot be used as a key segment."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a key names: its kind and the path segments that identify the object.

    ``name`` is the single name for most kinds. Workload endpoints and endpoint statuses are
    identified by ``node``, ``orchestrator``, ``workload`` and ``endpoint``; BGP peer statuses by
    ``node`` and ``name`` (the peer address); felix status by ``node``.
    """

    kind: Kind
    name: str = ""
    node: str = ""
    orchestrator: str = ""
    workload: str = ""
    endpoint: str = ""

    @property
    def workload_id(self) -> str:
        """``orchestrator/workload/endpoint``: unique on its node."""
        return f"{self.orchestrator}/{self.workload}/{self.endpoint}"


def _seg(value: str, what: str) -> str:
    if not value or "/" in value or value in (".", "..") or any(ord(c) < 0x20 for c in value):
        raise KeyNameError(f"invalid {what} {value!r}: must be non-empty, without '/' or control characters")
    return value


# --- prefixes (for syncers and list operations) -------------------------------------------------

CLUSTER_CONFIG_KEY = PREFIX + "config/cluster"
NODES_PREFIX = PREFIX + "nodes/"
BGP_PEERS_PREFIX = PREFIX + "bgp/peers/"
IPPOOLS_PREFIX = PREFIX + "ippools/"
IPAM_BLOCKS_PREFIX = PREFIX + "ipam/blocks/"
IPAM_HANDLES_PREFIX = PREFIX + "ipam/handles/"
IPAM_RESERVATIONS_PREFIX = PREFIX + "ipam/reservations/"
WORKLOADS_PREFIX = PREFIX + "workloads/"
PROFILES_PREFIX = PREFIX + "policy/profiles/"
POLICIES_PREFIX = PREFIX + "policy/policies/"
STATUS_PREFIX = PREFIX + "status/"


def workloads_prefix(node: str | None = None) -> str:
    """All workload endpoints, or those of one node."""
    return WORKLOADS_PREFIX if node is None else f"{WORKLOADS_PREFIX}{_seg(node, 'node name')}/"


def status_prefix(node: str | None = None) -> str:
    """All status keys, or those of one node."""
    return STATUS_PREFIX if node is None else f"{STATUS_PREFIX}{_seg(node, 'node name')}/"


# --- key builders --------------------------------------------------------------------------------


def node_key(name: str) -> str:
    return NODES_PREFIX + _seg(name, "node name")


def bgp_peer_key(name: str) -> str:
    return BGP_PEERS_PREFIX + _seg(name, "BGP peer name")


def ippool_key(name: str) -> str:
    return IPPOOLS_PREFIX + _seg(name, "IP pool name")


def block_name(cidr: str | ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The key segment of a block: its CIDR with ``-`` for ``/`` (``10.65.0.0-26``)."""
    net = ipaddress.ip_network(str(cidr), strict=True)
    return str(net).replace("/", "-")


def block_cidr(name: str) -> str:
    """Inverse of :func:`block_name`."""
    addr, sep, plen = name.rpartition("-")
    if not sep:
        raise KeyNameError(f"invalid block name {name!r}: expected <address>-<prefix length>")
    try:
        return str(ipaddress.ip_network(f"{addr}/{plen}", strict=True))
    except ValueError as exc:
        raise KeyNameError(f"invalid block name {name!r}: {exc}") from None


def ipam_block_key(cidr: str | ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return IPAM_BLOCKS_PREFIX + block_name(cidr)


def ipam_handle_key(handle: str) -> str:
    return IPAM_HANDLES_PREFIX + _seg(handle, "IPAM handle")


def ipam_reservation_key(name: str) -> str:
    return IPAM_RESERVATIONS_PREFIX + _seg(name, "reservation name")


def workload_key(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    return (
        f"{WORKLOADS_PREFIX}{_seg(node, 'node name')}/{_seg(orchestrator, 'orchestrator')}/"
        f"{_seg(workload, 'workload name')}/{_seg(endpoint, 'endpoint name')}"
    )


def profile_key(name: str) -> str:
    return PROFILES_PREFIX + _seg(name, "profile name")


def policy_key(name: str) -> str:
    return POLICIES_PREFIX + _seg(name, "policy name")


def felix_status_key(node: str) -> str:
    return f"{STATUS_PREFIX}{_seg(node, 'node name')}/felix"


def bgp_status_key(node: str, peer_ip: str) -> str:
    return f"{STATUS_PREFIX}{_seg(node, 'node name')}/bgp/{_seg(peer_ip, 'peer address')}"


def endpoint_status_key(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """Per-endpoint status written by felix (an extension of the contract, see docs/datastore.md)."""
    return (
        f"{STATUS_PREFIX}{_seg(node, 'node name')}/endpoints/{_seg(orchestrator, 'orchestrator')}/"
        f"{_seg(workload, 'workload name')}/{_seg(endpoint, 'endpoint name')}"
    )


def key_for(info: KeyInfo) -> str:
    """The key of an object identified by ``info`` (inverse of :func:`parse_key`)."""
    k = info.kind
    if k is Kind.CLUSTER_CONFIG:
        return CLUSTER_CONFIG_KEY
    if k is Kind.NODE:
        return node_key(info.name)
    if k is Kind.BGP_PEER:
        return bgp_peer_key(info.name)
    if k is Kind.IP_POOL:
        return ippool_key(info.name)
    if k is Kind.IPAM_BLOCK:
        return IPAM_BLOCKS_PREFIX + _seg(info.name, "block name")
    if k is Kind.IPAM_HANDLE:
        return ipam_handle_key(info.name)
    if k is Kind.IPAM_RESERVATION:
        return ipam_reservation_key(info.name)
    if k is Kind.WORKLOAD:
        return workload_key(info.node, info.orchestrator, info.workload, info.endpoint)
    if k is Kind.PROFILE:
        return profile_key(info.name)
    if k is Kind.POLICY:
        return policy_key(info.name)
    if k is Kind.FELIX_STATUS:
        return felix_status_key(info.node)
    if k is Kind.BGP_STATUS:
        return bgp_status_key(info.node, info.name)
    return endpoint_status_key(info.node, info.orchestrator, info.workload, info.endpoint)


_SIMPLE: dict[str, Kind] = {
    "nodes": Kind.NODE,
    "ippools": Kind.IP_POOL,
}
_TWO: dict[tuple[str, str], Kind] = {
    ("bgp", "peers"): Kind.BGP_PEER,
    ("ipam", "blocks"): Kind.IPAM_BLOCK,
    ("ipam", "handles"): Kind.IPAM_HANDLE,
    ("ipam", "reservations"): Kind.IPAM_RESERVATION,
    ("policy", "profiles"): Kind.PROFILE,
    ("policy", "policies"): Kind.POLICY,
}


def parse_key(key: str | bytes) -> KeyInfo | None:
    """What ``key`` names, or ``None`` when it is not a key of this layout."""
    if isinstance(key, bytes):
        try:
            key = key.decode()
        except UnicodeDecodeError:
            return None
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split("/")
    if any(not p for p in parts):
        return None
    n = len(parts)
    if parts == ["config", "cluster"]:
        return KeyInfo(Kind.CLUSTER_CONFIG, name="cluster")
    if n == 2 and parts[0] in _SIMPLE:
        return KeyInfo(_SIMPLE[parts[0]], name=parts[1])
    if n == 3 and (parts[0], parts[1]) in _TWO:
        return KeyInfo(_TWO[(parts[0], parts[1])], name=parts[2])
    if n == 5 and parts[0] == "workloads":
        return KeyInfo(
            Kind.WORKLOAD, node=parts[1], orchestrator=parts[2], workload=parts[3], endpoint=parts[4]
        )
    if parts[0] == "status" and n >= 3:
        node = parts[1]
        if n == 3 and parts[2] == "felix":
            return KeyInfo(Kind.FELIX_STATUS, node=node)
        if n == 4 and parts[2] == "bgp":
            return KeyInfo(Kind.BGP_STATUS, node=node, name=parts[3])
        if n == 6 and parts[2] == "endpoints":
            return KeyInfo(
                Kind.ENDPOINT_STATUS, node=node, orchestrator=parts[3], workload=parts[4], endpoint=parts[5]
            )
    return None
