"""The RIB: what every peer sent us (Adj-RIB-In), the best paths with ECMP, and route reflection.

What it owns: memory only, rebuilt from the peers after any restart (ExaBGP's ``show adj-rib in``
or the peers' re-advertisement after a graceful restart). It decides nothing about the kernel: the
FIB manager reads :meth:`Rib.selection` for the prefixes :meth:`Rib.take_dirty` returns.

Receive-side checks (ExaBGP does none): a path is dropped when an eBGP peer's AS path holds our AS,
when its ORIGINATOR_ID is our router id, when its CLUSTER_LIST holds our cluster id, or when its
next hop is our own address.

Best path, in the usual order: highest LOCAL_PREF (100 when absent), shortest AS path (an AS_SET
counts one), lowest ORIGIN, lowest MED among paths from the same neighbouring AS, eBGP over iBGP.
Every path still equal after these steps is a **multipath** (ECMP) candidate; the single best one
(for reflection) is then chosen by lowest router id (ORIGINATOR_ID when set), shortest CLUSTER_LIST,
lowest peer address. Stale paths (graceful restart) still forward but lose to fresh ones.

Graceful restart: :meth:`Rib.peer_down` with a restart time marks the peer's paths stale until
:meth:`Rib.peer_eor` (the peer re-sent everything) or :meth:`Rib.expire` after the deadline sweeps
them; without one it removes them at once.

Route reflection (:func:`reflect`): on a reflector, the best path learned from a client goes to
every other iBGP peer, one learned from a non-client iBGP peer goes to the clients; ORIGINATOR_ID is
set (the originating peer's router id) and our cluster id prepended to CLUSTER_LIST, the next hop is
left unchanged, and nothing goes back to the peer it came from or to the originator.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from bgpd.announce import OutAttrs

ORIGINS = {"igp": 0, "egp": 1, "incomplete": 2}


@dataclass(frozen=True, slots=True)
class Attrs:
    """Path attributes of a received route (shared by every prefix of one UPDATE)."""

    origin: str = "igp"
    as_path: tuple[int, ...] = ()
    as_path_len: int = 0
    local_pref: int | None = None
    med: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    originator_id: str | None = None
    cluster_list: tuple[str, ...] = ()


class Path:
    """One prefix as one peer sent it."""

    __slots__ = ("attrs", "next_hop", "peer", "stale")

    def __init__(self, peer: str, next_hop: str, attrs: Attrs, stale: bool = False) -> None:
        self.peer = peer
        self.next_hop = next_hop
        self.attrs = attrs
        self.stale = stale

    def __repr__(self) -> str:
        return f"Path(peer={self.peer}, nh={self.next_hop}, stale={self.stale}, {self.attrs})"


@dataclass(slots=True)
class PeerInfo:
    """What the RIB needs to know about a peer."""

    address: str
    ibgp: bool
    router_id: str | None = None
    rr_client: bool = False
    max_prefixes: int | None = None


class Selection(NamedTuple):
    """The result of best-path selection for one prefix (a tuple: cheap to build 100k times)."""

    best: Path
    #: next hops of every equal-cost path, sorted
    next_hops: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LocalInfo:
    """Our own identity, for loop checks and reflection."""

    as_number: int
    router_id: str
    cluster_id: str | None = None
    addresses: frozenset[str] = frozenset()


@dataclass(slots=True)
class _PeerState:
    paths: dict[str, Path] = field(default_factory=dict)
    stale_deadline: float | None = None
    rejected: int = 0
    over_limit: bool = False


def _ip_key(text: str) -> int:
    try:
        return int(ipaddress.ip_address(text))
    except ValueError:
        return 0


class Rib:
    """Adj-RIB-In of every peer, and the selected routes."""

    def __init__(self, local: LocalInfo) -> None:
        self.local = local
        self.peers: dict[str, PeerInfo] = {}
        self._state: dict[str, _PeerState] = {}
        self._one_hop: dict[str, tuple[str, ...]] = {}  # next hop → (next hop,), shared by selections
        self._selected: dict[str, Selection] = {}
        self._dirty: set[str] = set()

    # --- peers ---

    def set_local(self, local: LocalInfo) -> None:
        if local != self.local:
            self.local = local
            for st in self._state.values():
                self._dirty.update(st.paths)

    def set_peer(self, info: PeerInfo) -> None:
        old = self.peers.get(info.address)
        self.peers[info.address] = info
        self._state.setdefault(info.address, _PeerState())
        if old is not None and (old.ibgp, old.router_id, old.rr_client) != (info.ibgp, info.router_id, info.rr_client):
            self._dirty.update(self._state[info.address].paths)

    def remove_peer(self, peer: str) -> None:
        """The peering no longer exists: forget its paths at once."""
        st = self._state.pop(peer, None)
        self.peers.pop(peer, None)
        if st is not None:
            for prefix in st.paths:
                self._drop(peer, prefix)

    def set_router_id(self, peer: str, router_id: str) -> None:
        info = self.peers.get(peer)
        if info is not None and info.router_id != router_id:
            info.router_id = router_id
            self._dirty.update(self._state[peer].paths)

    # --- updates ---

    def accepts(self, peer: str, attrs: Attrs, next_hop: str) -> bool:
        """The receive-side loop checks."""
        info = self.peers.get(peer)
        loc = self.local
        if info is not None and not info.ibgp and loc.as_number in attrs.as_path:
            return False
        if attrs.originator_id is not None and attrs.originator_id == loc.router_id:
            return False
        if loc.cluster_id is not None and loc.cluster_id in attrs.cluster_list:
            return False
        return next_hop not in loc.addresses

    def announce(self, peer: str, attrs: Attrs, next_hop: str, prefixes: Iterable[str]) -> int:
        """Paths from one UPDATE; returns how many were accepted."""
        st = self._state.get(peer)
        if st is None:
            return 0
        info = self.peers[peer]
        if not self.accepts(peer, attrs, next_hop):
            n = 0
            for prefix in prefixes:  # a path replaced by one we refuse is implicitly withdrawn
                n += 1
                if prefix in st.paths:
                    del st.paths[prefix]
                    self._drop(peer, prefix)
            st.rejected += n
            return 0
        accepted = 0
        limit = info.max_prefixes
        paths = st.paths
        dirty = self._dirty
        if limit is None:
            # One Path for every prefix of the UPDATE: its fields are the same for all of them and
            # the only later change (``stale``) is made to all of a peer's paths at once.
            batch = prefixes if isinstance(prefixes, (list, tuple)) else list(prefixes)
            paths.update(dict.fromkeys(batch, Path(peer, next_hop, attrs)))
            dirty.update(batch)
            return len(batch)
        for prefix in prefixes:
            if limit is not None and prefix not in paths and len(paths) >= limit:
                st.over_limit = True
                st.rejected += 1
                continue
            paths[prefix] = Path(peer, next_hop, attrs)
            dirty.add(prefix)
            accepted += 1
        return accepted

    def withdraw(self, peer: str, prefixes: Iterable[str]) -> None:
        st = self._state.get(peer)
        if st is None:
            return
        for prefix in prefixes:
            if st.paths.pop(prefix, None) is not None:
                self._drop(peer, prefix)

    def _drop(self, peer: str, prefix: str) -> None:
        self._dirty.add(prefix)

    def replace_peer(self, peer: str, routes: Mapping[str, tuple[Attrs, str]]) -> None:
        """The peer's complete Adj-RIB-In (e.g. from ``show adj-rib in``): replace what we hold."""
        st = self._state.get(peer)
        if st is None:
            return
        for prefix in [p for p in st.paths if p not in routes]:
            del st.paths[prefix]
            self._drop(peer, prefix)
        groups: dict[tuple[Attrs, str], list[str]] = {}
        for prefix, key in routes.items():
            groups.setdefault(key, []).append(prefix)
        for (attrs, nh), prefixes in groups.items():
            self.announce(peer, attrs, nh, prefixes)
        st.stale_deadline = None

    # --- sessions and graceful restart ---

    def peer_down(self, peer: str, restart_time: float | None, now: float) -> None:
        """The session went down: keep the paths as stale for ``restart_time`` s, or drop them now."""
        st = self._state.get(peer)
        if st is None:
            return
        st.over_limit = False
        if not restart_time:
            for prefix in list(st.paths):
                del st.paths[prefix]
                self._drop(peer, prefix)
            st.stale_deadline = None
            return
        for path in st.paths.values():
            path.stale = True
        self._dirty.update(st.paths)
        deadline = now + restart_time
        if st.stale_deadline is None or deadline < st.stale_deadline:
            st.stale_deadline = deadline

    def peer_eor(self, peer: str) -> int:
        """End-of-RIB: the peer has re-sent everything; sweep what is still stale. Returns the count."""
        st = self._state.get(peer)
        if st is None:
            return 0
        st.stale_deadline = None
        stale = [p for p, path in st.paths.items() if path.stale]
        for prefix in stale:
            del st.paths[prefix]
            self._drop(peer, prefix)
        return len(stale)

    def expire(self, now: float) -> int:
        """Sweep stale paths whose restart timer ran out. Returns the count."""
        n = 0
        for peer, st in self._state.items():
            if st.stale_deadline is not None and now >= st.stale_deadline:
                n += self.peer_eor(peer)
        return n

    def next_deadline(self) -> float | None:
        ds = [st.stale_deadline for st in self._state.values() if st.stale_deadline is not None]
        return min(ds) if ds else None

    # --- queries ---

    def received(self, peer: str) -> int:
        st = self._state.get(peer)
        return len(st.paths) if st else 0

    def over_limit(self, peer: str) -> bool:
        st = self._state.get(peer)
        return bool(st and st.over_limit)

    def paths(self, peer: str) -> dict[str, Path]:
        st = self._state.get(peer)
        return dict(st.paths) if st else {}

    def prefixes(self) -> set[str]:
        out: set[str] = set()
        for st in self._state.values():
            out.update(st.paths)
        return out

    def take_dirty(self) -> set[str]:
        """Prefixes whose selection may have changed since the last call (and reselect them)."""
        dirty, self._dirty = self._dirty, set()
        selected, select, one_hop = self._selected, self._select, self._one_hop
        tables = [st.paths for st in self._state.values()]
        if len(tables) == 1:  # one peer: its path is the selection; paths of one UPDATE share one Selection
            get, drop = tables[0].get, selected.pop
            last: Path | None = None
            last_sel: Selection | None = None
            for prefix in dirty:
                path = get(prefix)
                if path is None:
                    drop(prefix, None)
                    continue
                sel = last_sel
                if path is not last or sel is None:
                    hops = one_hop.get(path.next_hop)
                    if hops is None:
                        hops = one_hop[path.next_hop] = (path.next_hop,)
                    last, last_sel = path, (sel := Selection(path, hops))
                selected[prefix] = sel
            return dirty
        for prefix in dirty:
            cands = [path for t in tables if (path := t.get(prefix)) is not None]
            if not cands:
                selected.pop(prefix, None)
            elif len(cands) == 1:
                p = cands[0]
                hops = one_hop.get(p.next_hop)
                if hops is None:
                    hops = one_hop[p.next_hop] = (p.next_hop,)
                selected[prefix] = Selection(p, hops)
            else:
                selected[prefix] = select(cands)
        return dirty

    def selection(self, prefix: str) -> Selection | None:
        return self._selected.get(prefix)

    def selected(self) -> Mapping[str, Selection]:
        return self._selected

    # --- best path ---

    def _select(self, paths: list[Path]) -> Selection:
        if len(paths) == 1:
            p = paths[0]
            return Selection(p, (p.next_hop,))
        fresh = [p for p in paths if not p.stale]
        cands = fresh or paths
        peers = self.peers

        def lp(p: Path) -> int:
            return p.attrs.local_pref if p.attrs.local_pref is not None else 100

        best_lp = max(lp(p) for p in cands)
        cands = [p for p in cands if lp(p) == best_lp]
        shortest = min(p.attrs.as_path_len for p in cands)
        cands = [p for p in cands if p.attrs.as_path_len == shortest]
        lowest_origin = min(ORIGINS.get(p.attrs.origin, 2) for p in cands)
        cands = [p for p in cands if ORIGINS.get(p.attrs.origin, 2) == lowest_origin]
        # MED: compared only between paths from the same neighbouring AS
        by_as: dict[int | None, int] = {}
        for p in cands:
            nas = p.attrs.as_path[0] if p.attrs.as_path else None
            med = p.attrs.med or 0
            by_as[nas] = min(by_as.get(nas, med), med)
        cands = [p for p in cands if (p.attrs.med or 0) == by_as[p.attrs.as_path[0] if p.attrs.as_path else None]]

        def is_ibgp(p: Path) -> bool:
            info = peers.get(p.peer)
            return info.ibgp if info is not None else True

        ebgp = [p for p in cands if not is_ibgp(p)]
        if ebgp:
            cands = ebgp

        def tiebreak(p: Path) -> tuple[int, int, int]:
            info = peers.get(p.peer)
            rid = p.attrs.originator_id or (info.router_id if info and info.router_id else p.peer)
            return (_ip_key(rid), len(p.attrs.cluster_list), _ip_key(p.peer))

        best = min(cands, key=tiebreak)
        next_hops = tuple(sorted({p.next_hop for p in cands}, key=_ip_key))
        return Selection(best, next_hops)


