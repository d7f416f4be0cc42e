"""Pure calculation of this host's desired state from the datastore's objects.

What it owns: felix's in-memory view of the cluster (every workload endpoint, profile, policy, IP
pool and IPAM block the syncer delivered) and the derived facts the dataplane needs:

* the endpoints of this node, each with the policies that select it (in ``order``, split by the
  direction they govern) and its existing profiles (:meth:`Calculator.plan`);
* which policies and profiles are *active* (they apply to at least one local endpoint): only their
  chains are programmed;
* the rule ipsets those active rules reference, and their members: the addresses of every endpoint
  in the cluster whose labels (own labels plus its profiles' ``labels_to_apply``; the endpoint's
  own win) match the selector, or the nets listed in the rule;
* the IP pools (for NAT outgoing) and the IPAM blocks affine to this node (blackhole routes);
* the nodes (their addresses: the ipset of hosts tunnel traffic may come from, and the tunnel
  manager's VXLAN peers).

It does no I/O and keeps no history: updates are keyed (a later update of a key replaces the
earlier one) and every change marks what it affects dirty; :meth:`Calculator.take_dirty` hands the
dirty sets to the managers, which re-read the current values. Costs: an endpoint update evaluates
every policy selector (if local) and every referenced rule selector; a policy selector change
evaluates that selector against the local endpoints; a new rule selector scans every endpoint.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from calyx import selector as selectors
from calyx.datastore import keys
from calyx.datastore.keys import Kind
from calyx.model import IPAMBlock, IPPool, Node, Policy, Profile, Rule, WorkloadEndpoint
from felix import rules
from felix.rules import EndpointPlan

log = logging.getLogger(__name__)

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Dirty:
    """What changed since the last :meth:`Calculator.take_dirty`."""

    endpoints: set[str] = field(default_factory=set)  # local endpoint keys
    policies: set[str] = field(default_factory=set)
    profiles: set[str] = field(default_factory=set)
    ipsets: set[str] = field(default_factory=set)  # rule ipset ids
    pools: bool = False
    blocks: bool = False
    nodes: bool = False

    def __bool__(self) -> bool:
        return bool(self.endpoints or self.policies or self.profiles or self.ipsets or self.pools or self.blocks
                    or self.nodes)

    def merge(self, other: Dirty) -> None:
        self.endpoints |= other.endpoints
        self.policies |= other.policies
        self.profiles |= other.profiles
        self.ipsets |= other.ipsets
        self.pools |= other.pools
        self.blocks |= other.blocks
        self.nodes |= other.nodes


@dataclass
class _RuleSet:
    kind: str  # "selector" or "nets"
    refs: int
    selector: selectors.Selector | None = None
    nets: tuple[IPNet, ...] = ()
    members: set[str] = field(default_factory=set)  # endpoint keys (selector sets)


class Calculator:
    """The desired-state calculation for node ``node`` (see the module docstring)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.endpoints: dict[str, WorkloadEndpoint] = {}
        self.profiles: dict[str, Profile] = {}
        self.policies: dict[str, Policy] = {}
        self.pools: dict[str, IPPool] = {}
        self.blocks: dict[str, IPAMBlock] = {}
        self.nodes: dict[str, Node] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._local: set[str] = set()
        self._by_profile: dict[str, set[str]] = {}  # profile -> endpoint keys (all nodes)
        self._pol_sel: dict[str, selectors.Selector] = {}
        self._ep_pols: dict[str, tuple[str, ...]] = {}  # local key -> matching policy names, ordered
        self._pol_eps: dict[str, set[str]] = {}  # policy -> local keys it selects
        self._sets: dict[str, _RuleSet] = {}
        self._owner_sets: dict[tuple[str, str], frozenset[str]] = {}
        self._dirty = Dirty()

    # --- input --------------------------------------------------------------------------------

    def on_update(self, key: str, obj: object) -> None:
        if isinstance(obj, WorkloadEndpoint):
            self._set_endpoint(key, obj)
        elif isinstance(obj, Policy):
            self._set_policy(obj.name, obj)
        elif isinstance(obj, Profile):
            self._set_profile(obj.name, obj)
        elif isinstance(obj, IPPool):
            if self.pools.get(obj.name) != obj:
                self.pools[obj.name] = obj
                self._dirty.pools = True
        elif isinstance(obj, IPAMBlock):
            name = str(obj.cidr)
            old = self.blocks.get(name)
            self.blocks[name] = obj
            if old is None or old.node != obj.node or old.cidr != obj.cidr:
                self._dirty.blocks = True
        elif isinstance(obj, Node) and self.nodes.get(obj.name) != obj:
            self.nodes[obj.name] = obj
            self._dirty.nodes = True

    def on_delete(self, key: str) -> None:
        info = keys.parse_key(key)
        if info is None:
            return
        if info.kind is Kind.WORKLOAD:
            self._set_endpoint(key, None)
        elif info.kind is Kind.POLICY:
            self._set_policy(info.name, None)
        elif info.kind is Kind.PROFILE:
            self._set_profile(info.name, None)
        elif info.kind is Kind.IP_POOL:
            if self.pools.pop(info.name, None) is not None:
                self._dirty.pools = True
        elif info.kind is Kind.IPAM_BLOCK:
            try:
                cidr = keys.block_cidr(info.name)
            except ValueError:
                return
            if self.blocks.pop(cidr, None) is not None:
                self._dirty.blocks = True
        elif info.kind is Kind.NODE and self.nodes.pop(info.name, None) is not None:
            self._dirty.nodes = True

    def take_dirty(self) -> Dirty:
        d, self._dirty = self._dirty, Dirty()
        return d

    def mark_all_dirty(self) -> None:
        """Everything is re-rendered by the managers (used for the first apply and for tests)."""
        d = self._dirty
        d.endpoints |= self._local
        d.policies |= set(self.policies)
        d.profiles |= set(self.profiles)
        d.ipsets |= set(self._sets)
        d.pools = d.blocks = d.nodes = True

    # --- endpoints ----------------------------------------------------------------------------

    def _effective_labels(self, ep: WorkloadEndpoint) -> dict[str, str]:
        labels: dict[str, str] = {}
        for name in ep.profiles:
            prof = self.profiles.get(name)
            if prof is not None:
                labels.update(prof.labels_to_apply)
        labels.update(ep.labels)
        return labels

    def _set_endpoint(self, key: str, ep: WorkloadEndpoint | None) -> None:
        old = self.endpoints.get(key)
        if old == ep:
            return
        if old is not None:
            for name in old.profiles:
                users = self._by_profile.get(name)
                if users is not None:
                    users.discard(key)
                    if not users:
                        del self._by_profile[name]
        if ep is None:
            self.endpoints.pop(key, None)
            self._labels.pop(key, None)
        else:
            self.endpoints[key] = ep
            self._labels[key] = self._effective_labels(ep)
            for name in ep.profiles:
                self._by_profile.setdefault(name, set()).add(key)
        was_local = key in self._local
        is_local = ep is not None and ep.node == self.node and ep.state == "active"
        if is_local:
            self._local.add(key)
        else:
            self._local.discard(key)
        if was_local or is_local:
            self._dirty.endpoints.add(key)
            old_profiles = set(old.profiles) if old is not None and was_local else set()
            new_profiles = set(ep.profiles) if ep is not None and is_local else set()
            self._match_policies(key)
            for name in old_profiles ^ new_profiles:
                self._refresh_profile_activity(name)
        self._reindex_members(key, old_ips_changed=old is None or ep is None or old.nets != ep.nets)

    def _match_policies(self, key: str) -> None:
        """Recompute which policies select local endpoint ``key``."""
        old = set(self._ep_pols.get(key, ()))
        new: set[str] = set()
        if key in self._local:
            labels = self._labels[key]
            new = {name for name, sel in self._pol_sel.items() if sel.evaluate(labels)}
        self._set_ep_policies(key, old, new)

    def _set_ep_policies(self, key: str, old: set[str], new: set[str]) -> None:
        if new:
            ordered = tuple(sorted(new, key=lambda n: self.policies[n].sort_key))
            if self._ep_pols.get(key) != ordered:
                self._ep_pols[key] = ordered
                self._dirty.endpoints.add(key)
        elif key in self._ep_pols:
            del self._ep_pols[key]
            self._dirty.endpoints.add(key)
        for name in old - new:
            eps = self._pol_eps.get(name)
            if eps is not None:
                eps.discard(key)
                if not eps:
                    del self._pol_eps[name]
                    self._refresh_policy_activity(name)
        for name in new - old:
            eps = self._pol_eps.setdefault(name, set())
            eps.add(key)
            if len(eps) == 1:
                self._refresh_policy_activity(name)

    def _reindex_members(self, key: str, *, old_ips_changed: bool) -> None:
        """Re-evaluate every selector ipset for endpoint ``key`` (any node)."""
        labels = self._labels.get(key)
        for set_id, rs in self._sets.items():
            if rs.selector is None:
                continue
            was = key in rs.members
            now = labels is not None and rs.selector.evaluate(labels)
            if now and not was:
                rs.members.add(key)
                self._dirty.ipsets.add(set_id)
            elif was and not now:
                rs.members.discard(key)
                self._dirty.ipsets.add(set_id)
            elif now and old_ips_changed:
                self._dirty.ipsets.add(set_id)

    # --- policies and profiles -------------------------------------------------------------------

    def _set_policy(self, name: str, pol: Policy | None) -> None:
        old = self.policies.get(name)
        if old == pol:
            return
        if pol is None:
            self.policies.pop(name, None)
            self._pol_sel.pop(name, None)
        else:
            self.policies[name] = pol
            self._pol_sel[name] = selectors.parse(pol.selector)
        selector_changed = old is None or pol is None or old.selector != pol.selector
        order_changed = old is not None and pol is not None and (old.sort_key != pol.sort_key or old.types != pol.types)
        if selector_changed:
            sel = self._pol_sel.get(name)
            for key in self._local:
                cur = set(self._ep_pols.get(key, ()))
                now = sel is not None and sel.evaluate(self._labels[key])
                if now != (name in cur):
                    new = cur | {name} if now else cur - {name}
                    self._set_ep_policies(key, cur, new)
        elif order_changed:
            for key in self._pol_eps.get(name, ()):
                cur = set(self._ep_pols.get(key, ()))
                self._ep_pols.pop(key, None)
                self._set_ep_policies(key, cur, cur)
                self._dirty.endpoints.add(key)
        self._dirty.policies.add(name)
        self._refresh_policy_activity(name)

    def _set_profile(self, name: str, prof: Profile | None) -> None:
        old = self.profiles.get(name)
        if old == prof:
            return
        if prof is None:
            self.profiles.pop(name, None)
        else:
            self.profiles[name] = prof
        self._dirty.profiles.add(name)
        old_labels = old.labels_to_apply if old is not None else {}
        new_labels = prof.labels_to_apply if prof is not None else {}
        users = set(self._by_profile.get(name, ()))
        if old_labels != new_labels:
            for key in users:
                ep = self.endpoints[key]
                self._labels[key] = self._effective_labels(ep)
                if key in self._local:
                    self._match_policies(key)
                self._reindex_members(key, old_ips_changed=False)
        if (old is None) != (prof is None):  # the endpoints' jump lists change
            self._dirty.endpoints |= users & self._local
        self._refresh_profile_activity(name)

    def policy_active(self, name: str) -> bool:
        return name in self.policies and bool(self._pol_eps.get(name))

    def profile_active(self, name: str) -> bool:
        return name in self.profiles and bool(self._by_profile.get(name, set()) & self._local)

    def _refresh_policy_activity(self, name: str) -> None:
        pol = self.policies.get(name)
        wanted: Iterable[Rule] = (pol.ingress + pol.egress) if pol is not None and self.policy_active(name) \
            else ()
        self._set_owner_sets(("policy", name), wanted)
        self._dirty.policies.add(name)

    def _refresh_profile_activity(self, name: str) -> None:
        prof = self.profiles.get(name)
        wanted: Iterable[Rule] = (prof.ingress + prof.egress) if prof is not None and \
            self.profile_active(name) else ()
        self._set_owner_sets(("profile", name), wanted)
        self._dirty.profiles.add(name)

    def _set_owner_sets(self, owner: tuple[str, str], rule_list: Iterable[Rule]) -> None:
        wanted: dict[str, tuple[str, tuple[IPNet, ...]]] = {}
        sel_text: dict[str, str] = {}
        for rule in rule_list:
            wanted.update(rules.rule_set_ids(rule))
            for text in rules.selector_texts(rule):
                sel_text[rules.selector_set_id(text)] = text
        old = self._owner_sets.get(owner, frozenset())
        new = frozenset(wanted)
        if old == new:
            return
        if new:
            self._owner_sets[owner] = new
        else:
            self._owner_sets.pop(owner, None)
        for set_id in new - old:
            rs = self._sets.get(set_id)
            if rs is not None:
                rs.refs += 1
                continue
            kind, nets = wanted[set_id]
            if kind == "selector":
                sel = selectors.parse(sel_text[set_id])
                members = {k for k, labels in self._labels.items() if sel.evaluate(labels)}
                self._sets[set_id] = _RuleSet("selector", 1, selector=sel, members=members)
            else:
                self._sets[set_id] = _RuleSet("nets", 1, nets=nets)
            self._dirty.ipsets.add(set_id)
        for set_id in old - new:
            rs = self._sets[set_id]
            rs.refs -= 1
            if rs.refs == 0:
                del self._sets[set_id]
                self._dirty.ipsets.add(set_id)

    # --- output -------------------------------------------------------------------------------

    @property
    def local_endpoints(self) -> frozenset[str]:
        return frozenset(self._local)

    def plan(self, key: str) -> EndpointPlan | None:
        """What to program for local endpoint ``key`` (None if it is not a local, active endpoint)."""
        if key not in self._local:
            return None
        ep = self.endpoints[key]
        pols = self._ep_pols.get(key, ())
        ingress: tuple[str, ...] = ()
        egress: tuple[str, ...] = ()
        if pols:
            policies = self.policies
            ingress = tuple(p for p in pols if "ingress" in policies[p].types)
            egress = tuple(p for p in pols if "egress" in policies[p].types)
        profiles = ep.profiles
        if len(profiles) == 1:
            profiles = profiles if profiles[0] in self.profiles else ()
        else:
            profiles = tuple(p for p in dict.fromkeys(profiles) if p in self.profiles)
        return EndpointPlan(key, ep.iface, ep.ipv4_nets, ep.ipv6_nets, ingress, egress, profiles)

    @property
    def ipset_ids(self) -> frozenset[str]:
        return frozenset(self._sets)

    def ipset_members(self, set_id: str, version: int) -> set[str] | None:
        """Members (``ipset save`` spelling) of rule ipset ``set_id`` for one IP version, or None if
        the set is not wanted."""
        rs = self._sets.get(set_id)
        if rs is None:
            return None
        if rs.kind == "nets":
            return {rules.member_text(n) for n in rs.nets if n.version == version}
        out: set[str] = set()
        for key in rs.members:
            ep = self.endpoints.get(key)
            if ep is not None:
                for n in ep.ipv4_nets if version == 4 else ep.ipv6_nets:
                    out.add(rules.member_text(n))
        return out

    def pool_members(self, version: int) -> tuple[set[str], set[str]]:
        """(nat_outgoing pools, all pools) as ipset members."""
        nat = {rules.member_text(p.cidr) for p in self.pools.values()
               if p.cidr.version == version and p.nat_outgoing and not p.disabled}
        every = {rules.member_text(p.cidr) for p in self.pools.values() if p.cidr.version == version}
        return nat, every

    def affine_blocks(self) -> list[IPNet]:
        return sorted((b.cidr for b in self.blocks.values() if b.node == self.node),
                      key=lambda n: (n.version, n.network_address.packed, n.prefixlen))

    def profile_users(self) -> Mapping[str, set[str]]:
        return self._by_profile
