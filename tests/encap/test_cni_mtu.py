"""The CNI plugin takes the workload MTU felix wrote to ``<state_dir>/mtu`` when its configuration
sets no ``mtu`` (and the configuration's ``mtu`` wins)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from calyx.cni.netconf import felix_mtu
from calyx.cni.spec import CNIError
from calyx.model import IPPool, Node
from tests.fixtures.cni import CniHost


@pytest.mark.unit
def test_felix_mtu_file(tmp_path: Path) -> None:
    assert felix_mtu({"state_dir": str(tmp_path)}) == 0  # no file: the kernel default
    (tmp_path / "mtu").write_text("1450\n")
    assert felix_mtu({"state_dir": str(tmp_path)}) == 1450
    for bad in ("", "abc", "20", "70000"):
        (tmp_path / "mtu").write_text(bad)
        assert felix_mtu({"state_dir": str(tmp_path)}) == 0, bad
    with pytest.raises(CNIError, match="state_dir"):
        felix_mtu({"state_dir": 5})


@pytest.mark.privileged
@pytest.mark.etcd
def test_plugin_uses_the_mtu_file(cni_host: CniHost, cnitool: str, tmp_path: Path) -> None:
    h = cni_host
    h.put(IPPool("pool1", ipaddress.ip_network("10.70.0.0/16"), 26))
    h.put(Node(h.node))
    state = tmp_path / "felix-state"
    state.mkdir()
    (state / "mtu").write_text("1450\n")
    h.write_conflist("fromfile", [h.calyx_plugin(state_dir=str(state))])
    h.write_conflist("explicit", [h.calyx_plugin(state_dir=str(state), mtu=1400)])
    c1, c2 = h.new_netns(), h.new_netns()
    for name, ns, want in (("fromfile", c1, 1450), ("explicit", c2, 1400)):
        proc = h.cnitool(cnitool, "add", name, ns.path)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        host_if = json.loads(proc.stdout)["interfaces"][0]["name"]
        assert ns.ip_json("link", "show", "dev", "eth0")[0]["mtu"] == want
        assert h.host.ip_json("link", "show", "dev", host_if)[0]["mtu"] == want
