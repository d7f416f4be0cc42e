"""End to end on the namespace runner with the real felix, bgpd, CNI plugins, FRR, BIRD and etcd.

two-racks: every workload reaches every other one through the ToRs; the ToRs carry blocks, not
/32s; tenant isolation by policy; kill -9 and restart of felix and of bgpd under a continuous
cross-rack ping loses nothing; a ToR restart heals; a new endpoint's convergence time (reported);
a removed host's routes are withdrawn everywhere (last: it changes the lab).
route-reflectors: reachability through the Calyx and the BIRD reflector, and with either down.

Fails, naming them, when felix, bgpd or the CNI plugins are not installed.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from calyx import model
from calyx.datastore import keys
from calyx.lab import fabric
from calyx.lab.convergence import probe
from calyx.lab.runner import Lab, ping_counts
from calyx.lab.topology import Workload, resolve
from tests.lab.conftest import instance_name, need, wait_until

pytestmark = pytest.mark.lab

PROGRAMS = ("felix", "bgpd", "calyx", "calyx-ipam")


def _full_lab(name: str, root: Path) -> Iterator[Lab]:
    need(*PROGRAMS)
    lab = Lab.create(resolve(name), instance=instance_name("e"), root=root)
    try:
        lab.up()
        yield lab
    finally:
        if lab.owned:
            lab.down()
        assert fabric.list_netns(lab.state.prefix) == []


@pytest.fixture(scope="module")
def racks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _full_lab("two-racks", tmp_path_factory.mktemp("labs"))


@pytest.fixture(scope="module")
def reflectors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _full_lab("route-reflectors", tmp_path_factory.mktemp("labs"))


def _all_reach(lab: Lab, names: list[str] | None = None) -> bool:
    return all(lab.ping_matrix(names).values())


def _failed(lab: Lab) -> list[tuple[str, str]]:
    return [k for k, ok in lab.ping_matrix().items() if not ok]


def _ip(lab: Lab, wl: str) -> str:
    ip = lab.state.workloads[wl].ip
    assert ip is not None
    return ip


# --- felix and the CNI plugins alone (no BGP: workloads of one host) ---------------------------------


def test_felix_only_same_host_workloads_and_tenant_policy(make_lab: Callable[..., Lab]) -> None:
    need("felix", "calyx", "calyx-ipam")
    lab = make_lab("two-racks", daemons=["felix"])
    assert lab.state.phase == "up (felix)"
    pairs = [(f"a-{h}", f"b-{h}") for h in ("h1a", "h1b", "h2a", "h2b")]

    def matrix() -> dict[tuple[str, str], bool]:
        return lab.ping_pairs(pairs + [(b, a) for a, b in pairs], timeout=0.5)

    wait_until(lambda: all(matrix().values()), 20, "the two workloads of each host reaching each other")
    # the endpoints are in etcd with their labels and profiles, written by the CNI plugin
    for ws in lab.state.workloads.values():
        felix, _ = lab.node_status(ws.host)
        assert felix is not None and felix.in_sync and felix.endpoints == 2
    policy = lab.topo.policies["tenant-isolation"]
    lab.apply_file(policy)
    wait_until(lambda: not any(matrix().values()), 20, "tenant a cut off from tenant b on every host")
    lab.delete_objects(policy)
    wait_until(lambda: all(matrix().values()), 20, "tenants reaching each other again")


# --- two racks ---------------------------------------------------------------------------------------


def test_every_workload_reaches_every_other_through_the_tors(racks: Lab) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    assert len(racks.state.workloads) == 8
    # addresses come from the hosts' own blocks
    for ws in racks.state.workloads.values():
        addr = ipaddress.ip_address(_ip(racks, ws.name))
        assert any(addr in ipaddress.ip_network(b) for b in racks.blocks_of(ws.host)), ws
    # every ADD went through the host's CNI service, as calyx-cni.service would run it
    for host in {ws.host for ws in racks.state.workloads.values()}:
        log = racks.log_path(host, "cni").read_text()
        adds = [line for line in log.splitlines() if " ADD container=" in line and "exit=0" in line]
        assert len(adds) == sum(ws.host == host for ws in racks.state.workloads.values()), log


def test_hosts_leave_the_nodes_the_lab_wrote(racks: Lab) -> None:
    """felix and bgpd register their node at start; the lab wrote every Node first, so every field is
    the operator's: the values are byte for byte what cluster.yaml applied, with no self_registered."""
    from calyx.cli import resources

    assert racks.topo.cluster_file is not None
    docs = resources.parse_documents(racks.topo.cluster_file.read_text(), str(racks.topo.cluster_file))
    nodes = [d for d in docs if isinstance(d.obj, model.Node)]
    assert {d.name for d in nodes} == {"h1a", "h1b", "h2a", "h2b"}
    for d in nodes:
        kv = racks.datastore().get(d.key)
        assert kv is not None and kv.value == model.encode(d.obj), (d.key, kv)
        for daemon in ("felix", "bgpd"):
            assert "node registration: updated" not in racks.log_path(d.name, daemon).read_text()