# --- route reflection -------------------------------------------------------------------------------


def reflect_attrs(path: Path, local: LocalInfo, source: PeerInfo) -> OutAttrs:
    """The attributes a reflector sends for ``path`` learned from ``source``."""
    a = path.attrs
    assert local.cluster_id is not None
    originator = a.originator_id or source.router_id or source.address
    return OutAttrs(
        next_hop=path.next_hop,
        origin=a.origin,
        as_path=a.as_path,
        local_pref=a.local_pref if a.local_pref is not None else 100,
        med=a.med,
        communities=a.communities,
        large_communities=a.large_communities,
        originator_id=originator,
        cluster_list=(local.cluster_id, *a.cluster_list),
    )


def reflect(rib: Rib, neighbors: Iterable[PeerInfo]) -> dict[str, dict[str, OutAttrs]]:
    """peer → prefix → attributes of every route this reflector must send to each iBGP peer.

    Empty unless we have a cluster id. Only best paths learned over iBGP are reflected.
    """
    local = rib.local
    if local.cluster_id is None:
        return {}
    ibgp = [n for n in neighbors if n.ibgp]
    out: dict[str, dict[str, OutAttrs]] = {n.address: {} for n in ibgp}
    for prefix, sel in rib.selected().items():
        path = sel.best
        src = rib.peers.get(path.peer)
        if src is None or not src.ibgp:
            continue
        attrs = reflect_attrs(path, local, src)
        for n in ibgp:
            if n.address == src.address:
                continue
            if not (src.rr_client or n.rr_client):
                continue  # non-client to non-client: never
            if n.router_id is not None and n.router_id == attrs.originator_id:
                continue  # never back to the originator
            out[n.address][prefix] = attrs
    return out
