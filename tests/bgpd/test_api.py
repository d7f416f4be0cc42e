"""ExaBGP's API stream: the exact samples of ExaBGP 5.0.15, acks, garbage, flaps; command text."""

from __future__ import annotations

import pytest

from bgpd import api
from bgpd.announce import OutAttrs
from bgpd.rib import Attrs, LocalInfo, PeerInfo, Rib

pytestmark = pytest.mark.unit

ANNOUNCE = '{ "exabgp": "5.0.0", "time": 1795322595.397537, "host" : "vm", "pid" : 3806, "ppid" : 1, "counter": 6, "type": "update", "neighbor": { "address": { "local": "10.99.0.3", "peer": "10.99.0.2" }, "asn": { "local": 65002, "peer": 65000 }, "router-id": "10.99.255.2" , "direction": "receive", "message": { "update": { "attribute": { "origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": [65000, 65001, 65101]}}, "community": [ [ 65001, 100 ], [ 65001, 200 ] ] }, "announce": { "ipv4 unicast": { "10.99.0.2": [ { "nlri": "10.99.1.0/26" } ] } } } } } }'  # noqa: E501
WITHDRAW = '{ "exabgp": "5.0.0", "time": 1795322604.1231458, "host" : "vm", "pid" : 3806, "ppid" : 1, "counter": 10, "type": "update", "neighbor": { "address": { "local": "10.99.0.3", "peer": "10.99.0.2" }, "asn": { "local": 65002, "peer": 65000 }, "router-id": "10.99.255.2" , "direction": "receive", "message": { "update": { "withdraw": { "ipv4 unicast": [ { "nlri": "10.99.1.10/32" } ] } } } } }'  # noqa: E501
EOR = '{ "exabgp": "5.0.0", "time": 1795322583.7804701, "host" : "vm", "pid" : 3806, "ppid" : 1, "counter": 5, "type": "update", "neighbor": { "address": { "local": "10.99.0.3", "peer": "10.99.0.2" }, "asn": { "local": 65002, "peer": 65000 }, "router-id": "10.99.255.2" , "direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'  # noqa: E501
UP = '{ "exabgp": "5.0.0", "time": 1795322583.5469542, "host" : "vm", "pid" : 3804, "ppid" : 1, "counter": 3, "type": "state", "neighbor": { "address": { "local": "10.99.0.1", "peer": "10.99.0.0" }, "asn": { "local": 65001, "peer": 65000 }, "router-id": "10.99.255.1" , "state": "up" } }'  # noqa: E501
NOTIFICATION = '{ "exabgp": "5.0.0", "time": 1795322605.1235683, "host" : "vm", "pid" : 3806, "ppid" : 1, "counter": 12, "type": "notification", "neighbor": { "address": { "local": "10.99.0.3", "peer": "10.99.0.2" }, "asn": { "local": 65002, "peer": 65000 }, "router-id": "10.99.255.2" , "direction": "receive", "notification": { "code": 6, "subcode": 2, "data": "0x", "message": "" }  } }'  # noqa: E501
DOWN = '{ "exabgp": "5.0.0", "time": 1795322605.1236916, "host" : "vm", "pid" : 3806, "ppid" : 1, "counter": 13, "type": "state", "neighbor": { "address": { "local": "10.99.0.3", "peer": "10.99.0.2" }, "asn": { "local": 65002, "peer": 65000 }, "router-id": "10.99.255.2" , "state": "down", "reason": "notification received (6,2)" } }'  # noqa: E501
OPEN = '{ "exabgp": "5.0.0", "time": 1795327241.2334666, "host" : "vm", "pid" : 12562, "ppid" : 12500, "counter": 2, "type": "open", "neighbor": { "address": { "local": "10.98.0.1", "peer": "10.98.0.0" }, "asn": { "local": 65001, "peer": 65000 }, "router-id": "10.98.0.1" , "direction": "receive", "open": { "version": 4, "asn": 65000, "hold_time": 30, "router_id": "10.98.0.0", "capabilities": { "1": { "name": "multiprotocol", "families": [ "ipv4/unicast" ] }, "2": { "name": "route-refresh", "variant": "RFC" }, "64": { "name": "graceful restart", "time": 120, "address-family-flags": { "ipv4/unicast": [ ] }, "restart-flags": [ ]  }, "65": { "name": "asn4", "asn4": 65000 }, "70": { "name": "enhanced-route-refresh" }, "71": { "name": "unknown", "iana": "unassigned", "value": 71, "raw": "" } } } } }'  # noqa: E501
RR = '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 6, "type": "update", "neighbor": { "address": { "local": "10.99.0.3", "peer": "10.99.0.2" }, "asn": { "local": 65000, "peer": 65000 }, "router-id": "10.99.255.2" , "direction": "receive", "message": { "update": { "attribute": { "origin": "igp", "as-path": {}, "local-preference": 200, "originator-id": "10.99.255.1", "cluster-list": [ "10.99.255.254" ] }, "announce": { "ipv4 unicast": { "10.99.0.1": [ { "nlri": "10.99.1.0/26" }, { "nlri": "10.99.1.64/26" } ] } } } } } }'  # noqa: E501
RIB_V2 = '{"peer": {"address": "10.98.0.0"}, "route": {"nlri": {"prefix": "10.97.1.0/24", "nexthop": "10.98.0.0", "family": {"afi": "ipv4", "safi": "unicast"}}, "attributes": {"origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": [65000]}}}}}'  # noqa: E501
SHUTDOWN = '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 1, "type": "notification", "notification": "shutdown" }'  # noqa: E501


