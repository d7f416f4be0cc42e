"""Pure IPAM decisions: which pools a node may use, which block to claim, which address to take.

No I/O here: :mod:`calyx.ipam.allocator` reads the datastore, asks these functions, and writes the
result with a compare-and-swap. Everything is deterministic given its inputs (a start index spreads
nodes over a pool instead of a random number), so it is unit-tested without etcd.

Terms: a pool (:class:`~calyx.model.IPPool`) is cut into blocks of ``block_size``; a block
(:class:`~calyx.model.IPAMBlock`) holds one slot per address. A block is *affine* to the node that
claimed it (``affinity: node:<name>``); a node allocates from its own blocks first, claims a new one
when they are full, and *borrows* a single address from another node's block when every block of
its pools is claimed (unless strict affinity forbids it).
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from calyx.model import IPAMBlock, IPPool
from calyx.model.ipam import AFFINITY_PREFIX
from calyx.model.validate import IPAddress, IPNetwork


def within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """``inner`` lies inside ``outer`` (False for different IP versions)."""
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def affinity_of(node: str) -> str:
    """The block affinity value of ``node`` (``node:<name>``)."""
    return f"{AFFINITY_PREFIX}{node}"


def pool_selects(pool: IPPool, node_labels: Mapping[str, str]) -> bool:
    """True when the pool's node selector matches the node's labels."""
    if pool.node_selector in ("", "all()"):
        return True
    from calyx.selector import parse

    return bool(parse(pool.node_selector).evaluate(node_labels))


def usable_pools(
    pools: Iterable[IPPool], node_labels: Mapping[str, str], version: int, wanted: Sequence[str] = ()
) -> list[IPPool]:
    """Pools of IP ``version`` that the node may allocate from, in preference order.

    ``wanted`` (pool names or CIDRs) restricts and orders the choice; an entry matching no pool is
    ignored here (the caller reports it). Disabled pools and pools whose node selector does not
    match are never usable for automatic allocation.
    """
    candidates = [p for p in pools if p.cidr.version == version and not p.disabled and pool_selects(p, node_labels)]
    if not wanted:
        return sorted(candidates, key=lambda p: (p.cidr.prefixlen, p.name))
    out: list[IPPool] = []
    for w in wanted:
        for p in candidates:
            if (w == p.name or w == str(p.cidr)) and p not in out:
                out.append(p)
    return out


def pool_of(pools: Iterable[IPPool], address: IPAddress) -> IPPool | None:
    """The pool containing ``address`` (the most specific one if pools overlap)."""
    best: IPPool | None = None
    for p in pools:
        if address in p.cidr and (best is None or p.cidr.prefixlen > best.cidr.prefixlen):
            best = p
    return best


def block_cidr_for(pool: IPPool, address: IPAddress) -> IPNetwork:
    """The block of ``pool`` that contains ``address``."""
    return ipaddress.ip_network(f"{address}/{pool.block_size}", strict=False)


def block_count(pool: IPPool) -> int:
    return 1 << (pool.block_size - pool.cidr.prefixlen)


def block_at(pool: IPPool, index: int) -> IPNetwork:
    """The ``index``-th block of ``pool`` (0-based)."""
    size = 1 << (pool.cidr.max_prefixlen - pool.block_size)
    base = pool.cidr.network_address + index * size
    return ipaddress.ip_network(f"{base}/{pool.block_size}")


def start_index(pool: IPPool, node: str) -> int:
    """Where ``node`` starts looking for a free block: a hash of its name, so that nodes claiming
    at the same moment mostly try different blocks instead of all racing for the first."""
    return zlib.crc32(f"{pool.name}/{node}".encode()) * 2654435761 % block_count(pool)


def unclaimed_block(pool: IPPool, claimed: Collection[IPNetwork], node: str) -> IPNetwork | None:
    """A block of ``pool`` that no block key exists for, or None when every block is claimed.

    At most ``len(claimed) + 1`` candidates are probed, so this is cheap even for IPv6 pools of
    2^70 blocks.
    """
    n = block_count(pool)
    in_pool = sum(1 for c in claimed if within(c, pool.cidr))
    if in_pool >= n:
        return None
    start = start_index(pool, node)
    for j in range(min(n, in_pool + 1 + len(claimed))):
        cidr = block_at(pool, (start + j) % n)
        if cidr not in claimed:
            return cidr
    return None


def free_ordinal(block: IPAMBlock, excluded: Collection[IPAddress] = ()) -> int | None:
    """The lowest free slot of ``block`` whose address is not ``excluded`` (reserved), or None."""
    for i, h in enumerate(block.allocations):
        if h is None and (not excluded or block.address(i) not in excluded):
            return i
    return None


def own_blocks(blocks: Iterable[IPAMBlock], node: str, pools: Sequence[IPPool]) -> list[IPAMBlock]:
    """The node's blocks inside ``pools``, in pool preference order, then by address."""
    mine = affinity_of(node)
    out: list[IPAMBlock] = []
    for p in pools:
        out.extend(sorted((b for b in blocks if b.affinity == mine and within(b.cidr, p.cidr)), key=lambda b: b.cidr))
    return out


