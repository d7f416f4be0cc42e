"""IPAM objects: address blocks with their affinity, handles, and fixed-address reservations.

A block is the unit a host claims from a pool (default /26) and announces by BGP. Its
``allocations`` list has one slot per address (ordinal = offset from the block's first address),
holding the handle that owns the address or ``None``. Every write to a block is a compare-and-swap
on its mod revision (calyx/ipam/).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from calyx.model.validate import IPAddress, IPNetwork, Reader, parse_address, parse_network

AFFINITY_PREFIX = "node:"


@dataclass(frozen=True, slots=True)
class IPAMBlock:
    """``/calyx/v1/ipam/blocks/<cidr with - for />``."""

    cidr: IPNetwork
    affinity: str | None = None
    allocations: tuple[str | None, ...] = ()
    pool: str | None = None

    def __post_init__(self) -> None:
        if not self.allocations:
            object.__setattr__(self, "allocations", (None,) * self.cidr.num_addresses)

    @property
    def name(self) -> str:
        return str(self.cidr)

    @property
    def node(self) -> str | None:
        """The node the block is affine to, or None."""
        if self.affinity and self.affinity.startswith(AFFINITY_PREFIX):
            return self.affinity[len(AFFINITY_PREFIX) :]
        return None

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> IPAMBlock:
        r = Reader(data, key=key, strict=strict)
        cidr = r.parsed("cidr", parse_network, "CIDR", required=True)
        assert cidr is not None
        if name and name != str(cidr):
            r.fail("cidr", f"{cidr} does not match the key's block {name}")
        if cidr.num_addresses > 65536:
            r.fail("cidr", "blocks larger than 65536 addresses are not supported")
        affinity = r.str_("affinity")
        if affinity is not None and not (affinity.startswith(AFFINITY_PREFIX) and len(affinity) > 5):
            r.fail("affinity", f"{affinity!r} must be 'node:<name>' or null")
        size = cidr.num_addresses
        allocs: list[str | None] = [None] * size
        raw = r.raw("allocations")
        if isinstance(raw, list):
            if len(raw) != size:
                r.fail("allocations", f"has {len(raw)} slots, the block has {size} addresses")
            for i, h in enumerate(raw):
                if h is not None and not (isinstance(h, str) and h):
                    r.fail(f"allocations[{i}]", "a handle must be a non-empty string or null")
                allocs[i] = h
        elif isinstance(raw, dict):
            for k, h in raw.items():
                if not (isinstance(k, str) and k.isdigit() and int(k) < size):
                    r.fail(f"allocations.{k}", f"ordinal must be a number below {size}")
                if h is not None and not (isinstance(h, str) and h):
                    r.fail(f"allocations.{k}", "a handle must be a non-empty string or null")
                allocs[int(k)] = h
        elif raw is not None:
            r.fail("allocations", "expected a list (one slot per address) or an object ordinal: handle")
        obj = cls(cidr=cidr, affinity=affinity, allocations=tuple(allocs), pool=r.str_("pool"))
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "allocations": list(self.allocations),
        }
        if self.pool is not None:
            d["pool"] = self.pool
        return d

    # --- helpers for IPAM ------------------------------------------------------------------------

    def address(self, ordinal: int) -> IPAddress:
        return self.cidr.network_address + ordinal

    def ordinal(self, address: IPAddress) -> int:
        if address not in self.cidr:
            raise ValueError(f"{address} is not in block {self.cidr}")
        return int(address) - int(self.cidr.network_address)

    def free_ordinals(self) -> list[int]:
        return [i for i, h in enumerate(self.allocations) if h is None]

    def in_use(self) -> int:
        return sum(1 for h in self.allocations if h is not None)

    def with_allocation(self, ordinal: int, handle: str | None) -> IPAMBlock:
        allocs = list(self.allocations)
        allocs[ordinal] = handle
        return replace(self, allocations=tuple(allocs))


@dataclass(frozen=True, slots=True)
class IPAMHandle:
    """``/calyx/v1/ipam/handles/<handle>``: what one workload holds, block by block."""

    handle_id: str
    blocks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.handle_id

    @property
    def addresses(self) -> list[IPAddress]:
        return [ipaddress.ip_address(a) for addrs in self.blocks.values() for a in addrs]

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> IPAMHandle:
        r = Reader(data, key=key, strict=strict)
        blocks: dict[str, tuple[str, ...]] = {}
        sub = r.sub("blocks")
        if sub is not None:
            for cidr_text, addrs in sub.data.items():
                sub.raw(cidr_text)
                try:
                    cidr = parse_network(cidr_text)
                except ValueError as exc:
                    sub.fail(cidr_text, f"not a block CIDR: {exc}")
                if not isinstance(addrs, list):
                    sub.fail(cidr_text, "expected a list of addresses")
                out = []
                for i, a in enumerate(addrs):
                    try:
                        addr = parse_address(a) if isinstance(a, str) else None
                    except ValueError:
                        addr = None
                    if addr is None or addr not in cidr:
                        sub.fail(f"{cidr_text}[{i}]", f"{a!r} is not an address in {cidr}")
                    out.append(str(addr))
                blocks[str(cidr)] = tuple(out)
        attrs = r.sub("attributes")
        attributes: dict[str, str] = {}
        if attrs is not None:
            for k, v in attrs.data.items():
                attrs.raw(k)
                if not isinstance(v, str):
                    attrs.fail(k, "attribute values must be strings")
                attributes[k] = v
        obj = cls(handle_id=name, blocks=blocks, attributes=attributes)
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": {k: list(v) for k, v in self.blocks.items()}, "attributes": dict(self.attributes)}


@dataclass(frozen=True, slots=True)
class IPAMReservation:
    """``/calyx/v1/ipam/reservations/<name>``: a fixed address bound to a workload name.

    The CNI plugin gives ``address`` to the workload called ``workload`` (the container or pod
    name) wherever it starts; the address moves between hosts with it.
    """

    name: str
    address: IPAddress
    workload: str

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> IPAMReservation:
        r = Reader(data, key=key, strict=strict)
        address = r.parsed("address", parse_address, "IP address", required=True)
        assert address is not None
        obj = cls(name=name, address=address, workload=r.str_("workload") or name)
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {"address": str(self.address), "workload": self.workload}
