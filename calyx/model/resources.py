"""Cluster-wide resources: cluster configuration, nodes, BGP peers and IP pools.

Each class is a frozen dataclass with ``from_dict`` (validation at the boundary, errors naming key
and field) and ``to_dict`` (the JSON value stored in etcd, documented in docs/datastore.md).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from calyx.model.validate import (
    NAME_RE,
    IPAddress,
    IPInterface,
    IPNetwork,
    Reader,
    parse_address,
    parse_interface,
    parse_mac,
    parse_network,
    parse_router_id,
)

ENCAP_MODES = ("Never", "Always", "CrossSubnet")
_COMMUNITY = re.compile(r"^\d{1,10}:\d{1,10}(:\d{1,10})?$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def validate_selector(text: str) -> str:
    """Parse a selector to validate it; return the text unchanged (errors are ValueError)."""
    if text in ("", "all()"):  # the usual value: no need to load the parser (CNI start-up time)
        return text
    from calyx.selector import parse

    parse(text)
    return text


def _community(text: str) -> str:
    if not _COMMUNITY.match(text):
        raise ValueError("expected a standard community 'asn:value' or a large one 'asn:a:b'")
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 2 and (parts[0] > 65535 or parts[1] > 65535):
        raise ValueError("standard community parts must be at most 65535")
    if any(p > 4294967295 for p in parts):
        raise ValueError("large community parts must be at most 4294967295")
    return text


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``/calyx/v1/config/cluster``: BGP and IPAM settings shared by every node."""

    as_number: int = 64512
    node_to_node_mesh: bool = True
    log_level: str | None = None
    graceful_restart_time: int = 120
    communities: tuple[str, ...] = ()
    strict_affinity: bool = False
    name: str = "cluster"

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str = "cluster", strict: bool = False) -> ClusterConfig:
        r = Reader(data, key=key, strict=strict)
        obj = cls(
            as_number=r.as_number("as_number", 64512) or 64512,
            node_to_node_mesh=r.bool_("node_to_node_mesh", True),
            log_level=r.choice("log_level", LOG_LEVELS, "") or None,
            graceful_restart_time=r.int_("graceful_restart_time", 120, lo=0, hi=4095) or 0,
            communities=r.parsed_list("communities", _community, "community"),
            strict_affinity=r.bool_("strict_affinity", False),
            name=name,
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "as_number": self.as_number,
            "node_to_node_mesh": self.node_to_node_mesh,
            "graceful_restart_time": self.graceful_restart_time,
            "communities": list(self.communities),
            "strict_affinity": self.strict_affinity,
        }
        if self.log_level:
            d["log_level"] = self.log_level
        return d


