"""The calculation: which endpoints are local, which policies select them and in what order, which
rule ipsets exist and who is in them, and what is marked dirty."""

from __future__ import annotations

import pytest

from felix import rules
from felix.calc import Calculator
from tests.felix.helpers import block, policy, pool, profile, wep

pytestmark = pytest.mark.unit


def feed(calc: Calculator, *items: tuple[str, object]) -> None:
    for key, obj in items:
        calc.on_update(key, obj)


def test_local_endpoints_and_policy_order() -> None:
    c = Calculator("n1")
    feed(c, wep("n1", "a", "calia", "10.0.0.1", labels={"app": "web"}),
         wep("n2", "b", "calib", "10.0.1.1", labels={"app": "web"}),
         policy("late", "app == 'web'"), policy("early", "app == 'web'", order=10),
         policy("other", "app == 'db'", order=1))
    assert c.local_endpoints == {wep("n1", "a", "calia", "10.0.0.1")[0]}
    plan = c.plan(wep("n1", "a", "calia", "10.0.0.1")[0])
    assert plan is not None
    assert plan.ingress_policies == ("early", "late")  # ordered; no order sorts last
    assert plan.egress_policies == ()
    assert c.plan(wep("n2", "b", "calib", "10.0.1.1")[0]) is None
    assert c.policy_active("early") and not c.policy_active("other")


def test_selector_ipset_members_are_cluster_wide_and_follow_label_changes() -> None:
    c = Calculator("n1")
    rule = {"action": "allow", "source": {"selector": "role == 'client'"}}
    feed(c, wep("n1", "srv", "calis", "10.0.0.1", labels={"app": "srv"}),
         wep("n2", "cl", "calic", "10.0.1.5", labels={"role": "client"}),
         policy("p", "app == 'srv'", ingress=[rule]))
    set_id = rules.selector_set_id("role == 'client'")
    assert c.ipset_members(set_id, 4) == {"10.0.1.5"}
    assert c.ipset_members(set_id, 6) == set()
    c.take_dirty()
    feed(c, wep("n2", "cl", "calic", "10.0.1.5", labels={"role": "other"}))
    d = c.take_dirty()
    assert set_id in d.ipsets
    assert not d.endpoints  # a remote endpoint's change does not touch local chains
    assert c.ipset_members(set_id, 4) == set()
    # the policy stops selecting anything local: its sets go away
    feed(c, wep("n1", "srv", "calis", "10.0.0.1", labels={"app": "gone"}))
    assert not c.policy_active("p")
    assert c.ipset_members(set_id, 4) is None
    assert set_id in c.take_dirty().ipsets


def test_profile_labels_feed_selectors_and_endpoint_labels_win() -> None:
    c = Calculator("n1")
    feed(c, profile("prof", labels_to_apply={"team": "blue", "app": "fromprofile"}),
         wep("n1", "a", "calia", "10.0.0.1", labels={"app": "own"}, profiles=["prof"]),
         policy("blue", "team == 'blue' && app == 'own'"))
    key = wep("n1", "a", "calia", "10.0.0.1")[0]
    plan = c.plan(key)
    assert plan is not None and plan.ingress_policies == ("blue",) and plan.profiles == ("prof",)
    feed(c, profile("prof", labels_to_apply={"team": "red"}))
    plan = c.plan(key)
    assert plan is not None and plan.ingress_policies == ()


def test_missing_profile_is_not_jumped_to_and_appears_later() -> None:
    c = Calculator("n1")
    key, ep = wep("n1", "a", "calia", "10.0.0.1", profiles=["p1"])
    c.on_update(key, ep)
    plan = c.plan(key)
    assert plan is not None and plan.profiles == ()
    c.take_dirty()
    feed(c, profile("p1", ingress=[{"action": "allow"}]))
    d = c.take_dirty()
    assert key in d.endpoints and "p1" in d.profiles
    plan = c.plan(key)
    assert plan is not None and plan.profiles == ("p1",)
    assert c.profile_active("p1")


def test_delete_endpoint_and_policy() -> None:
    c = Calculator("n1")
    key, ep = wep("n1", "a", "calia", "10.0.0.1", labels={"x": "1"})
    feed(c, (key, ep), policy("p", "has(x)", ingress=[{"action": "allow", "source": {"selector": "has(x)"}}]))
    sid = rules.selector_set_id("has(x)")
    assert c.ipset_members(sid, 4) == {"10.0.0.1"}
    c.take_dirty()
    c.on_delete("/calyx/v1/policy/policies/p")
    d = c.take_dirty()
    assert key in d.endpoints and "p" in d.policies and sid in d.ipsets
    plan = c.plan(key)
    assert plan is not None and plan.ingress_policies == ()
    c.on_delete(key)
    assert c.plan(key) is None and key in c.take_dirty().endpoints


def test_inactive_endpoint_is_not_local_and_other_nodes_are_ignored_for_chains() -> None:
    c = Calculator("n1")
    key, ep = wep("n1", "a", "calia", "10.0.0.1", state="inactive")
    c.on_update(key, ep)
    assert c.plan(key) is None
    assert not c.take_dirty().endpoints


def test_pools_and_affine_blocks() -> None:
    c = Calculator("n1")
    feed(c, pool("a", "10.65.0.0/16", nat=True), pool("b", "10.66.0.0/16"),
         block("10.65.1.0/26", "n1"), block("10.65.2.0/26", "n2"), block("10.65.3.0/26", None))
    nat, every = c.pool_members(4)
    assert nat == {"10.65.0.0/16"} and every == {"10.65.0.0/16", "10.66.0.0/16"}
    assert [str(b) for b in c.affine_blocks()] == ["10.65.1.0/26"]
    c.take_dirty()
    c.on_delete("/calyx/v1/ipam/blocks/10.65.1.0-26")
    assert c.take_dirty().blocks and c.affine_blocks() == []


def test_policy_selector_change_moves_endpoints() -> None:
    c = Calculator("n1")
    a = wep("n1", "a", "calia", "10.0.0.1", labels={"app": "a"})
    b = wep("n1", "b", "calib", "10.0.0.2", labels={"app": "b"})
    feed(c, a, b, policy("p", "app == 'a'"))
    c.take_dirty()
    feed(c, policy("p", "app == 'b'"))
    d = c.take_dirty()
    assert d.endpoints == {a[0], b[0]}
    pa, pb = c.plan(a[0]), c.plan(b[0])
    assert pa is not None and pb is not None
    assert pa.ingress_policies == () and pb.ingress_policies == ("p",)
