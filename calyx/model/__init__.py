"""The typed cluster model: every kind of the datastore contract, decoded and encoded.

``decode(key, value)`` turns an etcd key and its JSON value into a frozen dataclass (or ``None`` for
keys outside the layout), raising :class:`ModelError` naming the key and field when the value does
not match the contract. ``encode(obj)`` gives the JSON bytes and ``key_of(obj)`` the key. The
registry :data:`KINDS` also carries the names and aliases ``calyxctl`` accepts.

The policy and status kinds are imported on first use (PEP 562 ``__getattr__``): a CNI ADD runs in
a fresh interpreter on every call and needs neither, and building their dataclasses costs several
milliseconds (docs/cni.md#performance). Type checkers see them as ordinary imports.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from calyx.datastore import keys
from calyx.datastore.keys import KeyInfo, Kind
from calyx.model.errors import ModelError
from calyx.model.ipam import IPAMBlock, IPAMHandle, IPAMReservation
from calyx.model.resources import BGPPeer, ClusterConfig, IPPool, Node
from calyx.model.workload import WorkloadEndpoint

if TYPE_CHECKING:
    from calyx.model.policy import EntityRule, IcmpMatch, Policy, PortRange, Profile, Rule
    from calyx.model.status import BGPPeerStatus, EndpointStatus, FelixStatus

    Resource = (
        ClusterConfig | Node | BGPPeer | IPPool | IPAMBlock | IPAMHandle | IPAMReservation | WorkloadEndpoint
        | Profile | Policy | FelixStatus | BGPPeerStatus | EndpointStatus
    )

#: names this package exports from modules it imports on first use
_LAZY: dict[str, str] = {
    **dict.fromkeys(("EntityRule", "IcmpMatch", "Policy", "PortRange", "Profile", "Rule"), "calyx.model.policy"),
    **dict.fromkeys(("BGPPeerStatus", "EndpointStatus", "FelixStatus"), "calyx.model.status"),
}


def __getattr__(name: str) -> Any:
    if name == "Resource":  # the union, for code that inspects it at run time
        import functools
        import operator

        value: Any = functools.reduce(operator.or_, (info.cls for info in KINDS.values()))
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


@dataclass(frozen=True)
class KindInfo:
    """How one kind is named, keyed and built."""

    kind: Kind
    #: the class, or "module:Class" for a kind imported on first use (see :attr:`cls`)
    cls_ref: type | str
    aliases: tuple[str, ...]
    prefix: str
    writable: bool = True
    #: how a calyxctl name maps onto the key: "name", "path4" (a/b/c/d), "cidr", "fixed"
    naming: str = "name"

    @property
    def cls(self) -> type:
        """The kind's class (imported now if it was named as ``module:Class``)."""
        ref = self.cls_ref
        if isinstance(ref, str):
            module, _, name = ref.partition(":")
            ref = getattr(importlib.import_module(module), name)
            object.__setattr__(self, "cls_ref", ref)
        return ref

    @property
    def cls_name(self) -> tuple[str, str]:
        """(module, class name) without importing the class."""
        ref = self.cls_ref
        if isinstance(ref, str):
            module, _, name = ref.partition(":")
            return module, name
        return ref.__module__, ref.__qualname__

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
        KindInfo(Kind.PROFILE, "calyx.model.policy:Profile", ("profile", "profiles", "pro"), keys.PROFILES_PREFIX),
        KindInfo(Kind.POLICY, "calyx.model.policy:Policy",
                 ("policy", "policies", "networkpolicy", "networkpolicies", "pol"), keys.POLICIES_PREFIX),
        KindInfo(Kind.FELIX_STATUS, "calyx.model.status:FelixStatus", ("felixstatus",), keys.STATUS_PREFIX,
                 writable=False),
        KindInfo(Kind.BGP_STATUS, "calyx.model.status:BGPPeerStatus", ("bgppeerstatus", "bgpstatus"),
                 keys.STATUS_PREFIX, writable=False),
        KindInfo(Kind.ENDPOINT_STATUS, "calyx.model.status:EndpointStatus", ("endpointstatus",), keys.STATUS_PREFIX,
                 writable=False),
    )
}

_ALIASES: dict[str, KindInfo] = {}
_BY_CLASS: dict[tuple[str, str], KindInfo] = {info.cls_name: info for info in KINDS.values()}
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
    cls: Any = KINDS[k].cls
    if k in (Kind.WORKLOAD, Kind.ENDPOINT_STATUS):
        return cls.from_dict(data, key=key, node=info.node, orchestrator=info.orchestrator,  # type: ignore[no-any-return]
                             workload=info.workload, endpoint=info.endpoint, strict=strict)
    if k is Kind.FELIX_STATUS:
        return cls.from_dict(data, key=key, node=info.node, strict=strict)  # type: ignore[no-any-return]
    if k is Kind.BGP_STATUS:
        return cls.from_dict(data, key=key, node=info.node, peer_ip=info.name, strict=strict)  # type: ignore[no-any-return]
    if k is Kind.IPAM_BLOCK:
        try:
            cidr = keys.block_cidr(info.name)
        except ValueError as exc:
            raise ModelError(key, "", str(exc)) from None
        return IPAMBlock.from_dict(data, key=key, name=cidr, strict=strict)
    builder: Callable[..., Resource] = cls.from_dict
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
    kind = kind_of(obj)
    o: Any = obj
    if kind is Kind.CLUSTER_CONFIG:
        return keys.CLUSTER_CONFIG_KEY
    if kind is Kind.WORKLOAD:
        return keys.workload_key(o.node, o.orchestrator, o.workload, o.endpoint)
    if kind is Kind.ENDPOINT_STATUS:
        return keys.endpoint_status_key(o.node, o.orchestrator, o.workload, o.endpoint)
    if kind is Kind.FELIX_STATUS:
        return keys.felix_status_key(o.node)
    if kind is Kind.BGP_STATUS:
        return keys.bgp_status_key(o.node, o.peer_ip)
    if kind is Kind.IPAM_BLOCK:
        return keys.ipam_block_key(o.cidr)
    return KINDS[kind].key_for_name(o.name)


def kind_of(obj: Resource) -> Kind:
    t = type(obj)
    info = _BY_CLASS.get((t.__module__, t.__qualname__))
    if info is None or info.cls is not t:
        raise TypeError(f"not a model object: {t.__name__}")
    return info.kind


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