def test_announce_sample() -> None:
    ev = api.parse_line(ANNOUNCE)
    assert isinstance(ev, api.UpdateEvent) and ev.peer == "10.99.0.2" and ev.withdraw == ()
    (attrs, nh, prefixes), = ev.announce
    assert (nh, prefixes) == ("10.99.0.2", ("10.99.1.0/26",))
    assert attrs.as_path == (65000, 65001, 65101) and attrs.as_path_len == 3
    assert attrs.communities == ("65001:100", "65001:200") and attrs.origin == "igp"


def test_withdraw_eor_state_notification_open() -> None:
    assert api.parse_line(WITHDRAW) == api.UpdateEvent("10.99.0.2", (), ("10.99.1.10/32",))
    assert api.parse_line(EOR) == api.EorEvent("10.99.0.2", "ipv4 unicast")
    assert api.parse_line(UP) == api.StateEvent("10.99.0.0", "up")
    assert api.parse_line(DOWN) == api.StateEvent("10.99.0.2", "down", "notification received (6,2)")
    assert api.parse_line(NOTIFICATION) == api.NotificationEvent("10.99.0.2", 6, 2, "")
    assert api.parse_line(SHUTDOWN) == api.NotificationEvent(None, None, None, "shutdown")
    assert api.parse_line(OPEN) == api.OpenEvent("10.98.0.0", "10.98.0.0", 65000, 30, 120)


def test_reflected_attributes_and_rib_dump() -> None:
    ev = api.parse_line(RR)
    assert isinstance(ev, api.UpdateEvent)
    (attrs, nh, prefixes), = ev.announce
    assert attrs.local_pref == 200 and attrs.originator_id == "10.99.255.1"
    assert attrs.cluster_list == ("10.99.255.254",) and nh == "10.99.0.1" and len(prefixes) == 2
    line = api.parse_line(RIB_V2)
    assert isinstance(line, api.RibLine)
    assert (line.peer, line.prefix, line.next_hop, line.attrs.as_path) == ("10.98.0.0", "10.97.1.0/24", "10.98.0.0",
                                                                         (65000,))


