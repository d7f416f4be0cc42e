"""The typed cluster model: every kind of the datastore contract, decoded and encoded.

``decode(key, value)`` turns an etcd key and its JSON value into a frozen dataclass (or ``None`` for
keys outside the layout), raising :class:`ModelError` naming the key and field when the value does
not match the contract. ``encode(obj)`` gives the JSON bytes and ``key_of(obj)`` the key. The
registry :data:`KINDS` also carries the names and aliases ``calyxctl`` accepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from calyx.datastore import keys
from calyx.datastore.keys import KeyInfo, Kind
from calyx.model.errors import ModelError
from calyx.model.ipam import IPAMBlock, IPAMHandle, IPAMReservation
from calyx.model.policy import EntityRule, IcmpMatch, Policy, PortRange, Profile, Rule
from calyx.model.resources import BGPPeer, ClusterConfig, IPPool, Node
from calyx.model.status import BGPPeerStatus, EndpointStatus, FelixStatus
from calyx.model.workload import WorkloadEndpoint

Resource = (
    ClusterConfig | Node | BGPPeer | IPPool | IPAMBlock | IPAMHandle | IPAMReservation | WorkloadEndpoint
    | Profile | Policy | FelixStatus | BGPPeerStatus | EndpointStatus
)


@dataclass(frozen=True)
class KindInfo:
    """How one kind is named, keyed and built."""

    kind: Kind
    cls: type
    aliases: tuple[str, ...]
    prefix: str
    writable: bool = True
    #: how a calyxctl name maps onto the key: "name", "path4" (a/b/c/d), "cidr", "fixed"
    naming: str = "name"

    def key_for_name(self, name: str) -> str:
        """The etcd key of the object called ``name`` (as calyxctl spells it)."""
        if self.naming == "fixed":
            if name not in ("", "cluster", "default"):
                raise ValueError(f"{self.kind} has a single instance named 'cluster', not {name!r}")
            return keys.CLUSTER_CONFIG_KEY
        if self.naming == "cidr":
            return keys.ipam_block_key(name.replace("-", "/") if "/" not in name else name)
        if self.naming == "path4":
            parts = name.split("/")
            if len(parts) == 2 and self.kind is Kind.FELIX_STATUS:
                raise ValueError("felix status is named by its node")
            if len(parts) != 4:
                raise ValueError(
                    f"{self.kind} names have four parts: <node>/<orchestrator>/<workload>/<endpoint>, got {name!r}"
                )
            return keys.workload_key(*parts)
        return keys.key_for(KeyInfo(self.kind, name=name, node=name))


KINDS: dict[Kind, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo(Kind.CLUSTER_CONFIG, ClusterConfig, ("clusterconfig", "clusterconfigs", "config",
                                                      "bgpconfig", "bgpconfiguration"),
                 keys.CLUSTER_CONFIG_KEY, naming="fixed"),
        KindInfo(Kind.NODE, Node, ("node", "nodes", "no"), keys.NODES_PREFIX),
        KindInfo(Kind.BGP_PEER, BGPPeer, ("bgppeer", "bgppeers", "peer", "peers"), keys.BGP_PEERS_PREFIX),
        KindInfo(Kind.IP_POOL, IPPool, ("ippool", "ippools", "pool", "pools"), keys.IPPOOLS_PREFIX),
        KindInfo(Kind.IPAM_BLOCK, IPAMBlock, ("ipamblock", "ipamblocks", "block", "blocks"),
                 keys.IPAM_BLOCKS_PREFIX, naming="cidr"),
        KindInfo(Kind.IPAM_HANDLE, IPAMHandle, ("ipamhandle", "ipamhandles", "handle", "handles"),
                 keys.IPAM_HANDLES_PREFIX),
        KindInfo(Kind.IPAM_RESERVATION, IPAMReservation,
                 ("ipamreservation", "ipamreservations", "reservation", "reservations"),
                 keys.IPAM_RESERVATIONS_PREFIX),
        KindInfo(Kind.WORKLOAD, WorkloadEndpoint,
                 ("workloadendpoint", "workloadendpoints", "workload", "workloads", "wep", "weps",
                  "endpoint", "endpoints"), keys.WORKLOADS_PREFIX, naming="path4"),
        KindInfo(Kind.PROFILE, Profile, ("profile", "profiles", "pro"), keys.PROFILES_PREFIX),
        KindInfo(Kind.POLICY, Policy, ("policy", "policies", "networkpolicy", "networkpolicies", "pol"),
                 keys.POLICIES_PREFIX),
        KindInfo(Kind.FELIX_STATUS, FelixStatus, ("felixstatus",), keys.STATUS_PREFIX, writable=False),
        KindInfo(Kind.BGP_STATUS, BGPPeerStatus, ("bgppeerstatus", "bgpstatus"), keys.STATUS_PREFIX,
                 writable=False),
        KindInfo(Kind.ENDPOINT_STATUS, EndpointStatus, ("endpointstatus",), keys.STATUS_PREFIX,
                 writable=False),
    )
}

_ALIASES: dict[str, KindInfo] = {}
for _info in KINDS.values():
    _ALIASES[_info.kind.value.lower()] = _info
    for _a in _info.aliases:
        _ALIASES[_a] = _info


def kind_info(name: str) -> KindInfo:
    """Look a kind up by any of its spellings, case-insensitively (``ippools``, ``IPPool``...)."""
    info = _ALIASES.get(name.strip().lower())
    if info is None:
        writable = sorted(i.kind.value for i in KINDS.values() if i.writable)
        raise ValueError(f"unknown kind {name!r}; known kinds: {', '.join(writable)}")
    return info


def from_dict(info: KeyInfo, data: object, *, key: str, strict: bool = False) -> Resource:
    """Build the object of kind ``info.kind`` from a JSON-like value."""
    k = info.kind
    if k is Kind.WORKLOAD:
        return WorkloadEndpoint.from_dict(data, key=key, node=info.node, orchestrator=info.orchestrator,
                                          workload=info.workload, endpoint=info.endpoint, strict=strict)
    if k is Kind.ENDPOINT_STATUS:
        return EndpointStatus.from_dict(data, key=key, node=info.node, orchestrator=info.orchestrator,
                                        workload=info.workload, endpoint=info.endpoint, strict=strict)
    if k is Kind.FELIX_STATUS:
        return FelixStatus.from_dict(data, key=key, node=info.node, strict=strict)
    if k is Kind.BGP_STATUS:
        return BGPPeerStatus.from_dict(data, key=key, node=info.node, peer_ip=info.name, strict=strict)
    if k is Kind.IPAM_BLOCK:
        try:
            cidr = keys.block_cidr(info.name)
        except ValueError as exc:
            raise ModelError(key, "", str(exc)) from None
        return IPAMBlock.from_dict(data, key=key, name=cidr, strict=strict)
    builder: Callable[..., Resource] = KINDS[k].cls.from_dict  # type: ignore[attr-defined]
    return builder(data, key=key, name=info.name, strict=strict)


def decode(key: str | bytes, value: bytes | str, *, strict: bool = False) -> Resource | None:
    """Decode one etcd key/value. ``None`` for keys that are not ours; ModelError when malformed."""
    info = keys.parse_key(key)
    if info is None:
        return None
    skey = key.decode() if isinstance(key, bytes) else key
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(skey, "", f"value is not valid JSON: {exc}") from None
    return from_dict(info, data, key=skey, strict=strict)


def key_of(obj: Resource) -> str:
    """The etcd key an object lives at."""
    if isinstance(obj, ClusterConfig):
        return keys.CLUSTER_CONFIG_KEY
    if isinstance(obj, WorkloadEndpoint):
        return keys.workload_key(obj.node, obj.orchestrator, obj.workload, obj.endpoint)
    if isinstance(obj, EndpointStatus):
        return keys.endpoint_status_key(obj.node, obj.orchestrator, obj.workload, obj.endpoint)
    if isinstance(obj, FelixStatus):
        return keys.felix_status_key(obj.node)
    if isinstance(obj, BGPPeerStatus):
        return keys.bgp_status_key(obj.node, obj.peer_ip)
    if isinstance(obj, IPAMBlock):
        return keys.ipam_block_key(obj.cidr)
    info = KINDS[kind_of(obj)]
    return info.key_for_name(obj.name)


def kind_of(obj: Resource) -> Kind:
    for info in KINDS.values():
        if type(obj) is info.cls:
            return info.kind
    raise TypeError(f"not a model object: {type(obj).__name__}")


def to_dict(obj: Resource) -> dict[str, Any]:
    return obj.to_dict()


def encode(obj: Resource) -> bytes:
    """The JSON value stored in etcd (compact, keys sorted for stable diffs)."""
    return json.dumps(obj.to_dict(), sort_keys=True, separators=(",", ":")).encode()


__all__ = [
    "KINDS",
    "BGPPeer",
    "BGPPeerStatus",
    "ClusterConfig",
    "EndpointStatus",
    "EntityRule",
    "FelixStatus",
    "IPAMBlock",
    "IPAMHandle",
    "IPAMReservation",
    "IPPool",
    "IcmpMatch",
    "Kind",
    "KindInfo",
    "ModelError",
    "Node",
    "Policy",
    "PortRange",
    "Profile",
    "Resource",
    "Rule",
    "WorkloadEndpoint",
    "decode",
    "encode",
    "from_dict",
    "key_of",
    "kind_info",
    "kind_of",
]
