"""The managers and the apply order: calculation results in, driver desired state out, then I/O.

What it owns: the mapping from :class:`~felix.calc.Calculator` output to the drivers, and the one
fixed order in which the drivers touch the kernel. :meth:`Dataplane.update` is the managers' cheap
part (Calico's ``OnUpdate``): it renders only what the calculation marked dirty into the drivers'
desired state, with no I/O. :meth:`Dataplane.apply` is ``CompleteDeferredWork``:

1. ipsets created and updated (rules may reference them from now on);
2. tunnel devices, tunnel addresses and the workload MTU file (:class:`~felix.tunnels.TunnelManager`,
   when felix runs with a datastore), then routes and interface sysctls
   (:class:`~felix.endpoints.EndpointManager`);
3. iptables: filter (IPv4, IPv6), then nat (IPv4);
4. ipsets no longer referenced destroyed.

A failing step is reported and its resources stay dirty (retried by the daemon with backoff); the
other steps still run, so one bad object never blocks the rest of the host.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from calyx.kernel import cmd
from felix import rules
from felix.calc import Calculator, Dirty, IPNet
from felix.endpoints import EndpointApply, EndpointManager
from felix.ipsets import IpsetError, IpsetStats, IpsetTable
from felix.iptables import ApplyStats, IptablesError, IptablesTable, split_save
from felix.tunnels import TunnelApply, TunnelManager, host_addresses

log = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)
    ipsets: IpsetStats | None = None
    ipset_deletes: IpsetStats | None = None
    endpoints: EndpointApply | None = None
    iptables: dict[str, ApplyStats] = field(default_factory=dict)
    tunnels: TunnelApply | None = None

    @property
    def did_work(self) -> bool:
        return bool(
            (self.ipsets and self.ipsets.did_work)
            or (self.ipset_deletes and self.ipset_deletes.did_work)
            or (self.endpoints and self.endpoints.routes.did_work)
            or (self.endpoints and self.endpoints.sysctl_writes)
            or any(s.did_work for s in self.iptables.values())
            or (self.tunnels and self.tunnels.did_work)
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
        if self.tunnels is not None and self.tunnels.changes:
            parts.append(f"tunnel_changes={len(self.tunnels.changes)}")
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
        tunnels: TunnelManager | None = None,
    ) -> None:
        self.calc = calc
        self.tunnels = tunnels
        self._tunnel_modes = (False, False)
        self._runner = runner
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
        # per IP version: dispatch group -> interface -> the endpoint's addresses of that version
        self._groups: dict[int, dict[str | None, dict[str, tuple[IPNet, ...]]]] = {v: {} for v in versions}
        for v, table in self.filter.items():
            table.set_chains(rules.hook_chains(v))
            table.set_hooks(rules.FILTER_HOOKS)
            table.set_chains(rules.dispatch_root_chains({}, ()))
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
        dirty_groups: dict[int, set[str | None]] = {v: set() for v in self.filter}
        roots_changed: dict[int, bool] = dict.fromkeys(self.filter, False)
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
                    for v in self.filter:
                        self._unprogram(v, old_iface, dirty_groups[v], roots_changed)
            if plan is None:
                continue
            if not plan.iface.startswith(rules.WORKLOAD_PREFIX):
                log.warning("endpoint interface does not start with %r; its traffic bypasses felix's hooks",
                            rules.WORKLOAD_PREFIX, extra={"endpoint": key, "iface": plan.iface})
            self._ep_iface[key] = plan.iface
            users = self._iface_users.setdefault(plan.iface, set())
            if users - {key}:
                log.warning("two local endpoints name the same interface",
                            extra={"iface": plan.iface, "endpoints": sorted(users | {key})})
            users.add(key)
            for v, table in self.filter.items():
                if not (plan.ipv4_nets if v == 4 else plan.ipv6_nets):
                    # No address of this family: the endpoint gets no chains for it, and its interface
                    # falls to the dispatch chains' final DROP for this family (fail closed).
                    self._unprogram(v, plan.iface, dirty_groups[v], roots_changed)
                    continue
                for cname, block in rules.endpoint_chains(plan, v).items():
                    table.set_chain(cname, block)
                g = rules.dispatch_group(plan.iface)
                groups = self._groups[v]
                members = groups.get(g)
                if members is None:
                    members = groups[g] = {}
                    roots_changed[v] = True
                nets = plan.ipv4_nets if v == 4 else plan.ipv6_nets
                if members.get(plan.iface) != nets:
                    members[plan.iface] = nets
                    dirty_groups[v].add(g)
            self.endpoints.set_endpoint(key, plan.iface, plan.ipv4_nets + plan.ipv6_nets)
        for v, table in self.filter.items():
            groups = self._groups[v]
            if None in dirty_groups[v]:
                roots_changed[v] = True
            for g in dirty_groups[v]:
                if g is None:
                    continue
                members = groups.get(g)
                chains = rules.dispatch_group_chains(g, members or {})
                if members:
                    table.set_chains(chains)
                else:
                    for cname in chains:
                        table.remove_chain(cname)
            if roots_changed[v]:
                table.set_chains(rules.dispatch_root_chains(groups.get(None, {}), [g for g in groups if g is not None]))
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
        if self.tunnels is not None and (dirty.pools or dirty.nodes):
            self._update_tunnels()

    def _update_tunnels(self) -> None:
        """Tunnel manager input, the hosts ipset and the INPUT rules for tunnel traffic (no I/O)."""
        assert self.tunnels is not None
        self.tunnels.update(self.calc.pools, self.calc.nodes)
        modes = (self.tunnels.ipip, self.tunnels.vxlan)
        hosts = rules.ipset_name(rules.ALL_HOSTS, 4)
        if any(modes):
            self.ipsets.set_members(hosts, host_addresses(self.calc.nodes))
        else:
            self.ipsets.remove_set(hosts)
        if modes != self._tunnel_modes and 4 in self.filter:
            self._tunnel_modes = modes
            self.filter[4].set_chains({rules.INPUT: rules.hook_chains(4, ipip=modes[0], vxlan=modes[1])[rules.INPUT]})

    def _unprogram(self, version: int, iface: str, dirty_groups: set[str | None],
                   roots_changed: dict[int, bool]) -> None:
        """Take ``iface``'s chains and dispatch entries out of the ``version`` table."""
        table = self.filter[version]
        table.remove_chain(rules.to_wl_chain(iface))
        table.remove_chain(rules.from_wl_chain(iface))
        g = rules.dispatch_group(iface)
        groups = self._groups[version]
        members = groups.get(g)
        if members is not None and iface in members:
            del members[iface]
            dirty_groups.add(g)
            if not members:
                del groups[g]
                roots_changed[version] = True

    def read_back(self) -> None:
        """Read the kernel's iptables and ipsets now (no writes). The daemon calls it at start, while
        the datastore snapshot is still loading, so that the first apply only diffs."""
        for t in self.tables.values():
            t.resync()
        self._read_tables()
        self.ipsets.readback()

    def _read_tables(self) -> None:
        """Read back every table that needs it: one ``iptables-save`` per IP version covering all its
        tables (on nft every save fetches the whole ruleset, whatever ``-t`` says, so one save per
        table would pay that several times), the versions in parallel."""
        todo = [t for t in self.tables.values() if t.needs_readback]
        if not todo:
            return
        by_version: dict[int, list[IptablesTable]] = {}
        for t in todo:
            by_version.setdefault(t.version, []).append(t)

        def read(tables: list[IptablesTable]) -> None:
            if len(tables) == 1:
                tables[0].load_saved(tables[0].save())
                return
            sections = split_save(tables[0].save(all_tables=True))
            for t in tables:
                t.load_saved(sections.get(t.table, ""))

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(by_version)) as pool:
            list(pool.map(read, by_version.values()))

    def resync_all(self) -> None:
        """Read everything back at the next apply."""
        for t in self.tables.values():
            t.resync()
        self.ipsets.resync()
        self.endpoints.resync()

    # --- the apply, in its fixed order --------------------------------------------------------------

    def apply(self) -> ApplyReport:
        start = time.monotonic()
        report = ApplyReport()
        try:
            report.ipsets = self.ipsets.apply_updates()
        except (IpsetError, cmd.CommandError) as exc:
            report.errors.append(f"ipsets: {exc}")
        if self.tunnels is not None:
            report.tunnels = self.tunnels.apply()
            report.errors += report.tunnels.errors
        try:
            report.endpoints = self.endpoints.apply()
            if report.endpoints.routes.failed:
                report.errors.append(f"routes: {report.endpoints.routes.failed} failed")
        except OSError as exc:
            report.errors.append(f"routes: {exc}")
        try:
            self._read_tables()
        except cmd.CommandError as exc:
            log.debug("parallel iptables readback failed (each table reads back alone): %s", exc)
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