def test_acks_text_and_garbage() -> None:
    assert api.parse_line("done\n") == api.Ack("done") and api.Ack("done").ok
    assert api.parse_line(b"error") == api.Ack("error") and not api.Ack("error").ok
    assert api.parse_line("shutdown") == api.Ack("shutdown")
    assert isinstance(api.parse_line("10.98.0.0 ipv4 unicast 10.97.1.0/24 next-hop 10.98.0.0"), api.TextLine)
    assert isinstance(api.parse_line('[{"state": "up"}]'), api.TextLine)
    for bad in ['{"type": "update"', '{"type": "state"}', '{"type": "update", "neighbor": {"address": {"peer": 1}}}',
                '"just a string"', '{"type": "martian", "neighbor": {"address": {"peer": "1.2.3.4"}}}',
                b"\xff\xfe{", '{"type":"update","neighbor":{"address":{"peer":"1.1.1.1"},"message":{"update":5}}}']:
        assert isinstance(api.parse_line(bad), api.Garbage | api.TextLine), bad
    # a malformed attribute does not break the rest of the update
    ev = api.parse_line(ANNOUNCE.replace('"origin": "igp"', '"origin": 7').replace("65101", '"x"'))
    assert isinstance(ev, api.UpdateEvent) and ev.announce[0][0].as_path == (65000, 65001)


def test_mixed_stream_with_flaps_feeds_the_rib() -> None:
    """The samples in the order a flapping peer produces them, with acks and garbage mixed in."""
    rib = Rib(LocalInfo(65002, "10.99.0.3", addresses=frozenset({"10.99.0.3"})))
    rib.set_peer(PeerInfo("10.99.0.2", ibgp=False))
    stream = [UP, ANNOUNCE, "done", "garbage {", EOR, DOWN, UP, ANNOUNCE, WITHDRAW, "error", DOWN] * 3
    for text in stream:
        ev = api.parse_line(text)
        if isinstance(ev, api.UpdateEvent):
            for attrs, nh, prefixes in ev.announce:
                rib.announce(ev.peer, attrs, nh, prefixes)
            rib.withdraw(ev.peer, ev.withdraw)
        elif isinstance(ev, api.StateEvent) and ev.state == "down":
            rib.peer_down(ev.peer, None, 0.0)
        elif isinstance(ev, api.EorEvent):
            rib.peer_eor(ev.peer)
    rib.take_dirty()
    assert rib.selected() == {}


def test_commands_are_batched_by_attributes() -> None:
    a = OutAttrs(communities=("64512:1",))
    b = OutAttrs(next_hop="10.0.0.7", local_pref=100, originator_id="10.0.0.7", cluster_list=("1.1.1.1",))
    routes = {f"10.65.{i}.0/26": a for i in range(5)} | {"10.66.0.0/26": b}
    cmds = api.announce_commands("10.0.0.2", routes, batch=2)
    assert cmds[0] == ("neighbor 10.0.0.2 announce attributes next-hop self origin igp community [ 64512:1 ] "
                       "nlri 10.65.0.0/26 10.65.1.0/26")
    assert len(cmds) == 4
    assert cmds[-1] == ("neighbor 10.0.0.2 announce attributes next-hop 10.0.0.7 origin igp local-preference 100 "
                        "originator-id 10.0.0.7 cluster-list [ 1.1.1.1 ] nlri 10.66.0.0/26")
    assert api.withdraw_commands("10.0.0.2", {"10.65.0.0/26": a}) == [
        "neighbor 10.0.0.2 withdraw attributes next-hop self nlri 10.65.0.0/26"]
    assert api.eor_command("10.0.0.2") == "neighbor 10.0.0.2 announce eor ipv4 unicast"
    assert api.route_commands("10.0.0.2", {"10.65.0.0/26": a}) == [
        "neighbor 10.0.0.2 announce route 10.65.0.0/26 next-hop self origin igp community [ 64512:1 ]"]
    assert Attrs() == api.parse_attrs(None)
