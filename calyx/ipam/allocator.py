"""IPAM over the datastore: allocate, release, free block affinity — every write a compare-and-swap.

What it owns: the contract's ``ipam/blocks``, ``ipam/handles`` (and reads ``ipam/reservations``,
``ippools``, ``nodes`` and ``config/cluster``). The decisions are made by the pure
:func:`calyx.ipam.logic.plan_allocation`; this module reads a snapshot, asks for a plan and commits
it in **one transaction**: every block it changes is written on condition that its mod revision is
the one read (0 for a block it claims, i.e. the key must not exist), together with the handle (same
condition). So a block and its handle always change together, and two writers never both win the
same block revision. A failed condition re-reads the blocks and the handle and tries again, with a
jittered back-off, at most ``max_attempts`` times (:class:`~calyx.ipam.logic.RetryLimitError`).

The handle value is rebuilt from the blocks on every allocation (the blocks are the truth), so an
allocation for a handle that already holds addresses returns them (a repeated CNI ADD is
idempotent) and repairs a stale handle on the way.

Values that do not decode are skipped with a warning (principle 6); a malformed block still counts
as claimed so that nobody overwrites it.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from calyx import model
from calyx.datastore import keys
from calyx.ipam import logic
from calyx.ipam.logic import Assignment, IPAMError, RetryLimitError
from calyx.ipam.store import Delete, KVLike, Op, Put, Range, Store
from calyx.model import ClusterConfig, IPAMBlock, IPAMHandle, IPAMReservation, IPPool, ModelError, Node
from calyx.model.validate import IPAddress, IPNetwork

DEFAULT_ATTEMPTS = 100


class Snapshot(NamedTuple):
    """Everything IPAM reads, decoded, with the mod revisions needed to write back."""

    pools: tuple[IPPool, ...]
    blocks: dict[IPNetwork, tuple[IPAMBlock, int]]
    bad_blocks: frozenset[IPNetwork]
    handles: dict[str, tuple[IPAMHandle, int]]
    reservations: tuple[IPAMReservation, ...]


def _decode(kv_key: str, value: bytes) -> model.Resource | None:
    try:
        return model.decode(kv_key, value)
    except ModelError as exc:
        import logging  # only when needed: importing it costs the CNI plugin ~3 ms of start-up

        logging.getLogger(__name__).warning("skipping malformed value: %s", exc)
        return None


class IPAM:
    """Address management for one datastore. Thread-safe as far as the store is."""

    def __init__(
        self,
        store: Store,
        *,
        max_attempts: int = DEFAULT_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self._sleep = sleep
        self.conflicts = 0  #: failed compare-and-swaps so far (retried, never surfaced)
        #: decoded blocks by key with the mod revision they were decoded at (values are immutable)
        self._block_cache: dict[str, tuple[IPAMBlock, int]] = {}

    # --- reading ---

    def pools(self) -> list[IPPool]:
        return self._pools(self.store.get_prefix(keys.IPPOOLS_PREFIX)[0])

    @staticmethod
    def _pools(kvs: Sequence[KVLike]) -> list[IPPool]:
        return [p for kv in kvs if isinstance(p := _decode(kv.key, kv.value), IPPool)]

    def blocks(self) -> tuple[dict[IPNetwork, tuple[IPAMBlock, int]], frozenset[IPNetwork]]:
        """Every block with its mod revision, and the CIDRs of blocks that did not decode."""
        return self._blocks(self.store.get_prefix(keys.IPAM_BLOCKS_PREFIX)[0])

    def _blocks(self, kvs: Sequence[KVLike]) -> tuple[dict[IPNetwork, tuple[IPAMBlock, int]], frozenset[IPNetwork]]:
        out: dict[IPNetwork, tuple[IPAMBlock, int]] = {}
        bad: set[IPNetwork] = set()
        cache = self._block_cache
        for kv in kvs:
            hit = cache.get(kv.key)
            if hit is not None and hit[1] == kv.mod_revision:  # unchanged since last read: skip decoding
                out[hit[0].cidr] = hit
                continue
            obj = _decode(kv.key, kv.value)
            if isinstance(obj, IPAMBlock):
                out[obj.cidr] = cache[kv.key] = (obj, kv.mod_revision)
            else:
                try:
                    bad.add(ipaddress.ip_network(keys.block_cidr(kv.key[len(keys.IPAM_BLOCKS_PREFIX):])))
                except ValueError:
                    pass
        return out, frozenset(bad)

    def handle(self, handle_id: str) -> tuple[IPAMHandle, int] | None:
        kv = self.store.get(keys.ipam_handle_key(handle_id))
        return self._handle(kv, handle_id)

    @staticmethod
    def _handle(kv: KVLike | None, handle_id: str) -> tuple[IPAMHandle, int] | None:
        if kv is None:
            return None
        obj = _decode(kv.key, kv.value)
        return (obj, kv.mod_revision) if isinstance(obj, IPAMHandle) else (IPAMHandle(handle_id), kv.mod_revision)

    def handles(self) -> dict[str, tuple[IPAMHandle, int]]:
        kvs, _ = self.store.get_prefix(keys.IPAM_HANDLES_PREFIX)
        return {
            h.handle_id: (h, kv.mod_revision) for kv in kvs if isinstance(h := _decode(kv.key, kv.value), IPAMHandle)
        }

    def reservations(self) -> list[IPAMReservation]:
        return self._reservations(self.store.get_prefix(keys.IPAM_RESERVATIONS_PREFIX)[0])

    @staticmethod
    def _reservations(kvs: Sequence[KVLike]) -> list[IPAMReservation]:
        return [r for kv in kvs if isinstance(r := _decode(kv.key, kv.value), IPAMReservation)]

    def node_labels(self, node: str) -> dict[str, str]:
        return self._labels(self.store.get(keys.node_key(node)), node)

    @staticmethod
    def _labels(kv: KVLike | None, node: str) -> dict[str, str]:
        obj = _decode(kv.key, kv.value) if kv is not None else None
        return (obj if isinstance(obj, Node) else Node(name=node)).labels_with_name

    def strict_affinity(self) -> bool:
        return self._strict(self.store.get(keys.CLUSTER_CONFIG_KEY))

    @staticmethod
    def _strict(kv: KVLike | None) -> bool:
        obj = _decode(kv.key, kv.value) if kv is not None else None
        return isinstance(obj, ClusterConfig) and obj.strict_affinity

    def snapshot(self) -> Snapshot:
        blocks, bad = self.blocks()
        return Snapshot(tuple(self.pools()), blocks, bad, self.handles(), tuple(self.reservations()))

    # --- writing ---

    def _backoff(self, attempt: int) -> None:
        import random  # only on a conflict: it is not free to import in a CNI plugin's start-up

        self.conflicts += 1
        self._sleep(random.uniform(0, min(0.05, 0.001 * (2 ** min(attempt, 6)))))

    def allocate(
        self,
        handle_id: str,
        node: str,
        *,
        num_ipv4: int = 1,
        num_ipv6: int = 0,
        addresses: Sequence[IPAddress] = (),
        workload: str | None = None,
        pools: Sequence[str] = (),
        attributes: Mapping[str, str] | None = None,
    ) -> list[Assignment]:
        """Give ``handle_id`` (on ``node``) ``num_ipv4``/``num_ipv6`` addresses; return all it holds.

        ``addresses`` are fixed addresses to take; a reservation whose ``workload`` is ``workload``
        adds its address. ``pools`` (names or CIDRs) restricts automatic allocation.
        """
        hkey = keys.ipam_handle_key(handle_id)  # validates the name before anything is read
        # everything in one read (one round trip and one revision with the HTTP client)
        pools_kv, node_kv, config_kv, res_kv, blocks_kv, handle_kv = self.store.read([
            Range(keys.IPPOOLS_PREFIX, True), Range(keys.node_key(node)), Range(keys.CLUSTER_CONFIG_KEY),
            Range(keys.IPAM_RESERVATIONS_PREFIX, True), Range(keys.IPAM_BLOCKS_PREFIX, True), Range(hkey),
        ])
        all_pools = self._pools(pools_kv)
        labels = self._labels(node_kv[0] if node_kv else None, node)
        strict = self._strict(config_kv[0] if config_kv else None)
        reservations = self._reservations(res_kv)
        reserved = {r.address: r.workload for r in reservations}
        fixed = list(addresses)
        if workload is not None:
            fixed += [r.address for r in reservations if r.workload == workload and r.address not in fixed]
        attrs = dict(attributes or {})
        attrs.setdefault("node", node)
        for attempt in range(self.max_attempts):
            if attempt:
                blocks_kv, handle_kv = self.store.read([Range(keys.IPAM_BLOCKS_PREFIX, True), Range(hkey)])
            blocks, bad = self._blocks(blocks_kv)
            current = self._handle(handle_kv[0] if handle_kv else None, handle_id)
            plan = logic.plan_allocation(
                handle_id=handle_id,
                node=node,
                pools=all_pools,
                node_labels=labels,
                blocks={c: b for c, (b, _) in blocks.items()},
                also_claimed=bad,
                num={4: num_ipv4, 6: num_ipv6},
                fixed=fixed,
                reserved=reserved,
                workload=workload,
                wanted_pools=pools,
                strict_affinity=strict,
            )
            if not plan.changed and (current is not None or not plan.assignments):
                return plan.assignments  # nothing new: the handle already holds what was asked
            ops: list[Op] = [
                Put(keys.ipam_block_key(cidr), model.encode(b), blocks[cidr][1] if cidr in blocks else 0)
                for cidr, b in plan.changed.items()
            ]
            handle_blocks: dict[str, list[str]] = {}
            for a in plan.assignments:
                handle_blocks.setdefault(str(a.block), []).append(str(a.address))
            old_attrs = current[0].attributes if current is not None else {}
            handle = IPAMHandle(
                handle_id, {c: tuple(v) for c, v in handle_blocks.items()}, {**old_attrs, **attrs}
            )
            ops.append(Put(hkey, model.encode(handle), current[1] if current else 0))
            if self.store.commit(ops):
                return plan.assignments
            self._backoff(attempt)
        raise RetryLimitError(
            f"allocation for {handle_id} lost {self.max_attempts} compare-and-swap races in a row; try again"
        )

    def release(self, handle_id: str) -> list[IPAddress]:
        """Free every address ``handle_id`` holds and delete the handle; [] if it holds none."""
        keys.ipam_handle_key(handle_id)
        for attempt in range(self.max_attempts):
            current = self.handle(handle_id)
            if current is None:
                return []
            handle, hrev = current
            ops: list[Op] = []
            freed: list[IPAddress] = []
            for cidr_text in handle.blocks:
                kv = self.store.get(keys.ipam_block_key(cidr_text))
                if kv is None:
                    continue
                block = _decode(kv.key, kv.value)
                if not isinstance(block, IPAMBlock):
                    continue
                changed = block
                for i, h in enumerate(block.allocations):
                    if h == handle_id:
                        changed = changed.with_allocation(i, None)
                        freed.append(block.address(i))
                if changed is not block:
                    ops.append(Put(kv.key, model.encode(changed), kv.mod_revision))
            ops.append(Delete(keys.ipam_handle_key(handle_id), hrev))
            if self.store.commit(ops):
                return freed
            self._backoff(attempt)
        raise RetryLimitError(f"release of {handle_id} lost {self.max_attempts} compare-and-swap races; try again")

    def release_address(self, address: IPAddress) -> str | None:
        """Free one address wherever it is; returns the handle that held it (None: it was free)."""
        for attempt in range(self.max_attempts):
            blocks, _ = self.blocks()
            found = next(((b, rev) for b, rev in blocks.values() if address in b.cidr), None)
            if found is None:
                return None
            block, rev = found
            holder = block.allocations[block.ordinal(address)]
            if holder is None:
                return None
            ops: list[Op] = [Put(keys.ipam_block_key(block.cidr), model.encode(
                block.with_allocation(block.ordinal(address), None)), rev)]
            current = self.handle(holder)
            if current is not None:
                h, hrev = current
                remaining = {c: tuple(a for a in addrs if a != str(address)) for c, addrs in h.blocks.items()}
                remaining = {c: a for c, a in remaining.items() if a}
                if remaining:
                    ops.append(Put(keys.ipam_handle_key(holder),
                                   model.encode(IPAMHandle(holder, remaining, h.attributes)), hrev))
                else:
                    ops.append(Delete(keys.ipam_handle_key(holder), hrev))
            if self.store.commit(ops):
                return holder
            self._backoff(attempt)
        raise RetryLimitError(f"release of {address} lost {self.max_attempts} compare-and-swap races; try again")

    def release_affinity(
        self, node: str | None = None, cidr: IPNetwork | None = None, *, force: bool = False
    ) -> tuple[list[IPNetwork], list[IPNetwork]]:
        """Free the affinity of empty blocks (of ``node``, or the block ``cidr``): the block key is
        deleted and the range goes back to its pool. Blocks still holding addresses are kept, unless
        ``force``, which makes them unaffine (their addresses stay allocated, as borrowed ones).
        Returns (freed, kept)."""
        if node is None and cidr is None:
            raise ValueError("name a node or a block")
        freed: list[IPNetwork] = []
        kept: list[IPNetwork] = []
        blocks, _ = self.blocks()
        for first, first_rev in sorted(blocks.values(), key=lambda br: br[0].cidr):
            b, rev = first, first_rev
            if cidr is not None and b.cidr != cidr:
                continue
            if node is not None and b.node != node:
                continue
            key = keys.ipam_block_key(b.cidr)
            for attempt in range(self.max_attempts):
                if b.in_use() == 0:
                    if self.store.commit([Delete(key, rev)]):
                        freed.append(b.cidr)
                        break
                elif force:
                    if b.affinity is None or self.store.commit(
                        [Put(key, model.encode(IPAMBlock(b.cidr, None, b.allocations, b.pool)), rev)]
                    ):
                        kept.append(b.cidr)
                        break
                else:
                    kept.append(b.cidr)
                    break
                self._backoff(attempt)
                kv = self.store.get(key)
                if kv is None:
                    break
                obj = _decode(kv.key, kv.value)
                if not isinstance(obj, IPAMBlock):
                    break
                b, rev = obj, kv.mod_revision
            else:
                raise RetryLimitError(f"freeing block {b.cidr} lost {self.max_attempts} races; try again")
        return freed, kept


def dump_json(assignments: Sequence[Assignment]) -> str:
    """A JSON list of assignments (calyxctl ipam allocate -o json)."""
    return json.dumps([
        {"address": str(a.address), "block": str(a.block), "pool": a.pool, "borrowed": a.borrowed, "fixed": a.fixed}
        for a in assignments
    ])


__all__ = ["IPAM", "Assignment", "IPAMError", "RetryLimitError", "Snapshot", "dump_json"]
