"""The namespace runner without Calyx's daemons: topology, etcd, cluster objects, FRR/BIRD routers,
status, exec, several instances at once, and a teardown that leaves nothing behind (also after a
``lab up`` that was killed half-way)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from calyx.datastore import keys
from calyx.lab import fabric, procs
from calyx.lab.runner import FRR_RUN, Lab, LabError, down_instance
from calyx.lab.topology import resolve
from tests.lab.conftest import instance_name, wait_until

pytestmark = pytest.mark.lab


def _frr_peer_states(lab: Lab, node: str) -> dict[str, str]:
    out = lab.run(node, ["vtysh", "-c", "show bgp summary json"], check=True).stdout
    peers = json.loads(out).get("ipv4Unicast", {}).get("peers", {})
    return {ip: p.get("state", "?") for ip, p in peers.items()}


def _kernel_routes(lab: Lab, node: str) -> set[str]:
    out = lab.run(node, ["ip", "-j", "route", "show"], check=True).stdout
    return {r["dst"] for r in json.loads(out)}


def test_two_racks_topology_etcd_and_tors(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab("two-racks", daemons=False)
    names = set(fabric.list_netns(lab.state.prefix))
    assert names == {lab.state.prefix + n for n in (*lab.topo.nodes, "_mgmt")}
    # the cluster objects are in the lab's etcd
    kvs, _ = lab.datastore().get_prefix(keys.NODES_PREFIX)
    assert sorted(kv.key.rsplit("/", 1)[-1] for kv in kvs) == ["h1a", "h1b", "h2a", "h2b"]
    # the ToRs peer with each other over eBGP and learn each other's rack subnet into the kernel
    wait_until(lambda: _frr_peer_states(lab, "tor1").get("10.0.0.1") == "Established", 30, "tor1-tor2 session")
    wait_until(lambda: "10.0.2.0/24" in _kernel_routes(lab, "tor1"), 15, "tor1 learning rack 2")
    # and the way back (the reply needs it: tor1's route alone raced tor2's under load)
    wait_until(lambda: "10.0.1.0/24" in _kernel_routes(lab, "tor2"), 15, "tor2 learning rack 1")
    assert "65002" in lab.router_routes("tor1")
    # underlay: a host of rack 1 reaches a host of rack 2 through both ToRs
    wait_until(lambda: lab.ping("h1a", "10.0.2.11", count=1, timeout=2), 10, "h1a reaching h2b across the racks")
    # the hosts reach etcd on the management network, as in containerlab
    code = f"import urllib.request; print(urllib.request.urlopen('{lab.etcd_endpoint_inside}/health').read().decode())"
    r = lab.run("h2b", [sys.executable, "-c", code])
    assert '"health":"true"' in r.stdout.replace(" ", ""), r.stderr
    # nothing of the lab is in the machine's own namespace
    root_links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    assert "mgmt0" not in root_links
    rows = {r["node"]: r for r in lab.status_rows()}
    assert rows["tor1"]["processes"] == "zebra up, bgpd up"
    assert rows["etcd"]["processes"] == "etcd up"


def test_route_reflectors_bird_and_cli(lab_root: Path) -> None:
    """The same through the command line, as an operator runs it, on the BIRD topology."""
    env = dict(os.environ, CALYX_LAB_DIR=str(lab_root))
    name = instance_name("c")
    # the console script's way: main() loads the lab group before running click
    cli = [sys.executable, "-c", "from calyx.cli.main import main; main()"]

    def calyxctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"calyxctl {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    try:
        up = calyxctl("lab", "up", "route-reflectors", "--name", name, "--no-daemons")
        assert f"lab {name} is up" in up.stdout
        st = calyxctl("lab", "status", name)
        assert "rr2" in st.stdout and "bird up" in st.stdout
        out = calyxctl("lab", "exec", name, "rr2", "birdc", "show", "protocols").stdout
        assert "rr1" in out and "BGP" in out
        assert calyxctl("lab", "exec", name, "h1", "ip", "-br", "addr", "show", "eth1").stdout.count("10.0.0.11/24")
        bad = calyxctl("lab", "exec", name, "nosuchnode", "true", check=False)
        assert bad.returncode == 1 and "no node or workload 'nosuchnode'" in bad.stderr
        again = calyxctl("lab", "up", "route-reflectors", "--name", name, "--no-daemons", check=False)
        assert again.returncode == 1 and "already up" in again.stderr
        # the failed second `up` did not tear down the running one
        assert "bird up" in calyxctl("lab", "status", name).stdout
    finally:
        down = calyxctl("lab", "down", name, check=False)
    assert down.returncode == 0, down.stderr
    assert fabric.list_netns(fabric.prefix_for(name)) == []
    assert not (lab_root / name).exists()
    assert "no lab" in calyxctl("lab", "status", name, check=False).stderr


def test_two_instances_at_once_do_not_clash(make_lab: Callable[..., Lab]) -> None:
    a = make_lab("two-racks", daemons=False)
    b = make_lab("two-racks", daemons=False)
    assert not set(fabric.list_netns(a.state.prefix)) & set(fabric.list_netns(b.state.prefix))
    assert a.state.etcd_port != b.state.etcd_port
    for lab in (a, b):
        def up(lab: Lab = lab) -> bool:
            return _frr_peer_states(lab, "tor2").get("10.0.0.0") == "Established"

        wait_until(up, 30, "ToR session")
    a.down()
    assert fabric.list_netns(a.state.prefix) == []
    assert all(p.alive for p in b.state.procs), "tearing one instance down touched the other"
    assert _frr_peer_states(b, "tor2").get("10.0.0.0") == "Established"


def _lab_leftovers(prefix: str, procs_before: list[procs.Proc]) -> list[str]:
    left = [f"namespace {n}" for n in fabric.list_netns(prefix)]
    left += [f"FRR dir {d}" for d in (FRR_RUN.iterdir() if FRR_RUN.is_dir() else [])
             if d.name.startswith(prefix.replace(".", "_"))]
    left += [f"process {p.name}" for p in procs_before if p.alive]
    return left


def test_down_after_a_killed_up_leaves_nothing(lab_root: Path) -> None:
    """`lab up` killed with SIGKILL half-way (etcd and routers running); `lab down` from another process."""
    name = instance_name("k")
    env = dict(os.environ, CALYX_LAB_DIR=str(lab_root))
    proc = subprocess.Popen([sys.executable, "-c", "from calyx.cli.main import main; main()", "lab", "up",
                             "two-racks", "--name", name, "--no-daemons"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    state = lab_root / name / "state.json"
    try:
        wait_until(lambda: state.exists() and '"tor1/zebra"' in state.read_text(), 30, "up to start tor1")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        started = Lab.attach(name, root=lab_root).state.procs
        assert any(p.name == "etcd" and p.alive for p in started)
        prefix = fabric.prefix_for(name)
        assert fabric.list_netns(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
        removed = down_instance(name, root=lab_root)
    assert any(r.startswith("namespace") for r in removed)
    assert _lab_leftovers(prefix, started) == []
    assert not (lab_root / name).exists()


def test_down_without_a_state_file_sweeps_by_prefix(make_lab: Callable[..., Lab], lab_root: Path) -> None:
    """Even when the state file is gone, the instance's namespaces, every process inside them and the
    etcd forwarder (which runs in the machine's namespace, found by its command line) go."""
    lab = make_lab("two-racks", daemons=False)
    started = list(lab.state.procs)
    assert any(p.name == "forwarder" and p.alive for p in started)
    (lab.dir / "state.json").unlink()
    removed = down_instance(lab.state.instance, root=lab_root)  # no state, no topology: by prefix only
    assert "stray etcd forwarder(s)" in removed
    assert [p.name for p in started if p.alive] == []
    assert fabric.list_netns(lab.state.prefix) == []


def test_a_router_that_cannot_start_is_named_with_its_log(lab_root: Path, tmp_path: Path) -> None:
    src = resolve("two-racks").parent
    dst = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    conf = dst / "tor2" / "frr.conf"
    conf.write_text(conf.read_text().replace("router bgp 65002", "router bgp 65002 65003 bogus"))
    lab = Lab.create(dst / "two-racks.clab.yml", instance=instance_name("b"), root=lab_root)
    try:
        with pytest.raises(LabError) as info:
            lab.up(daemons=False)
        assert info.value.node == "tor2"
        assert "tor2: vtysh could not apply" in str(info.value)
        assert "(last lines)" in str(info.value)
    finally:
        lab.down()
    assert fabric.list_netns(lab.state.prefix) == []


def test_missing_daemons_are_reported_not_faked(lab_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from calyx.lab import runner

    monkeypatch.setitem(runner.PROGRAMS, "felix", "felix.no_such_module")
    lab = Lab.create(resolve("two-racks"), instance=instance_name("m"), root=lab_root)
    t0 = time.monotonic()
    with pytest.raises(LabError, match=r"felix \(module felix.no_such_module\).*--no-daemons"):
        lab.up()
    assert time.monotonic() - t0 < 5
    assert not lab.owned and fabric.list_netns(lab.state.prefix) == []


_BIRD_HOST = """
router id {ip};
protocol device {{}}
protocol static {{ ipv4; route {block} blackhole; }}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}
protocol bgp tor {{
  local {ip} as {asn}; neighbor {tor} as {asn}; direct; hold time 9; connect retry time 2;
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
"""


def test_tor_configs_carry_host_blocks_between_racks(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    """The ToRs' side of two-racks, with BIRD standing in for each host's BGP speaker: a block a host
    announces reaches the other host of its rack (reflected, next hop unchanged) and both hosts of the
    other rack (eBGP between the ToRs, next hop self), and packets follow. This pins the lab's FRR
    configuration down independently of bgpd."""
    lab = make_lab("two-racks", daemons=False)
    hosts = {"h1a": ("10.0.1.11", "10.0.1.1", 65001, 1), "h1b": ("10.0.1.12", "10.0.1.1", 65001, 2),
             "h2a": ("10.0.2.11", "10.0.2.1", 65002, 3), "h2b": ("10.0.2.12", "10.0.2.1", 65002, 4)}
    started = []
    try:
        for h, (ip, tor, asn, n) in hosts.items():
            conf = tmp_path / f"{h}.conf"
            conf.write_text(_BIRD_HOST.format(ip=ip, tor=tor, asn=asn, block=f"10.65.{n}.0/26"))
            lab.run(h, ["ip", "addr", "add", f"10.65.{n}.1/32", "dev", "lo"], check=True)
            started.append(procs.spawn(f"{h}/bird-standin", ["bird", "-f", "-c", str(conf), "-s",
                                                             str(tmp_path / f"{h}.ctl")],
                                       log=tmp_path / f"{h}.log", netns=lab.ns(h), node=h))
        blocks = {f"10.65.{n}.0/26" for *_, n in hosts.values()}

        def converged() -> bool:
            return all(blocks - {f"10.65.{hosts[h][3]}.0/26"} <= _kernel_routes(lab, h) for h in hosts)

        wait_until(converged, 40, "every host's kernel holding the other hosts' blocks")
        assert blocks <= lab.router_prefixes("tor1") and blocks <= lab.router_prefixes("tor2")
        # inside a rack the next hop is the other host itself; across racks it is the own ToR
        r = json.loads(lab.run("h1a", ["ip", "-j", "route", "show", "10.65.2.0/26"], check=True).stdout)
        assert r[0]["gateway"] == "10.0.1.12"
        r = json.loads(lab.run("h1a", ["ip", "-j", "route", "show", "10.65.4.0/26"], check=True).stdout)
        assert r[0]["gateway"] == "10.0.1.1"
        for src, dst in (("h1a", "10.65.2.1"), ("h1a", "10.65.4.1"), ("h2b", "10.65.1.1"), ("h2a", "10.65.3.1")):
            r2 = lab.run(src, ["ping", "-c", "1", "-W", "2", "-I", f"10.65.{hosts[src][3]}.1", dst])
            assert r2.returncode == 0, f"{src} -> {dst}: {r2.stdout}"
    finally:
        procs.stop(started)


def test_bird_reflector_config_reflects_between_hosts(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    """route-reflectors' rr2 (BIRD) with BIRD standing in for the hosts: every host learns every other
    host's block with the originating host as next hop (reflected, not rewritten), and packets follow."""
    lab = make_lab("route-reflectors", daemons=False)
    hosts = {f"h{n}": (f"10.0.0.1{n}", n) for n in range(1, 5)}
    started = []
    try:
        for h, (ip, n) in hosts.items():
            conf = tmp_path / f"{h}.conf"
            conf.write_text(_BIRD_HOST.format(ip=ip, tor="10.0.0.3", asn=64512, block=f"10.66.{n}.0/26")
                            .replace("next hop self", "next hop address " + ip))
            lab.run(h, ["ip", "addr", "add", f"10.66.{n}.1/32", "dev", "lo"], check=True)
            started.append(procs.spawn(f"{h}/bird-standin", ["bird", "-f", "-c", str(conf), "-s",
                                                             str(tmp_path / f"{h}.ctl")],
                                       log=tmp_path / f"{h}.log", netns=lab.ns(h), node=h))

        def converged() -> bool:
            return all({f"10.66.{m}.0/26" for m in range(1, 5) if m != n} <= _kernel_routes(lab, h)
                       for h, (_, n) in hosts.items())

        wait_until(converged, 40, "every host's kernel holding the other hosts' blocks through rr2")
        r = json.loads(lab.run("h1", ["ip", "-j", "route", "show", "10.66.4.0/26"], check=True).stdout)
        assert r[0]["gateway"] == "10.0.0.14"
        assert lab.run("h1", ["ping", "-c", "1", "-W", "2", "-I", "10.66.1.1", "10.66.4.1"]).returncode == 0
    finally:
        procs.stop(started)


def test_cross_subnet_refuses_daemons_without_ipip(lab_root: Path) -> None:
    """Where the kernel has no ipip (this project's machines), the lab says so and leaves nothing."""
    probe_ns = f"cx-{instance_name('p')}.probe"
    fabric.add_netns(probe_ns)
    try:
        from calyx.lab.runner import ipip_available

        if ipip_available(probe_ns):
            pytest.skip("this kernel has ipip: the cross-subnet lab runs here (its datapath is the IP-in-IP issue's)")
    finally:
        fabric.delete_netns(probe_ns)
    lab = Lab.create(resolve("cross-subnet"), instance=instance_name("x"), root=lab_root)
    try:
        with pytest.raises(LabError, match="needs IP-in-IP and this kernel has no ipip"):
            lab.up(daemons=["felix"])
    finally:
        lab.down()
    assert fabric.list_netns(lab.state.prefix) == []