def borrowable_blocks(blocks: Iterable[IPAMBlock], node: str, pools: Sequence[IPPool]) -> list[IPAMBlock]:
    """Other nodes' (and unaffine) blocks inside ``pools``, emptiest first (spreads the borrowing)."""
    mine = affinity_of(node)
    out = [
        b for b in blocks
        if b.affinity != mine and any(within(b.cidr, p.cidr) for p in pools)
    ]
    return sorted(out, key=lambda b: (b.in_use(), b.cidr))


def handle_addresses(blocks: Iterable[IPAMBlock], handle_id: str) -> Iterator[tuple[IPAMBlock, int]]:
    """Every (block, ordinal) allocated to ``handle_id``."""
    for b in blocks:
        for i, h in enumerate(b.allocations):
            if h == handle_id:
                yield b, i


def host_net(address: IPAddress) -> IPNetwork:
    """``address`` as a /32 or /128 network."""
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


# --- errors ------------------------------------------------------------------------------------------


class IPAMError(Exception):
    """An allocation or release that cannot be done as asked; the message says why and what to do."""


class NoPoolError(IPAMError):
    """No enabled pool of the requested family selects this node (or the named pools do not exist)."""


class ExhaustedError(IPAMError):
    """Every address of the usable pools is taken (or borrowing is forbidden by strict affinity)."""


class AddressError(IPAMError):
    """A fixed address cannot be given: outside every pool, in a disabled pool, or held by another."""


class RetryLimitError(IPAMError):
    """Concurrent writers kept changing the same keys; try again later."""


# --- allocation plan -----------------------------------------------------------------------------------


class Assignment:
    """One address given to a handle, and where it came from."""

    __slots__ = ("address", "block", "borrowed", "fixed", "pool")

    def __init__(self, address: IPAddress, block: IPNetwork, pool: str | None, borrowed: bool, fixed: bool) -> None:
        self.address = address
        self.block = block
        self.pool = pool
        self.borrowed = borrowed
        self.fixed = fixed

    @property
    def network(self) -> IPNetwork:
        return host_net(self.address)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Assignment) and (self.address, self.block, self.pool, self.borrowed, self.fixed) == (
            other.address, other.block, other.pool, other.borrowed, other.fixed)

    def __hash__(self) -> int:
        return hash(self.address)

    def __repr__(self) -> str:
        kind = "fixed" if self.fixed else "borrowed" if self.borrowed else "affine"
        return f"Assignment({self.address} in {self.block}, {kind})"


class Plan:
    """What an allocation changes: the blocks to write (new or updated) and the addresses given."""

    __slots__ = ("assignments", "changed")

    def __init__(self) -> None:
        self.changed: dict[IPNetwork, IPAMBlock] = {}
        self.assignments: list[Assignment] = []


