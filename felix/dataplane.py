"""The managers and the apply order: calculation results in, driver desired state out, then I/O.

What it owns: the mapping from :class:`~felix.calc.Calculator` output to the drivers, and the one
fixed order in which the drivers touch the kernel. :meth:`Dataplane.update` is the managers' cheap
part (Calico's ``OnUpdate``): it renders only what the calculation marked dirty into the drivers'
desired state, with no I/O. :meth:`Dataplane.apply` is ``CompleteDeferredWork``:

1. ipsets created and updated (rules may reference them from now on);
2. routes and interface sysctls (:class:`~felix.endpoints.EndpointManager`);
3. iptables: filter (IPv4, IPv6), then nat (IPv4);
4. ipsets no longer referenced destroyed.

A failing step is reported and its resources stay dirty (retried by the daemon with backoff); the
other steps still run, so one bad object never blocks the rest of the host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from calyx.kernel import cmd
from felix import rules
from felix.calc import Calculator, Dirty
from felix.endpoints import EndpointApply, EndpointManager
from felix.ipsets import IpsetError, IpsetStats, IpsetTable
from felix.iptables import ApplyStats, IptablesError, IptablesTable

log = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)
    ipsets: IpsetStats | None = None
    ipset_deletes: IpsetStats | None = None
    endpoints: EndpointApply | None = None
    iptables: dict[str, ApplyStats] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return bool(
            (self.ipsets and self.ipsets.did_work)
            or (self.ipset_deletes and self.ipset_deletes.did_work)
            or (self.endpoints and self.endpoints.routes.did_work)
            or (self.endpoints and self.endpoints.sysctl_writes)
            or any(s.did_work for s in self.iptables.values())
            or self.errors
        )

    def summary(self) -> str:
        parts = []
        if self.ipsets is not None:
            i = self.ipsets
            parts.append(f"ipsets_created={i.created} ipsets_updated={i.updated + i.swapped}")
        if self.ipset_deletes is not None:
            parts.append(f"ipsets_destroyed={self.ipset_deletes.destroyed}")
        if self.endpoints is not None:
            r = self.endpoints.routes
            parts.append(f"routes_added={r.added} routes_changed={r.changed} routes_removed={r.removed} "
                         f"routes_pending={r.pending} sysctls={self.endpoints.sysctl_writes}")
        for name, s in self.iptables.items():
            parts.append(f"{name}=+{s.rules_inserted}/-{s.rules_deleted}/chains+{s.chains_written}"
                         f"-{s.chains_deleted}")
        parts.append(f"errors={len(self.errors)} duration={self.duration:.3f}")
        return " ".join(parts)


class Dataplane:
    """felix's drivers and the managers that feed them (see the module docstring)."""

    def __init__(
        self,
        calc: Calculator,
        *,
        backend: str,
        versions: tuple[int, ...] = (4, 6),
        endpoints: EndpointManager | None = None,
        ipsets: IpsetTable | None = None,
        runner: Callable[..., cmd.CommandResult] = cmd.run,
        on_restore: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.calc = calc
        self.versions = versions
        self.endpoints = endpoints if endpoints is not None else EndpointManager()
        self.ipsets = ipsets if ipsets is not None else IpsetTable(runner=runner)
        def hook(name: str) -> Callable[[bool], None] | None:
            if on_restore is None:
                return None
            cb = on_restore
            return lambda ok: cb(name, ok)

        self.filter: dict[int, IptablesTable] = {
            v: IptablesTable("filter", v, backend, runner=runner, on_restore=hook(f"filter{v}")) for v in versions
        }
        self.nat = IptablesTable("nat", 4, backend, runner=runner, on_restore=hook("nat4"))
        self._ep_iface: dict[str, str] = {}
        self._iface_users: dict[str, set[str]] = {}
        self._groups: dict[str | None, set[str]] = {}
        for v, table in self.filter.items():
            table.set_chains(rules.hook_chains(v))
            table.set_hooks(rules.FILTER_HOOKS)
            table.set_chains(rules.dispatch_root_chains((), ()))
        self.nat.set_chains(rules.nat_chains())
        self.nat.set_hooks(rules.NAT_HOOKS)
        self._pools_seen = False

    @property
    def tables(self) -> dict[str, IptablesTable]:
        out = {f"filter{v}": t for v, t in self.filter.items()}
        if 4 in self.versions:
            out["nat4"] = self.nat
        return out

    # --- managers: dirty calculation output → driver desired state (no I/O) -------------------------

    def update(self, dirty: Dirty) -> None:
        calc = self.calc
        for name in dirty.policies:
            pol = calc.policies.get(name)
            active = pol is not None and calc.policy_active(name)
            for v, table in self.filter.items():
                chains = rules.policy_chains(pol, v) if active and pol is not None else {}
                for direction in ("ingress", "egress"):
                    cname = rules.policy_chain(name, direction)
                    if cname in chains:
                        table.set_chain(cname, chains[cname])
                    else:
                        table.remove_chain(cname)
        for name in dirty.profiles:
            prof = calc.profiles.get(name)
            active = prof is not None and calc.profile_active(name)
            for v, table in self.filter.items():
                chains = rules.profile_chains(prof, v) if active and prof is not None else {}
                for direction in ("ingress", "egress"):
                    cname = rules.profile_chain(name, direction)
                    if cname in chains:
                        table.set_chain(cname, chains[cname])
                    else:
                        table.remove_chain(cname)
        dirty_groups: set[str | None] = set()
        roots_changed = False
        for key in dirty.endpoints:
            plan = calc.plan(key)
            old_iface = self._ep_iface.get(key)
            if old_iface is not None and (plan is None or plan.iface != old_iface):
                self.endpoints.remove_endpoint(key)
                del self._ep_iface[key]
                users = self._iface_users.get(old_iface, set())
                users.discard(key)
                if not users:
                    self._iface_users.pop(old_iface, None)
                    for table in self.filter.values():
                        table.remove_chain(rules.to_wl_chain(old_iface))
                        table.remove_chain(rules.from_wl_chain(old_iface))
                    g = rules.dispatch_group(old_iface)
                    members = self._groups.get(g)
                    if members is not None:
                        members.discard(old_iface)
                        if not members:
                            del self._groups[g]
                            roots_changed = True
                    dirty_groups.add(g)
            if plan is None:
                continue
            if not plan.iface.startswith(rules.WORKLOAD_PREFIX):
                log.warning("endpoint interface does not start with %r; its traffic bypasses felix's hooks "
                            "key=%s iface=%s", rules.WORKLOAD_PREFIX, key, plan.iface)
            self._ep_iface[key] = plan.iface
            users = self._iface_users.setdefault(plan.iface, set())
            if users - {key}:
                log.warning("two local endpoints name the same interface iface=%s keys=%s",
                            plan.iface, sorted(users | {key}))
            users.add(key)
            for v, table in self.filter.items():
                for cname, (head, block) in rules.endpoint_chain_parts(plan, v).items():
                    table.set_chain(cname, block, head=head)
            self.endpoints.set_endpoint(key, plan.iface, plan.ipv4_nets + plan.ipv6_nets)
            g = rules.dispatch_group(plan.iface)
            members = self._groups.get(g)
            if members is None:
                members = self._groups[g] = set()
                roots_changed = True
            if plan.iface not in members:
                members.add(plan.iface)
                dirty_groups.add(g)
        if None in dirty_groups:
            roots_changed = True
        for g in dirty_groups:
            if g is None:
                continue
            members = self._groups.get(g)
            chains = rules.dispatch_group_chains(g, members or ())
            for table in self.filter.values():
                if members:
                    table.set_chains(chains)
                else:
                    for cname in chains:
                        table.remove_chain(cname)
        if roots_changed:
            roots = rules.dispatch_root_chains(self._groups.get(None, ()), [g for g in self._groups if g is not None])
            for table in self.filter.values():
                table.set_chains(roots)
        for set_id in dirty.ipsets:
            for v in self.versions:
                name = rules.ipset_name(set_id, v)
                members_v = calc.ipset_members(set_id, v)
                if members_v is None:
                    self.ipsets.remove_set(name)
                else:
                    self.ipsets.set_members(name, members_v)
        if dirty.pools or not self._pools_seen:
            self._pools_seen = True
            nat, every = calc.pool_members(4)
            self.ipsets.set_members(rules.ipset_name(rules.NAT_POOLS, 4), nat)
            self.ipsets.set_members(rules.ipset_name(rules.ALL_POOLS, 4), every)
        if dirty.blocks:
            self.endpoints.set_blocks(calc.affine_blocks())

    # --- the apply, in its fixed order --------------------------------------------------------------

    def apply(self) -> ApplyReport:
        start = time.monotonic()
        report = ApplyReport()
        try:
            report.ipsets = self.ipsets.apply_updates()
        except (IpsetError, cmd.CommandError) as exc:
            report.errors.append(f"ipsets: {exc}")
        try:
            report.endpoints = self.endpoints.apply()
            if report.endpoints.routes.failed:
                report.errors.append(f"routes: {report.endpoints.routes.failed} failed")
        except OSError as exc:
            report.errors.append(f"routes: {exc}")
        for name, table in self.tables.items():
            try:
                report.iptables[name] = table.apply()
            except (IptablesError, cmd.CommandError) as exc:
                report.errors.append(f"iptables {name}: {exc}")
        try:
            report.ipset_deletes = self.ipsets.apply_deletes()
            if report.ipset_deletes.failed:
                report.errors.append(f"ipsets: {report.ipset_deletes.failed} could not be destroyed yet")
        except (IpsetError, cmd.CommandError) as exc:
            report.errors.append(f"ipsets: {exc}")
        report.duration = time.monotonic() - start
        return report

    def endpoint_states(self) -> dict[str, str]:
        """Workload key → ``up`` when its routes are programmed, else ``down``."""
        pending = set(self.endpoints.routes.pending) | set(self.endpoints.routes.failed)
        out: dict[str, str] = {}
        for key in self._ep_iface:
            ep = self.calc.endpoints.get(key)
            if ep is None:
                continue
            out[key] = "down" if any(n in pending for n in ep.nets) else "up"
        return out
