"""The VM harness itself, and IP-in-IP in its kernel across a router that knows no workload routes.

This is the kernel-level baseline the IP-in-IP tests build on: two hosts in different subnets, a
router between them with only the hosts' subnets, a workload /32 on each host, and a
``<block> via <host> dev tunl0 onlink`` route. The ping crosses, and the router sees protocol 4
between the host addresses — never the workload addresses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.vm import Vm, cloud_kernel, kvm_unusable

pytestmark = pytest.mark.vm

SCRIPT = r"""
set -e
for n in h1 r h2 w1 w2; do ip netns add $n; ip -n $n link set lo up; done
ip link add h1-r netns h1 type veth peer name r-h1 netns r
ip link add h2-r netns h2 type veth peer name r-h2 netns r
ip link add cali1 netns h1 type veth peer name eth0 netns w1
ip link add cali2 netns h2 type veth peer name eth0 netns w2
ip -n h1 addr add 10.98.1.2/24 dev h1-r; ip -n r addr add 10.98.1.1/24 dev r-h1
ip -n h2 addr add 10.98.2.2/24 dev h2-r; ip -n r addr add 10.98.2.1/24 dev r-h2
for p in "h1 h1-r" "h2 h2-r" "r r-h1" "r r-h2" "h1 cali1" "h2 cali2" "w1 eth0" "w2 eth0"; do
  set -- $p; ip -n $1 link set $2 up
done
ip -n r link set lo up; ip netns exec r sysctl -qw net.ipv4.ip_forward=1
for h in h1 h2; do ip netns exec $h sysctl -qw net.ipv4.ip_forward=1; ip -n $h link set tunl0 up; done
ip -n h1 route add default via 10.98.1.1; ip -n h2 route add default via 10.98.2.1
ip -n w1 addr add 10.65.1.1/32 dev eth0; ip -n w1 route add default via 169.254.1.1 dev eth0 onlink
ip -n w2 addr add 10.65.2.1/32 dev eth0; ip -n w2 route add default via 169.254.1.1 dev eth0 onlink
ip netns exec h1 sysctl -qw net.ipv4.conf.cali1.proxy_arp=1; ip netns exec h2 sysctl -qw net.ipv4.conf.cali2.proxy_arp=1
ip -n h1 route add 10.65.1.1/32 dev cali1; ip -n h2 route add 10.65.2.1/32 dev cali2
# the tunnel source must be routable: give tunl0 an address from the pool
ip -n h1 addr add 10.65.1.254/32 dev tunl0; ip -n h2 addr add 10.65.2.254/32 dev tunl0
ip -n h1 route add 10.65.2.0/26 via 10.98.2.2 dev tunl0 onlink
ip -n h2 route add 10.65.1.0/26 via 10.98.1.2 dev tunl0 onlink
ip netns exec r tcpdump -l -n -i r-h1 -c 2 'ip proto 4' > /run/tmp/cap 2>/dev/null &
sleep 1
ip netns exec w1 ping -c 3 -W 2 10.65.2.1
sleep 1
cat /run/tmp/cap
grep -q "10.98.1.2 > 10.98.2.2: IP 10.65.1.1 > 10.65.2.1: ICMP echo request" /run/tmp/cap
# without the tunnel route the router has no idea where 10.65.2.0/26 is
ip -n h1 route del 10.65.2.0/26
! ip netns exec w1 ping -c 1 -W 1 10.65.2.1
echo VM-IPIP-OK
"""


def test_ipip_across_a_router_without_workload_routes(vm: Vm) -> None:
    result = vm.run(SCRIPT).check()
    assert "VM-IPIP-OK" in result.output
    assert "3 received" in result.output


def test_the_guest_runs_the_cloud_kernel_on_a_read_only_host_root(vm: Vm) -> None:
    r = vm.run("uname -r; touch /usr/calyx-vm-probe 2>&1; touch /run/tmp/ok && echo scratch-writable").check()
    lines = r.output.splitlines()
    assert lines[0] == cloud_kernel() != os.uname().release
    assert "Read-only file system" in r.output
    assert "scratch-writable" in lines
    assert not Path("/usr/calyx-vm-probe").exists()


def test_exit_codes_output_and_timeouts(vm: Vm) -> None:
    boots = vm.boots
    r = vm.run("echo to-stdout; echo to-stderr >&2; exit 7", modules=())
    assert r.returncode == 7
    assert "to-stdout" in r.output and "to-stderr" in r.output
    with pytest.raises(AssertionError, match="exited 7"):
        r.check()
    assert "CALYX-VM-EXIT-CODE=7" in vm.console()
    # a command past its timeout is killed (with everything it started) and reported as unfinished
    slow = vm.run("sleep 600 & sleep 600", modules=(), timeout=2)
    assert slow.returncode is None and "killed after the 2 s timeout" in slow.output
    assert vm.run("pgrep -x sleep || echo none-left", modules=()).check().output.strip() == "none-left"
    assert vm.boots == boots  # the same guest served all of it


def test_the_accelerator_was_probed(vm: Vm) -> None:
    assert vm.accel in ("kvm", "tcg"), vm.describe()
    if kvm_unusable() is not None:
        assert vm.accel == "tcg", vm.describe()
