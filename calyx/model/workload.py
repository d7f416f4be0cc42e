"""Workload endpoints: a container's interface on a host, its addresses, profiles and labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calyx.model.validate import IFACE_RE, NAME_RE, IPNetwork, Reader, parse_host_net, parse_mac


@dataclass(frozen=True, slots=True)
class WorkloadEndpoint:
    """``/calyx/v1/workloads/<node>/<orchestrator>/<workload>/<endpoint>``.

    ``iface`` is the host side of the veth (``cali`` + 11 hex characters by convention); only /32
    and /128 addresses are routed to it. ``profiles`` name ``policy/profiles`` entries; the
    endpoint's labels (plus each profile's ``labels_to_apply``) are what policy selectors match.
    """

    node: str
    orchestrator: str
    workload: str
    endpoint: str
    iface: str
    mac: str | None = None
    ipv4_nets: tuple[IPNetwork, ...] = ()
    ipv6_nets: tuple[IPNetwork, ...] = ()
    profiles: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "active"
    #: the CNI attachment that made it (empty when written by hand): CNI GC finds stale endpoints by
    #: it, whichever IPAM plugin gave the addresses
    container_id: str = ""
    network: str = ""

    @property
    def name(self) -> str:
        """``node/orchestrator/workload/endpoint``: the name calyxctl shows and accepts."""
        return f"{self.node}/{self.orchestrator}/{self.workload}/{self.endpoint}"

    @property
    def workload_id(self) -> str:
        return f"{self.orchestrator}/{self.workload}/{self.endpoint}"

    @property
    def nets(self) -> tuple[IPNetwork, ...]:
        return self.ipv4_nets + self.ipv6_nets

    @classmethod
    def from_dict(
        cls, data: object, *, key: str, node: str, orchestrator: str, workload: str, endpoint: str,
        strict: bool = False,
    ) -> WorkloadEndpoint:
        r = Reader(data, key=key, strict=strict)
        ipv4 = r.parsed_list("ipv4_nets", parse_host_net, "IPv4 address (/32)")
        ipv6 = r.parsed_list("ipv6_nets", parse_host_net, "IPv6 address (/128)")
        for i, n in enumerate(ipv4):
            if n.version != 4:
                r.fail(f"ipv4_nets[{i}]", f"{n} is not an IPv4 address")
        for i, n in enumerate(ipv6):
            if n.version != 6:
                r.fail(f"ipv6_nets[{i}]", f"{n} is not an IPv6 address")
        obj = cls(
            node=node,
            orchestrator=orchestrator,
            workload=workload,
            endpoint=endpoint,
            iface=r.req_str("iface", pattern=IFACE_RE, what="interface name (at most 15 characters)"),
            mac=r.parsed("mac", parse_mac, "MAC address"),
            ipv4_nets=ipv4,
            ipv6_nets=ipv6,
            profiles=r.str_list("profiles", pattern=NAME_RE, what="profile name"),
            labels=r.labels("labels"),
            state=r.choice("state", ("active", "inactive"), "active"),
            container_id=r.str_("container_id", "") or "",
            network=r.str_("network", "") or "",
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"iface": self.iface}
        if self.mac is not None:
            d["mac"] = self.mac
        d["ipv4_nets"] = [str(n) for n in self.ipv4_nets]
        d["ipv6_nets"] = [str(n) for n in self.ipv6_nets]
        d["profiles"] = list(self.profiles)
        d["labels"] = dict(self.labels)
        d["state"] = self.state
        if self.container_id:
            d["container_id"] = self.container_id
        if self.network:
            d["network"] = self.network
        return d
