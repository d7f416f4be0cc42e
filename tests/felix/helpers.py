"""Model objects for felix's tests, built through the datastore contract (JSON → model.decode)."""

from __future__ import annotations

import json
from typing import Any

from calyx import model
from calyx.datastore import keys


def wep_key(node: str, name: str) -> str:
    return keys.workload_key(node, "k8s", name, "eth0")


def wep(node: str, name: str, iface: str, ip: str, *, labels: dict[str, str] | None = None,
        profiles: list[str] | None = None, ipv6: list[str] | None = None, **extra: Any) -> tuple[str, Any]:
    key = wep_key(node, name)
    value = {"iface": iface, "ipv4_nets": [ip] if ip else [], "ipv6_nets": ipv6 or [], "labels": labels or {},
             "profiles": profiles if profiles is not None else [], **extra}
    return key, model.decode(key, json.dumps(value))


def policy(name: str, selector: str = "all()", *, order: float | None = None, ingress: list[Any] | None = None,
           egress: list[Any] | None = None, types: list[str] | None = None) -> tuple[str, Any]:
    key = keys.policy_key(name)
    value: dict[str, Any] = {"selector": selector, "ingress": ingress or [], "egress": egress or []}
    if order is not None:
        value["order"] = order
    if types is not None:
        value["types"] = types
    return key, model.decode(key, json.dumps(value))


def profile(name: str, *, ingress: list[Any] | None = None, egress: list[Any] | None = None,
            labels_to_apply: dict[str, str] | None = None) -> tuple[str, Any]:
    key = keys.profile_key(name)
    value = {"ingress": ingress or [], "egress": egress or [], "labels_to_apply": labels_to_apply or {}}
    return key, model.decode(key, json.dumps(value))


def pool(name: str, cidr: str, *, nat: bool = False) -> tuple[str, Any]:
    key = keys.ippool_key(name)
    return key, model.decode(key, json.dumps({"cidr": cidr, "nat_outgoing": nat}))


def block(cidr: str, node: str | None) -> tuple[str, Any]:
    key = keys.ipam_block_key(cidr)
    return key, model.decode(key, json.dumps({"cidr": cidr, "affinity": f"node:{node}" if node else None}))
