"""IPv4 autodetection against a real kernel, in network namespaces the tests create.

Each test builds a "host" namespace with veth uplinks (the far ends in a second namespace) and
asks :func:`detect_ipv4` what the Node's address would be. Nothing outside the namespaces is read
or changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Interface

import pytest

from calyx.kernel.autodetect import Detected, DetectionError, Method, detect_ipv4
from calyx.noderegister import NodeRegistration
from tests.fixtures.netns import Netns

pytestmark = pytest.mark.privileged


def uplink(host: Netns, far: Netns, name: str, *addrs: str, up: bool = True) -> None:
    """A veth ``name`` in ``host`` (addresses in this order), its peer in ``far``."""
    host.ip("link", "add", name, "type", "veth", "peer", "name", f"p-{name}", "netns", far.name)
    for addr in addrs:
        host.ip("addr", "add", addr, "dev", name)
    if up:
        host.ip("link", "set", name, "up")
        far.ip("link", "set", f"p-{name}", "up")


def detect(method: str, ns: Netns) -> Detected | None:
    return detect_ipv4(Method.parse(method), netns=ns.name)


@pytest.fixture
def host(netns: Callable[[], Netns]) -> tuple[Netns, Netns]:
    """A host with three uplinks: eth0 (10.0.0.2/24), eth1 (a link-local address first, then
    10.1.0.2/16 and a secondary), ens3 (down, 10.3.0.2/24); no default route yet."""
    h, far = netns(), netns()
    uplink(h, far, "eth0", "10.0.0.2/24")
    uplink(h, far, "eth1", "169.254.7.7/16", "10.1.0.2/16", "10.1.0.3/16")
    uplink(h, far, "ens3", "10.3.0.2/24", up=False)
    return h, far


def test_default_route_interface(host: tuple[Netns, Netns]) -> None:
    h, _ = host
    h.ip("route", "add", "default", "via", "10.0.0.1", "dev", "eth0", "metric", "200")
    assert detect("default-route", h) == Detected(IPv4Interface("10.0.0.2/24"), "eth0")
    # the default route with the lowest metric wins; the link-local address is not global
    h.ip("route", "add", "default", "via", "10.1.0.1", "dev", "eth1", "metric", "100")
    assert detect("default-route", h) == Detected(IPv4Interface("10.1.0.2/16"), "eth1")


def test_default_route_multipath_takes_the_first_next_hop(host: tuple[Netns, Netns]) -> None:
    h, _ = host
    h.ip("route", "add", "default", "nexthop", "via", "10.1.0.1", "dev", "eth1", "nexthop", "via", "10.0.0.1",
         "dev", "eth0")
    assert detect("default-route", h) == Detected(IPv4Interface("10.1.0.2/16"), "eth1")


def test_interface_regex(host: tuple[Netns, Netns]) -> None:
    h, _ = host
    assert detect("interface=eth.*", h) == Detected(IPv4Interface("10.0.0.2/24"), "eth0")  # name order
    assert detect("interface=eth1|ens3", h) == Detected(IPv4Interface("10.1.0.2/16"), "eth1")
    with pytest.raises(DetectionError, match="ens3 is down"):  # the whole name must match; down is unusable
        detect("interface=ens[0-9]", h)
    h.ip("link", "set", "ens3", "up")
    assert detect("interface=ens[0-9]", h) == Detected(IPv4Interface("10.3.0.2/24"), "ens3")
    with pytest.raises(DetectionError, match=r"no interface name matches 'th0' \(interfaces: ens3, eth0, eth1, lo"):
        detect("interface=th0", h)


def test_can_reach(host: tuple[Netns, Netns]) -> None:
    h, _ = host
    assert detect("can-reach=10.1.200.1", h) == Detected(IPv4Interface("10.1.0.2/16"), "eth1")
    h.ip("route", "add", "192.0.2.0/24", "via", "10.0.0.1")
    assert detect("can-reach=192.0.2.55", h) == Detected(IPv4Interface("10.0.0.2/24"), "eth0")
    # a preferred source on the route: the kernel's choice, with its prefix length
    h.ip("route", "add", "198.51.100.0/24", "via", "10.1.0.1", "src", "10.1.0.3")
    assert detect("can-reach=198.51.100.1", h) == Detected(IPv4Interface("10.1.0.3/16"), "eth1")


def test_nothing_found(host: tuple[Netns, Netns], netns: Callable[[], Netns]) -> None:
    h, far = host
    with pytest.raises(DetectionError, match=r"^no IPv4 default route in the main table$"):
        detect("default-route", h)
    with pytest.raises(DetectionError, match=r"^no route to 203\.0\.113\.1 \(Network is unreachable\)$"):
        detect("can-reach=203.0.113.1", h)
    bare = netns()
    uplink(bare, far, "eth9", "169.254.9.9/16")
    bare.ip("route", "add", "default", "dev", "eth9")
    with pytest.raises(DetectionError, match=r"^the default route leaves by eth9, which has no global IPv4 address, "
                                             r"only 169\.254\.9\.9/16 \(scope global\)$"):
        detect("default-route", bare)
    with pytest.raises(DetectionError, match="eth9 has no global IPv4 address"):
        detect("interface=eth9", bare)
    assert detect("skip", bare) is None


def test_a_failed_detection_is_a_warning_once_and_leaves_ipv4_alone(host: tuple[Netns, Netns],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    h, _ = host
    reg = NodeRegistration(None, "h1", method=Method.parse("default-route"), netns=h.name)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="calyx.noderegister"):
        for _ in range(2):
            wanted = reg.wanted()
            assert not wanted.manage_ipv4 and wanted.ipv4 is None
        h.ip("route", "add", "default", "via", "10.0.0.1")
        wanted = reg.wanted()
    assert wanted.manage_ipv4 and wanted.ipv4 == IPv4Interface("10.0.0.2/24")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["node registration: ipv4 autodetection default-route found nothing: no IPv4 default route "
                        "in the main table; /calyx/v1/nodes/h1 left as it is, tried again in 300 s"]
    assert any("found 10.0.0.2/24 on eth0" in r.getMessage() for r in caplog.records)
