"""IPAM consistency check and repair (``calyxctl ipam check [--fix]``).

What it finds, from one snapshot of the datastore:

- ``leaked-handle``: a handle written by the CNI plugin (its attributes name the workload endpoint)
  whose endpoint no longer exists and that is older than ``min_age`` (an ADD in flight allocates
  before it writes the endpoint);
- ``orphan-block``: a block affine to a node that has no ``nodes/<name>`` key;
- ``allocation-without-handle``: a block slot naming a handle that does not exist or does not list
  that address;
- ``handle-without-allocation``: a handle listing an address whose block slot is not its own;
- ``malformed-block``: a block key whose value does not decode (reported, never touched).

:func:`find_problems` is pure; :func:`fix` repairs each finding with compare-and-swap writes (leaked
handles are released, orphan blocks freed if empty or made unaffine, stray slots cleared, handles
rewritten), re-reading the keys it changes so a concurrent allocation is never undone.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from calyx import model
from calyx.datastore import keys
from calyx.ipam.allocator import IPAM, Snapshot
from calyx.ipam.store import Delete, Op, Put
from calyx.model import IPAMHandle

#: handle attributes written by the CNI plugin that name the workload endpoint
ENDPOINT_ATTRS = ("node", "orchestrator", "workload", "endpoint")
CREATED_ATTR = "created"


@dataclass(frozen=True)
class Problem:
    """One inconsistency: what kind, about which object, and why."""

    kind: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


def endpoint_key_of(handle: IPAMHandle) -> str | None:
    """The workload endpoint key a CNI handle belongs to, or None for handles without one."""
    a = handle.attributes
    if not all(a.get(k) for k in ENDPOINT_ATTRS):
        return None
    try:
        return keys.workload_key(a["node"], a["orchestrator"], a["workload"], a["endpoint"])
    except ValueError:
        return None


def find_problems(
    snap: Snapshot,
    *,
    endpoint_keys: Collection[str],
    nodes: Collection[str],
    now: float,
    min_age: float = 60.0,
) -> list[Problem]:
    """Every inconsistency in ``snap`` (see the module docstring)."""
    problems: list[Problem] = []
    for h, _ in sorted(snap.handles.values(), key=lambda hr: hr[0].handle_id):
        ep = endpoint_key_of(h)
        if ep is None or ep in endpoint_keys:
            continue
        try:
            created = float(h.attributes.get(CREATED_ATTR, "0"))
        except ValueError:
            created = 0.0
        if now - created >= min_age:
            problems.append(Problem("leaked-handle", h.handle_id,
                                    f"its workload endpoint {ep} does not exist (holds "
                                    f"{', '.join(str(a) for a in h.addresses) or 'nothing'})"))
    for cidr in sorted(snap.bad_blocks, key=str):
        problems.append(Problem("malformed-block", str(cidr), "the value does not decode; fix or delete it by hand"))
    for b, _ in sorted(snap.blocks.values(), key=lambda br: br[0].cidr):
        if b.node is not None and b.node not in nodes:
            problems.append(Problem("orphan-block", str(b.cidr),
                                    f"affine to node {b.node!r}, which does not exist ({b.in_use()} in use)"))
        for i, holder in enumerate(b.allocations):
            if holder is None:
                continue
            text = str(b.address(i))
            hr = snap.handles.get(holder)
            if hr is None or text not in hr[0].blocks.get(str(b.cidr), ()):
                problems.append(Problem("allocation-without-handle", text,
                                        f"block {b.cidr} gives it to handle {holder!r}, which does not list it"))
    for h, _ in sorted(snap.handles.values(), key=lambda hr: hr[0].handle_id):
        for cidr_text, addrs in h.blocks.items():
            br = snap.blocks.get(ipaddress.ip_network(cidr_text))
            for a in addrs:
                holder = None
                if br is not None:
                    addr = ipaddress.ip_address(a)
                    holder = br[0].allocations[br[0].ordinal(addr)] if addr in br[0].cidr else None
                if holder != h.handle_id:
                    problems.append(Problem("handle-without-allocation", h.handle_id,
                                            f"lists {a} but block {cidr_text} gives it to {holder!r}"))
    return problems


def load(ipam: IPAM) -> tuple[Snapshot, set[str], set[str]]:
    """A snapshot plus the endpoint keys and node names that exist."""
    snap = ipam.snapshot()
    eps, _ = ipam.store.get_prefix(keys.WORKLOADS_PREFIX)
    nodes, _ = ipam.store.get_prefix(keys.NODES_PREFIX)
    return snap, {kv.key for kv in eps}, {kv.key[len(keys.NODES_PREFIX):] for kv in nodes}


def check(ipam: IPAM, *, min_age: float = 60.0) -> list[Problem]:
    snap, eps, nodes = load(ipam)
    return find_problems(snap, endpoint_keys=eps, nodes=nodes, now=time.time(), min_age=min_age)


def _clear_slot(ipam: IPAM, address: str) -> bool:
    addr = ipaddress.ip_address(address)
    blocks, _ = ipam.blocks()
    for b, rev in blocks.values():
        if addr not in b.cidr:
            continue
        i = b.ordinal(addr)
        holder = b.allocations[i]
        if holder is None:
            return False
        hr = ipam.handle(holder)
        if hr is not None and address in hr[0].blocks.get(str(b.cidr), ()):
            return False  # consistent by now
        ops: list[Op] = [Put(keys.ipam_block_key(b.cidr), model.encode(b.with_allocation(i, None)), rev)]
        # the handle must not change meanwhile either (an allocation commits block and handle together)
        if hr is not None:
            ops.append(Put(keys.ipam_handle_key(holder), model.encode(hr[0]), hr[1]))
        return ipam.store.commit(ops)
    return False


def _drop_unallocated(ipam: IPAM, handle_id: str) -> bool:
    hr = ipam.handle(handle_id)
    if hr is None:
        return False
    h, hrev = hr
    blocks, _ = ipam.blocks()
    ops: list[Op] = []
    kept: dict[str, tuple[str, ...]] = {}
    for cidr_text, addrs in h.blocks.items():
        br = blocks.get(ipaddress.ip_network(cidr_text))
        good = []
        for a in addrs:
            addr = ipaddress.ip_address(a)
            if br is not None and addr in br[0].cidr and br[0].allocations[br[0].ordinal(addr)] == handle_id:
                good.append(a)
        if br is not None:  # the block must not change meanwhile
            ops.append(Put(keys.ipam_block_key(br[0].cidr), model.encode(br[0]), br[1]))
        if good:
            kept[cidr_text] = tuple(good)
    key = keys.ipam_handle_key(handle_id)
    if kept or not h.blocks:
        ops.append(Put(key, model.encode(IPAMHandle(handle_id, kept, h.attributes)), hrev))
    else:
        ops.append(Delete(key, hrev))
    return ipam.store.commit(ops)


def fix(ipam: IPAM, problems: Sequence[Problem]) -> list[str]:
    """Repair ``problems``; returns one line per action taken."""
    done: list[str] = []
    for p in problems:
        if p.kind == "leaked-handle":
            released = ipam.release(p.subject)
            done.append(f"released handle {p.subject} ({', '.join(map(str, released)) or 'no addresses'})")
    for p in problems:
        if p.kind == "allocation-without-handle" and _clear_slot(ipam, p.subject):
            done.append(f"freed {p.subject}")
        elif p.kind == "handle-without-allocation" and _drop_unallocated(ipam, p.subject):
            done.append(f"rewrote handle {p.subject}")
    for p in problems:
        if p.kind == "orphan-block":
            freed_blocks, kept = ipam.release_affinity(cidr=ipaddress.ip_network(p.subject), force=True)
            done.extend(f"freed empty block {c}" for c in freed_blocks)
            done.extend(f"made block {c} unaffine (it still holds addresses)" for c in kept)
    return done


__all__ = ["Problem", "check", "endpoint_key_of", "find_problems", "fix", "load"]