def plan_allocation(
    *,
    handle_id: str,
    node: str,
    pools: Sequence[IPPool],
    node_labels: Mapping[str, str],
    blocks: Mapping[IPNetwork, IPAMBlock],
    also_claimed: Collection[IPNetwork] = (),
    num: Mapping[int, int],
    fixed: Sequence[IPAddress] = (),
    reserved: Mapping[IPAddress, str] | None = None,
    workload: str | None = None,
    wanted_pools: Sequence[str] = (),
    strict_affinity: bool = False,
) -> Plan:
    """Decide which addresses ``handle_id`` gets, without side effects.

    ``num`` maps an IP version to how many addresses of it the handle must hold in the end;
    addresses it already holds (found in ``blocks``) and ``fixed`` addresses count towards it, so
    the call is idempotent. ``reserved`` maps reserved addresses to the workload they belong to:
    automatic allocation never hands them out, and a fixed address reserved for another workload
    is refused. Raises an :class:`IPAMError` subclass when the request cannot be met.
    """
    plan = Plan()
    current: dict[IPNetwork, IPAMBlock] = dict(blocks)
    claimed: set[IPNetwork] = set(current) | set(also_claimed)
    pool_names = {p.name: p for p in pools}
    mine = affinity_of(node)

    def record(block: IPAMBlock, ordinal: int, fixed_addr: bool) -> None:
        new = block.with_allocation(ordinal, handle_id)
        current[new.cidr] = new
        plan.changed[new.cidr] = new
        plan.assignments.append(
            Assignment(new.address(ordinal), new.cidr, new.pool, borrowed=new.affinity != mine, fixed=fixed_addr)
        )

    # 1. what the handle already holds
    held: dict[int, int] = {}
    for b, i in handle_addresses(blocks.values(), handle_id):
        addr = b.address(i)
        plan.assignments.append(Assignment(addr, b.cidr, b.pool, borrowed=b.affinity != mine, fixed=addr in fixed))
        held[addr.version] = held.get(addr.version, 0) + 1
    held_addrs = {a.address for a in plan.assignments}

    # 2. fixed addresses (requested, or reserved for this workload): any host, borrowed if need be
    for addr in fixed:
        if addr in held_addrs:
            continue
        owner = reserved.get(addr) if reserved else None
        if owner is not None and owner != workload:
            raise AddressError(f"{addr} is reserved for workload {owner!r}")
        pool = pool_of(pools, addr)
        if pool is None:
            raise AddressError(f"{addr} is not in any IP pool: create a pool that contains it")
        if pool.disabled:
            raise AddressError(f"{addr} is in pool {pool.name}, which is disabled")
        cidr = block_cidr_for(pool, addr)
        block = current.get(cidr)
        if block is None:
            if cidr in claimed:
                raise AddressError(f"block {cidr} of {addr} is unreadable in the datastore: run calyxctl ipam check")
            affinity = mine if pool_selects(pool, node_labels) else None
            block = IPAMBlock(cidr=cidr, affinity=affinity, pool=pool.name)
            claimed.add(cidr)
        ordinal = block.ordinal(addr)
        holder = block.allocations[ordinal]
        if holder is not None and holder != handle_id:
            raise AddressError(
                f"{addr} is held by handle {holder!r}: if its workload is gone, run "
                f"'calyxctl ipam release --handle {holder}'"
            )
        record(block, ordinal, True)
        held[addr.version] = held.get(addr.version, 0) + 1

    excluded = set(reserved) if reserved else set()
    # 3. automatic addresses
    for version in sorted(num):
        need = num[version] - held.get(version, 0)
        if need <= 0:
            continue
        for w in wanted_pools:
            if w not in pool_names and not any(w == str(p.cidr) for p in pools):
                raise NoPoolError(f"IP pool {w!r} does not exist")
        usable = usable_pools(pools, node_labels, version, wanted_pools)
        if not usable:
            which = f"of {', '.join(wanted_pools)} " if wanted_pools else ""
            raise NoPoolError(
                f"no enabled IPv{version} pool {which}selects node {node!r}: check the pools' "
                f"disabled flag and node_selector (calyxctl get ippools)"
            )
        for _ in range(need):
            done = False
            for b in own_blocks(current.values(), node, usable):
                free = free_ordinal(b, excluded)
                if free is not None:
                    record(b, free, False)
                    done = True
                    break
            while not done:
                new_cidr = None
                for p in usable:
                    new_cidr = unclaimed_block(p, claimed, node)
                    if new_cidr is not None:
                        claimed.add(new_cidr)
                        nb = IPAMBlock(cidr=new_cidr, affinity=mine, pool=p.name)
                        free = free_ordinal(nb, excluded)
                        if free is not None:
                            record(nb, free, False)
                            done = True
                        break
                if new_cidr is None:
                    break
            if done:
                continue
            if strict_affinity:
                raise ExhaustedError(
                    f"every block of the IPv{version} pools {', '.join(p.name for p in usable)} is claimed and "
                    f"strict affinity forbids borrowing: add a pool or free empty blocks "
                    f"(calyxctl ipam release --empty-blocks)"
                )
            for b in borrowable_blocks(current.values(), node, usable):
                free = free_ordinal(b, excluded)
                if free is not None:
                    record(b, free, False)
                    done = True
                    break
            if not done:
                raise ExhaustedError(
                    f"the IPv{version} pools {', '.join(p.name for p in usable)} have no free address left: "
                    f"add a pool or release leaked addresses (calyxctl ipam check --fix)"
                )
    return plan