@dataclass(frozen=True, slots=True)
class Node:
    """``/calyx/v1/nodes/<node>``: a host's addresses, BGP identity and labels.

    ``ipv4`` carries the prefix length of the host's subnet (``10.0.1.11/24``): bgpd uses it to
    decide whether a peer's next hop is directly connected (CrossSubnet). The tunnel fields are
    published by felix when a pool needs IP-in-IP or VXLAN.

    ``self_registered`` is written by the host itself (:mod:`calyx.noderegister`): for each field it
    set (``ipv4``, ``as_number``, ``labels.<name>``) the value it wrote, as a string. A field whose
    value differs from the one recorded there, or that is not recorded, is the operator's.
    """

    name: str
    ipv4: ipaddress.IPv4Interface | None = None
    ipv6: ipaddress.IPv6Interface | None = None
    as_number: int | None = None
    route_reflector_cluster_id: ipaddress.IPv4Address | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ipip_tunnel_address: ipaddress.IPv4Address | None = None
    vxlan_tunnel_address: ipaddress.IPv4Address | None = None
    vxlan_tunnel_mac: str | None = None
    self_registered: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> Node:
        r = Reader(data, key=key, strict=strict)
        ipv4 = r.parsed("ipv4", parse_interface, "IPv4 address with prefix length")
        ipv6 = r.parsed("ipv6", parse_interface, "IPv6 address with prefix length")
        if ipv4 is not None and not isinstance(ipv4, ipaddress.IPv4Interface):
            r.fail("ipv4", "expected an IPv4 address")
        if ipv6 is not None and not isinstance(ipv6, ipaddress.IPv6Interface):
            r.fail("ipv6", "expected an IPv6 address")
        ipip = r.parsed("ipip_tunnel_address", parse_address, "IPv4 address")
        vx = r.parsed("vxlan_tunnel_address", parse_address, "IPv4 address")
        for fname, v in (("ipip_tunnel_address", ipip), ("vxlan_tunnel_address", vx)):
            if v is not None and not isinstance(v, ipaddress.IPv4Address):
                r.fail(fname, "expected an IPv4 address")
        obj = cls(
            name=name,
            ipv4=ipv4,
            ipv6=ipv6,
            as_number=r.as_number("as_number"),
            route_reflector_cluster_id=r.parsed(
                "route_reflector_cluster_id", parse_router_id, "cluster id (dotted quad)"
            ),
            labels=r.labels("labels"),
            ipip_tunnel_address=ipip,  # type: ignore[arg-type]
            vxlan_tunnel_address=vx,  # type: ignore[arg-type]
            vxlan_tunnel_mac=r.parsed("vxlan_tunnel_mac", parse_mac, "MAC address"),
            self_registered=r.str_map("self_registered"),
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.ipv4 is not None:
            d["ipv4"] = str(self.ipv4)
        if self.ipv6 is not None:
            d["ipv6"] = str(self.ipv6)
        if self.as_number is not None:
            d["as_number"] = self.as_number
        if self.route_reflector_cluster_id is not None:
            d["route_reflector_cluster_id"] = str(self.route_reflector_cluster_id)
        d["labels"] = dict(self.labels)
        if self.ipip_tunnel_address is not None:
            d["ipip_tunnel_address"] = str(self.ipip_tunnel_address)
        if self.vxlan_tunnel_address is not None:
            d["vxlan_tunnel_address"] = str(self.vxlan_tunnel_address)
        if self.vxlan_tunnel_mac is not None:
            d["vxlan_tunnel_mac"] = self.vxlan_tunnel_mac
        if self.self_registered:
            d["self_registered"] = dict(self.self_registered)
        return d

    @property
    def labels_with_name(self) -> dict[str, str]:
        """Labels for node selectors, with the implicit ``calyx/node`` label (like Calico's
        ``kubernetes.io/hostname``) so that ``calyx/node == 'h1'`` works without extra labels."""
        return {**self.labels, "calyx/node": self.name}


@dataclass(frozen=True, slots=True)
class BGPPeer:
    """``/calyx/v1/bgp/peers/<name>``: a BGP peering, for one node, some nodes or all of them.

    The remote side is either an address (``peer_ip`` + ``as_number``: a ToR, an external route
    reflector) or a selector over Calyx nodes (``peer_selector``: each selected node, with its own
    address and AS; this is how route-reflector topologies are written). Which local nodes get the
    peering: ``node`` (one), ``node_selector`` (some), or neither (every node).
    """

    name: str
    peer_ip: IPAddress | None = None
    as_number: int | None = None
    peer_selector: str | None = None
    node: str | None = None
    node_selector: str | None = None
    password: str | None = None
    passive: bool = False
    max_prefixes: int | None = None
    keepalive: int | None = None
    hold_time: int | None = None
    graceful_restart: bool = True

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> BGPPeer:
        r = Reader(data, key=key, strict=strict)
        peer_ip = r.parsed("peer_ip", parse_address, "IP address")
        peer_selector = r.parsed("peer_selector", validate_selector, "selector")
        if (peer_ip is None) == (peer_selector is None):
            r.fail("peer_ip", "give exactly one of peer_ip or peer_selector")
        as_number = r.as_number("as_number")
        if peer_ip is not None and as_number is None:
            r.fail("as_number", "required with peer_ip")
        node = r.str_("node", pattern=NAME_RE, what="node name")
        node_selector = r.parsed("node_selector", validate_selector, "selector")
        if node is not None and node_selector is not None:
            r.fail("node", "give at most one of node or node_selector")
        password = r.str_("password")
        if password is not None and not (1 <= len(password) <= 80):
            r.fail("password", "an MD5 password must have 1 to 80 characters")
        hold = r.int_("hold_time", lo=0, hi=65535)
        if hold is not None and 0 < hold < 3:
            r.fail("hold_time", "must be 0 or at least 3 seconds")
        keepalive = r.int_("keepalive", lo=0, hi=21845)
        if keepalive is not None and hold is not None and hold and keepalive >= hold:
            r.fail("keepalive", f"must be less than hold_time ({hold})")
        obj = cls(
            name=name,
            peer_ip=peer_ip,
            as_number=as_number,
            peer_selector=peer_selector,
            node=node,
            node_selector=node_selector,
            password=password,
            passive=r.bool_("passive", False),
            max_prefixes=r.int_("max_prefixes", lo=1, hi=4294967295),
            keepalive=keepalive,
            hold_time=hold,
            graceful_restart=r.bool_("graceful_restart", True),
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.peer_ip is not None:
            d["peer_ip"] = str(self.peer_ip)
        if self.as_number is not None:
            d["as_number"] = self.as_number
        for fname in ("peer_selector", "node", "node_selector", "password", "max_prefixes",
                      "keepalive", "hold_time"):
            value = getattr(self, fname)
            if value is not None:
                d[fname] = value
        d["passive"] = self.passive
        d["graceful_restart"] = self.graceful_restart
        return d


@dataclass(frozen=True, slots=True)
class IPPool:
    """``/calyx/v1/ippools/<name>``: a range that workload addresses come from, in blocks."""

    name: str
    cidr: IPNetwork
    block_size: int
    ipip_mode: str = "Never"
    vxlan_mode: str = "Never"
    nat_outgoing: bool = False
    disabled: bool = False
    node_selector: str = "all()"

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> IPPool:
        r = Reader(data, key=key, strict=strict)
        cidr = r.parsed("cidr", parse_network, "CIDR", required=True)
        assert cidr is not None
        maxlen = cidr.max_prefixlen
        default_bs = 26 if cidr.version == 4 else 122
        block_size = r.int_("block_size", default_bs, lo=20 if cidr.version == 4 else 116, hi=maxlen)
        assert block_size is not None
        if block_size < cidr.prefixlen:
            r.fail("block_size", f"/{block_size} blocks do not fit in the pool {cidr} (prefix /{cidr.prefixlen})")
        ipip = r.choice("ipip_mode", ENCAP_MODES, "Never")
        vxlan = r.choice("vxlan_mode", ENCAP_MODES, "Never")
        if ipip != "Never" and vxlan != "Never":
            r.fail("vxlan_mode", "at most one of ipip_mode and vxlan_mode may be enabled")
        if ipip != "Never" and cidr.version != 4:
            r.fail("ipip_mode", "IP-in-IP is for IPv4 pools only")
        obj = cls(
            name=name,
            cidr=cidr,
            block_size=block_size,
            ipip_mode=ipip,
            vxlan_mode=vxlan,
            nat_outgoing=r.bool_("nat_outgoing", False),
            disabled=r.bool_("disabled", False),
            node_selector=r.parsed("node_selector", validate_selector, "selector") or "all()",
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {
            "cidr": str(self.cidr),
            "block_size": self.block_size,
            "ipip_mode": self.ipip_mode,
            "vxlan_mode": self.vxlan_mode,
            "nat_outgoing": self.nat_outgoing,
            "disabled": self.disabled,
            "node_selector": self.node_selector,
        }


def network_of(iface: IPInterface) -> IPNetwork:
    """The connected subnet of a node address."""
    return iface.network


__all__ = [
    "ENCAP_MODES",
    "BGPPeer",
    "ClusterConfig",
    "IPPool",
    "Node",
    "network_of",
    "parse_address",
    "validate_selector",
]