def test_tors_carry_blocks_not_workload_routes(racks: Lab) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    for tor in ("tor1", "tor2"):
        prefixes = racks.router_prefixes(tor)
        pool = ipaddress.IPv4Network("10.65.0.0/16")
        in_pool = [ipaddress.IPv4Network(p) for p in prefixes if ipaddress.IPv4Network(p).subnet_of(pool)]
        assert in_pool, f"{tor} learned no workload block: {sorted(prefixes)}"
        assert all(n.prefixlen == 26 for n in in_pool), f"{tor} carries more than blocks: {in_pool}"
        for host in ("h1a", "h1b", "h2a", "h2b"):
            for block in racks.blocks_of(host):
                assert block in prefixes, f"{tor} lacks {host}'s block {block}"


def test_tenant_isolation(racks: Lab) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    policy = racks.topo.policies["tenant-isolation"]
    racks.apply_file(policy)
    try:
        def isolated() -> bool:
            m = racks.ping_matrix()
            return all(ok == (a[0] == b[0]) for (a, b), ok in m.items())

        wait_until(isolated, 20, "tenant a isolated (a-* only with a-*, b-* only with b-*)")
    finally:
        racks.delete_objects(policy)
    wait_until(lambda: _all_reach(racks), 20, "full reachability after the policy is deleted")


@pytest.mark.parametrize("daemon", ["felix", "bgpd"])
def test_daemon_kill_and_restart_loses_no_packet(racks: Lab, daemon: str) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    # traffic from rack 1 into a workload of h2a while h2a's daemon dies and comes back
    ping = racks.start_ping("a-h1a", _ip(racks, "a-h2a"), seconds=8, interval=0.05)
    time.sleep(1.0)
    racks.stop_daemon("h2a", daemon, kill=True)
    time.sleep(0.5)
    racks.start_daemon("h2a", daemon)
    racks.wait_ready(["h2a"], timeout=60)
    sent, received = ping_counts(ping)
    assert sent >= 100
    assert received == sent, f"{sent - received} of {sent} packets lost across a kill -9 of {daemon}"
    assert _all_reach(racks)


def test_tor_restart_heals(racks: Lab) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    racks.stop_router("tor2", kill=True)
    time.sleep(1)
    racks.start_router("tor2")
    took = wait_until(lambda: _all_reach(racks), 60, "full reachability after the ToR restart")
    racks.wait_ready(timeout=60)
    print(f"two-racks: full ping matrix {took:.1f} s after tor2 came back")


def test_convergence_endpoint_to_reachable_from_the_other_rack(racks: Lab, record_property: object) -> None:
    """Endpoint written to etcd → a workload on the other rack gets a reply, through every stage: the
    endpoint's address comes from a pool of /32 blocks, so each one needs bgpd to announce it, tor2 to
    learn it, tor1 and h1a to install it (the worst case; an address in an already announced block
    needs none of that)."""
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    racks.apply_text("kind: IPPool\nname: conv-pool\nspec: {cidr: 10.70.0.0/24, block_size: 32}\n")
    samples = []
    with probe(racks, host="h2b", router="tor2", pinger="b-h1a") as p:
        for i in range(3):
            samples.append(p.measure(Workload(f"conv-{i}", "h2b", {"tenant": "b"}, ("lab",), ("conv-pool",))))
    for s in samples:
        print(f"convergence: {json.dumps(s.__dict__)}")
        assert s.new_block and s.ip.startswith("10.70.0."), s
        assert None not in (s.programmed, s.tor_learned, s.remote_installed, s.reachable), f"a stage was not seen: {s}"
        assert s.reachable is not None and s.reachable < 2.0, s
    record_property("convergence_s", [s.reachable for s in samples])  # type: ignore[operator]


