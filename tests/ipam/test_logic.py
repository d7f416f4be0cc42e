"""Unit tests of the pure IPAM decisions (calyx.ipam.logic)."""

from __future__ import annotations

import ipaddress

import pytest

from calyx.ipam import logic
from calyx.ipam.logic import AddressError, ExhaustedError, NoPoolError, plan_allocation
from calyx.model import IPAMBlock, IPPool

pytestmark = pytest.mark.unit

A = ipaddress.ip_address
N = ipaddress.ip_network


def pool(name: str = "p", cidr: str = "10.0.0.0/24", bs: int = 26, **kw: object) -> IPPool:
    return IPPool(name=name, cidr=N(cidr), block_size=bs, **kw)  # type: ignore[arg-type]


def plan(**kw: object) -> logic.Plan:
    args: dict[str, object] = {"handle_id": "h1", "node": "n1", "node_labels": {"calyx/node": "n1"},
                               "blocks": {}, "num": {4: 1}}
    args.update(kw)
    return plan_allocation(**args)  # type: ignore[arg-type]


def test_claims_a_block_of_the_pools_block_size_and_takes_its_first_address() -> None:
    p = plan(pools=[pool(bs=28)])
    [a] = p.assignments
    [blk] = p.changed.values()
    assert blk.cidr.prefixlen == 28 and blk.affinity == "node:n1" and blk.pool == "p"
    assert a.address == blk.cidr.network_address and not a.borrowed
    assert blk.allocations[0] == "h1" and blk.in_use() == 1


def test_allocates_from_own_block_before_claiming() -> None:
    own = IPAMBlock(N("10.0.0.64/26"), "node:n1", pool="p").with_allocation(0, "other")
    p = plan(pools=[pool()], blocks={own.cidr: own})
    assert [a.address for a in p.assignments] == [A("10.0.0.65")]
    assert list(p.changed) == [own.cidr]


def test_full_own_block_makes_it_claim_another() -> None:
    full = IPAMBlock(N("10.0.0.0/30"), "node:n1", ("x",) * 4, pool="p")
    p = plan(pools=[pool(cidr="10.0.0.0/28", bs=30)], blocks={full.cidr: full})
    [a] = p.assignments
    assert a.block != full.cidr and a.block.prefixlen == 30 and not a.borrowed


def test_borrows_when_every_block_is_claimed_unless_strict() -> None:
    other = IPAMBlock(N("10.0.0.0/30"), "node:n2", ("x", None, "y", None), pool="p")
    full = IPAMBlock(N("10.0.0.4/30"), "node:n1", ("z",) * 4, pool="p")
    blocks = {other.cidr: other, full.cidr: full}
    p = plan(pools=[pool(cidr="10.0.0.0/29", bs=30)], blocks=blocks)
    [a] = p.assignments
    assert a.address == A("10.0.0.1") and a.borrowed
    assert p.changed[other.cidr].affinity == "node:n2"  # borrowing never changes the owner
    with pytest.raises(ExhaustedError, match="strict affinity"):
        plan(pools=[pool(cidr="10.0.0.0/29", bs=30)], blocks=blocks, strict_affinity=True)


def test_exhausted_pool() -> None:
    full = IPAMBlock(N("10.0.0.0/30"), "node:n2", ("x",) * 4, pool="p")
    with pytest.raises(ExhaustedError, match="no free address"):
        plan(pools=[pool(cidr="10.0.0.0/30", bs=30)], blocks={full.cidr: full})


def test_disabled_pools_and_node_selectors_are_respected() -> None:
    pools = [pool("off", "10.1.0.0/24", disabled=True), pool("a-rack", "10.2.0.0/24", node_selector="rack == 'a'"),
             pool("z-all", "10.3.0.0/24")]
    [a] = plan(pools=pools).assignments
    assert a.address in N("10.3.0.0/24")
    [b] = plan(pools=pools, node_labels={"calyx/node": "n1", "rack": "a"}).assignments
    assert b.address in N("10.2.0.0/24")  # equal prefix lengths: by name
    with pytest.raises(NoPoolError, match="IPv4 pool of off selects"):
        plan(pools=pools, wanted_pools=["off"])
    with pytest.raises(NoPoolError, match="does not exist"):
        plan(pools=pools, wanted_pools=["nope"])
    with pytest.raises(NoPoolError, match="IPv6"):
        plan(pools=pools, num={4: 0, 6: 1})


