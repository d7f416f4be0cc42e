"""How calyxctl shows objects: documents (JSON/YAML, round-trippable through ``apply``) and tables."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from calyx import model
from calyx.model import Kind, Resource


def document(obj: Resource) -> dict[str, Any]:
    """The ``{kind, name, spec}`` document of an object: what ``apply`` takes back."""
    return {"kind": model.kind_of(obj).value, "name": obj.name, "spec": obj.to_dict()}


def render_documents(objs: Sequence[Resource], fmt: str, *, single: bool) -> str:
    docs = [document(o) for o in objs]
    if fmt == "json":
        return json.dumps(docs[0] if single and docs else docs, indent=2, sort_keys=False) + "\n"
    if not docs:
        return ""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


def _join(items: Sequence[object]) -> str:
    return ",".join(str(i) for i in items) or "-"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _opt(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


Column = tuple[str, Callable[[Any], object]]

COLUMNS: dict[Kind, list[Column]] = {
    Kind.CLUSTER_CONFIG: [
        ("NAME", lambda o: o.name),
        ("AS", lambda o: o.as_number),
        ("MESH", lambda o: "on" if o.node_to_node_mesh else "off"),
        ("GR-TIME", lambda o: o.graceful_restart_time),
        ("COMMUNITIES", lambda o: _join(o.communities)),
        ("STRICT-AFFINITY", lambda o: o.strict_affinity),
    ],
    Kind.NODE: [
        ("NAME", lambda o: o.name),
        ("IPV4", lambda o: _opt(o.ipv4)),
        ("IPV6", lambda o: _opt(o.ipv6)),
        ("AS", lambda o: _opt(o.as_number)),
        ("RR-CLUSTER", lambda o: _opt(o.route_reflector_cluster_id)),
        ("LABELS", lambda o: _labels(o.labels)),
    ],
    Kind.BGP_PEER: [
        ("NAME", lambda o: o.name),
        ("PEER", lambda o: _opt(o.peer_ip) if o.peer_ip is not None else f"selector: {o.peer_selector}"),
        ("AS", lambda o: _opt(o.as_number)),
        ("NODE", lambda o: o.node or (f"selector: {o.node_selector}" if o.node_selector else "(all)")),
        ("PASSIVE", lambda o: o.passive),
        ("MD5", lambda o: "yes" if o.password else "no"),
    ],
    Kind.IP_POOL: [
        ("NAME", lambda o: o.name),
        ("CIDR", lambda o: o.cidr),
        ("BLOCK", lambda o: f"/{o.block_size}"),
        ("IPIP", lambda o: o.ipip_mode),
        ("VXLAN", lambda o: o.vxlan_mode),
        ("NAT", lambda o: o.nat_outgoing),
        ("DISABLED", lambda o: o.disabled),
        ("SELECTOR", lambda o: o.node_selector),
    ],
    Kind.IPAM_BLOCK: [
        ("CIDR", lambda o: o.cidr),
        ("AFFINITY", lambda o: _opt(o.affinity)),
        ("IN-USE", lambda o: o.in_use()),
        ("FREE", lambda o: len(o.allocations) - o.in_use()),
        ("POOL", lambda o: _opt(o.pool)),
    ],
    Kind.IPAM_HANDLE: [
        ("HANDLE", lambda o: o.handle_id),
        ("ADDRESSES", lambda o: _join(o.addresses)),
        ("ATTRIBUTES", lambda o: _labels(o.attributes)),
    ],
    Kind.IPAM_RESERVATION: [
        ("NAME", lambda o: o.name),
        ("ADDRESS", lambda o: o.address),
        ("WORKLOAD", lambda o: o.workload),
    ],
    Kind.WORKLOAD: [
        ("NODE", lambda o: o.node),
        ("ORCHESTRATOR", lambda o: o.orchestrator),
        ("WORKLOAD", lambda o: o.workload),
        ("ENDPOINT", lambda o: o.endpoint),
        ("IFACE", lambda o: o.iface),
        ("ADDRESSES", lambda o: _join(o.nets)),
        ("PROFILES", lambda o: _join(o.profiles)),
        ("STATE", lambda o: o.state),
    ],
    Kind.PROFILE: [
        ("NAME", lambda o: o.name),
        ("INGRESS", lambda o: len(o.ingress)),
        ("EGRESS", lambda o: len(o.egress)),
        ("LABELS", lambda o: _labels(o.labels_to_apply)),
    ],
    Kind.POLICY: [
        ("NAME", lambda o: o.name),
        ("ORDER", lambda o: _opt(o.order if o.order is None or o.order != int(o.order) else int(o.order))),
        ("SELECTOR", lambda o: o.selector),
        ("TYPES", lambda o: _join(o.types)),
        ("INGRESS", lambda o: len(o.ingress)),
        ("EGRESS", lambda o: len(o.egress)),
    ],
    Kind.FELIX_STATUS: [
        ("NODE", lambda o: o.node),
        ("IN-SYNC", lambda o: o.in_sync),
        ("LAST-APPLY", lambda o: _opt(o.last_apply)),
        ("ENDPOINTS", lambda o: o.endpoints),
        ("ERRORS", lambda o: len(o.errors)),
    ],
    Kind.BGP_STATUS: [
        ("NODE", lambda o: o.node),
        ("PEER", lambda o: o.peer_ip),
        ("STATE", lambda o: o.state),
        ("SINCE", lambda o: _opt(o.since)),
        ("RECEIVED", lambda o: o.prefixes_received),
        ("SENT", lambda o: o.prefixes_sent),
    ],
    Kind.ENDPOINT_STATUS: [
        ("NAME", lambda o: o.name),
        ("STATE", lambda o: o.state),
        ("ERROR", lambda o: _opt(o.error)),
    ],
}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain, aligned table (kubectl style); empty cells show ``-``."""
    cells = [[str(c) if c is not None and c != "" else "-" for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["   ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("   ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


def boxed(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A boxed table, as ``calicoctl node status`` prints peers."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(values: Sequence[str]) -> str:
        return "|" + "|".join(f" {v.ljust(widths[i])} " for i, v in enumerate(values)) + "|"

    out = [sep, line(list(headers)), sep]
    out += [line(r) for r in cells]
    out.append(sep)
    return "\n".join(out) + "\n"


def render_table(kind: Kind, objs: Sequence[Resource]) -> str:
    cols = COLUMNS[kind]
    return table([c[0] for c in cols], [[c[1](o) for c in cols] for o in objs])