def test_removed_host_routes_are_withdrawn_everywhere(racks: Lab) -> None:
    wait_until(lambda: _all_reach(racks), 30, "a full ping matrix")
    blocks = racks.blocks_of("h2b")
    assert blocks
    t0 = time.monotonic()
    racks.remove_host("h2b")
    others = ("h1a", "h1b", "h2a")

    def withdrawn() -> bool:
        if any(b in racks.router_prefixes(t) for t in ("tor1", "tor2") for b in blocks):
            return False
        return not any(b in racks.kernel_routes(h) for h in others for b in blocks)

    # graceful restart keeps them as stale for the cluster's restart time (20 s in this lab) at most
    wait_until(withdrawn, 45, f"h2b's blocks {blocks} withdrawn from both ToRs and every other host")
    print(f"two-racks: h2b's routes withdrawn everywhere {time.monotonic() - t0:.1f} s after it vanished")
    remaining = [w for w in racks.state.workloads if racks.state.workloads[w].host != "h2b"]
    assert all(racks.ping_matrix(remaining).values())


# --- route reflectors --------------------------------------------------------------------------------


def test_reachability_through_route_reflectors(reflectors: Lab) -> None:
    wait_until(lambda: _all_reach(reflectors), 30, "a full ping matrix")
    # both reflectors hold every host's blocks
    assert {b for h in ("h1", "h2", "h3", "h4") for b in reflectors.blocks_of(h)} <= reflectors.router_prefixes("rr2")


def test_either_reflector_alone_is_enough(reflectors: Lab) -> None:
    """With one reflector down, the other alone carries routes, including ones announced meanwhile (a
    workload from a pool of /32 blocks: its address must travel through the remaining reflector)."""
    wait_until(lambda: _all_reach(reflectors), 30, "a full ping matrix")
    reflectors.apply_text("kind: IPPool\nname: rr-pool\nspec: {cidr: 10.71.0.0/24, block_size: 32}\n")

    def new_workload_reachable(name: str, host: str) -> None:
        ws = reflectors.add_workload(Workload(name, host, {"tenant": "a"}, ("lab",), ("rr-pool",)))
        assert ws.ip is not None and ws.ip.startswith("10.71.0.")
        wait_until(lambda: reflectors.ping("w-h1", str(ws.ip)), 20, f"{name} on {host} reachable from h1")

    # BIRD stopped cleanly (it sends a Cease, so the hosts drop its routes at once): rr1 alone
    reflectors.stop_router("rr2")
    try:
        time.sleep(1)
        wait_until(lambda: _all_reach(reflectors), 30, "reachability with only the Calyx reflector")
        new_workload_reachable("via-rr1", "h3")
    finally:
        reflectors.start_router("rr2")
    reflectors.wait_ready(timeout=60)
    wait_until(lambda: _all_reach(reflectors), 30, "reachability with both reflectors")
    # rr1's bgpd stopped: with graceful restart the clients keep its routes as stale until the
    # restart time (10 s in this lab) runs out; after that only BIRD's routes are left
    kv = reflectors.datastore().get(keys.CLUSTER_CONFIG_KEY)
    assert kv is not None
    cluster = model.decode(kv.key, kv.value)
    assert isinstance(cluster, model.ClusterConfig)
    reflectors.stop_daemon("rr1", "bgpd")
    try:
        time.sleep(cluster.graceful_restart_time + 3)
        wait_until(lambda: _all_reach(reflectors), 30, "reachability with only the BIRD reflector")
        new_workload_reachable("via-rr2", "h4")
    finally:
        reflectors.start_daemon("rr1", "bgpd")
    reflectors.wait_ready(timeout=60)