def test_named_pool_wins() -> None:
    pools = [pool("a", "10.1.0.0/24"), pool("b", "10.2.0.0/24")]
    [a] = plan(pools=pools, wanted_pools=["10.2.0.0/24"]).assignments
    assert a.address in N("10.2.0.0/24")


def test_idempotent_for_a_handle_that_already_holds_an_address() -> None:
    own = IPAMBlock(N("10.0.0.0/26"), "node:n1", pool="p").with_allocation(5, "h1")
    p = plan(pools=[pool()], blocks={own.cidr: own})
    assert [a.address for a in p.assignments] == [A("10.0.0.5")] and not p.changed
    p2 = plan(pools=[pool()], blocks={own.cidr: own}, num={4: 2})
    assert sorted(a.address for a in p2.assignments) == [A("10.0.0.0"), A("10.0.0.5")]


def test_reserved_addresses_are_skipped_for_others_and_given_to_their_workload() -> None:
    reserved = {A("10.0.0.0"): "db", A("10.0.0.1"): "web"}
    [a] = plan(pools=[pool(cidr="10.0.0.0/26")], reserved=reserved).assignments  # one block: it starts at .0
    assert a.address == A("10.0.0.2")
    # the reservation's workload gets its address, in a block of another node: a borrowed /32
    other = IPAMBlock(N("10.0.0.0/26"), "node:n2", pool="p")
    p = plan(pools=[pool()], blocks={other.cidr: other}, reserved=reserved, workload="web", fixed=[A("10.0.0.1")])
    [b] = p.assignments
    assert b.address == A("10.0.0.1") and b.fixed and b.borrowed and b.network == N("10.0.0.1/32")
    with pytest.raises(AddressError, match="reserved for workload 'db'"):
        plan(pools=[pool()], reserved=reserved, workload="web", fixed=[A("10.0.0.0")])


def test_fixed_address_errors() -> None:
    taken = IPAMBlock(N("10.0.0.0/26"), "node:n2", pool="p").with_allocation(7, "someone")
    with pytest.raises(AddressError, match="held by handle 'someone'"):
        plan(pools=[pool()], blocks={taken.cidr: taken}, fixed=[A("10.0.0.7")])
    with pytest.raises(AddressError, match="not in any IP pool"):
        plan(pools=[pool()], fixed=[A("192.168.9.9")])
    with pytest.raises(AddressError, match="disabled"):
        plan(pools=[pool(disabled=True)], fixed=[A("10.0.0.9")])


def test_fixed_address_in_unclaimed_block_claims_it_and_counts_towards_the_request() -> None:
    p = plan(pools=[pool()], fixed=[A("10.0.0.130")])
    [a] = p.assignments
    assert a.address == A("10.0.0.130") and a.fixed and not a.borrowed
    assert p.changed[N("10.0.0.128/26")].affinity == "node:n1"


def test_unclaimed_block_spreads_nodes_and_probes_few_candidates() -> None:
    p6 = pool("v6", "fd00::/48", bs=122)
    first = logic.unclaimed_block(p6, set(), "n1")
    assert first is not None and first.prefixlen == 122 and logic.within(first, p6.cidr)
    assert logic.unclaimed_block(p6, {first}, "n1") != first
    small = pool(cidr="10.0.0.0/28", bs=30)
    claimed = {N(f"10.0.0.{i}/30") for i in (0, 4, 8, 12)}
    assert logic.unclaimed_block(small, claimed, "n1") is None
    starts = {logic.start_index(pool(cidr="10.0.0.0/16"), f"n{i}") for i in range(20)}
    assert len(starts) > 15


def test_ipv6_allocation_gives_a_128() -> None:
    [a] = plan(pools=[pool("v6", "fd00::/120", bs=122)], num={4: 0, 6: 1}).assignments
    assert a.network.prefixlen == 128 and a.address.version == 6
