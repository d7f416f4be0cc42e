"""The CNI service (calyx-cni-server) with real clients: cnitool in a "host" namespace, a real etcd.

What must hold: a call through the service gives what the same call gives in the plugin's own
process (results, errors, datastore), the work happens in the *caller's* namespace, concurrent calls
do not mix, and when the service is gone the plugin runs the call itself.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess

import pytest

from calyx.datastore import keys
from calyx.model import IPPool, Node
from tests.fixtures.cni import CniHost, CniService, nsenter

pytestmark = [pytest.mark.privileged, pytest.mark.etcd]


@pytest.fixture
def pool(cni_host: CniHost) -> IPPool:
    p = IPPool("pool1", ipaddress.ip_network("10.71.0.0/16"), 26)
    cni_host.put(p)
    cni_host.put(Node(cni_host.node))
    return p


def _ok(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    result = json.loads(proc.stdout)
    assert isinstance(result, dict)
    return result


def _served(svc: CniService, command: str, container: str) -> bool:
    return any(f" {command} container={container} " in line and "exit=" in line for line in svc.log().splitlines())


def test_add_check_del_through_the_service_in_the_callers_namespace(cni_host: CniHost, cni_service: CniService,
                                                                     cnitool: str, pool: IPPool) -> None:
    h = cni_host
    h.write_conflist("svcnet", [h.calyx_plugin(labels={"app": "web"})])
    c1, c2 = h.new_netns(), h.new_netns()
    r1 = _ok(h.cnitool(cnitool, "add", "svcnet", c1.path))
    r2 = _ok(h.cnitool(cnitool, "add", "svcnet", c2.path))
    a1 = ipaddress.ip_interface(r1["ips"][0]["address"]).ip  # type: ignore[index]
    a2 = ipaddress.ip_interface(r2["ips"][0]["address"]).ip  # type: ignore[index]
    assert a1 != a2 and a1 in pool.cidr and a2 in pool.cidr
    host_if = r1["interfaces"][0]["name"]  # type: ignore[index]
    assert r1["interfaces"][1]["sandbox"] == c1.path  # type: ignore[index]
    # the service ran them (its log names each call), in the caller's namespace, not its own
    assert len([x for x in _lines_with(h, " ADD container=") if "exit=0" in x]) == 2, cni_service.log()
    assert host_if in h.host_links()
    assert subprocess.run(["ip", "link", "show", host_if], check=False, capture_output=True).returncode != 0
    # the datapath works: one container pings the other through the host
    c1.run("ping", "-c", "1", "-W", "2", str(a2))
    _ok_check = h.cnitool(cnitool, "check", "svcnet", c1.path)
    assert _ok_check.returncode == 0, _ok_check.stdout + _ok_check.stderr
    for c in (c1, c2):
        d = h.cnitool(cnitool, "del", "svcnet", c.path)
        assert d.returncode == 0, d.stdout + d.stderr
    assert not [n for n in h.host_links() if n.startswith("cali")]
    assert h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0] == []
    assert h.ds.get_prefix(keys.workloads_prefix(h.node))[0] == []


def _lines_with(h: CniHost, word: str) -> list[str]:
    log = h.root / "cni-server.log"
    return [x for x in log.read_text().splitlines() if word in x] if log.exists() else []


@pytest.mark.parametrize("case", ["not-json", "no-type", "old-version", "vanished-netns", "no-netns"])
def test_errors_through_the_service_are_the_plugins_own(cni_host: CniHost, cni_service: CniService,
                                                         pool: IPPool, case: str) -> None:
    """Bad input meets the same error code and message as without the service, and changes nothing."""
    h = cni_host
    conf = {"cniVersion": "1.0.0", "name": "svcnet", **h.calyx_plugin()}
    netns = h.new_netns().path
    data: bytes = json.dumps(conf).encode()
    if case == "not-json":
        data = b'{"cniVersion": "1.0.0", "name": '
    elif case == "no-type":
        data = json.dumps({k: v for k, v in conf.items() if k != "ipam"}).encode()
    elif case == "old-version":
        data = json.dumps({**conf, "cniVersion": "0.1.0"}).encode()
    elif case == "vanished-netns":
        netns = "/run/netns/calyx-test-does-not-exist"
    before = h.dump()
    answers = []
    for socket_path in (str(cni_service.socket), "off"):
        h.cni_socket = socket_path
        answers.append(h.plugin("calyx", "ADD", data, container_id=f"err-{case}",
                                netns="" if case == "no-netns" else netns))
    served, local = answers
    assert served == local, (served, local)
    code, err = served
    assert code != 0 and isinstance(err, dict) and isinstance(err.get("code"), int) and err.get("msg")
    assert h.dump() == before
    assert _served(cni_service, "ADD", f"err-{case}"), cni_service.log()


def test_concurrent_adds_through_the_service_do_not_mix(cni_host: CniHost, cni_service: CniService,
                                                         cnitool: str, pool: IPPool) -> None:
    h = cni_host
    h.write_conflist("svcnet", [h.calyx_plugin()])
    conts = [h.new_netns() for _ in range(12)]
    procs = [subprocess.Popen([*nsenter(h.host), cnitool, "add", "svcnet", c.path], env=h.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in conts]
    results = []
    for c, p in zip(conts, procs, strict=True):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
        r = json.loads(out)
        assert r["interfaces"][1]["sandbox"] == c.path  # each caller got its own answer
        results.append(r["ips"][0]["address"])
    assert len(set(results)) == len(results) == 12
    assert len(h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0]) == 12
    for c in conts:
        [eth0] = c.ip_json("addr", "show", "dev", "eth0")
        assert any(a["family"] == "inet" for a in eth0["addr_info"])
    for c in conts:
        assert h.cnitool(cnitool, "del", "svcnet", c.path).returncode == 0


def test_without_the_service_the_plugin_runs_the_call_itself(cni_host: CniHost, cni_service: CniService,
                                                             cnitool: str, pool: IPPool) -> None:
    """kill -9 leaves the socket file with nobody listening: calls still succeed, in-process."""
    h = cni_host
    h.write_conflist("svcnet", [h.calyx_plugin()])
    c1 = h.new_netns()
    _ok(h.cnitool(cnitool, "add", "svcnet", c1.path))
    served_before = len(_lines_with(h, "exit="))
    assert cni_service.stop(signal.SIGKILL) == -signal.SIGKILL
    assert cni_service.socket.exists()
    c2 = h.new_netns()
    r2 = _ok(h.cnitool(cnitool, "add", "svcnet", c2.path))
    assert r2["interfaces"][1]["sandbox"] == c2.path  # type: ignore[index]
    assert len(_lines_with(h, "exit=")) == served_before  # nobody served it
    # a restarted service replaces the stale socket and serves again
    cni_service.start()
    for c in (c1, c2):
        assert h.cnitool(cnitool, "del", "svcnet", c.path).returncode == 0
    assert len(_lines_with(h, "exit=")) == served_before + 2, cni_service.log()
    assert h.ds.get_prefix(keys.IPAM_HANDLES_PREFIX)[0] == []


def test_sigterm_removes_the_socket(cni_host: CniHost, cni_service: CniService) -> None:
    assert cni_service.stop(signal.SIGTERM) == 0
    assert not cni_service.socket.exists()
    assert "stopped after" in cni_service.log()
