"""Lab topologies: a containerlab file (``*.clab.yml``) plus Calyx's sidecar ``calyx-lab.yml``.

What it owns: reading and validating both files into a typed :class:`Topology`; nothing in the
kernel. The same two files serve containerlab (which reads only the clab file) and the namespace
runner (:mod:`calyx.lab.runner`, which reads both), so a lab is written once.

From the clab file (containerlab's documented schema) the runner uses: ``name``,
``mgmt.ipv4-subnet``, and for every node ``kind`` (only ``linux``), ``mgmt-ipv4``, ``env``,
``binds`` (to find a router's configuration: the bind whose target is ``/etc/frr/frr.conf`` or
``/etc/bird/bird.conf``), ``exec`` (underlay commands run inside the node after its links exist),
and ``labels``; ``topology.links[].endpoints`` (``["a:eth1", "b:eth1"]``). The Calyx-specific data
that containerlab ignores:

- the node label ``calyx.role``: ``etcd`` (the lab's datastore), ``host`` (felix + bgpd),
  ``frr`` or ``bird`` (a BGP router, e.g. a ToR or a reflector), ``router`` or ``switch`` (plain
  forwarding or bridging, no daemon);
- the sidecar ``calyx-lab.yml``: ``cluster`` (a file of calyxctl documents applied once etcd is
  up), ``workloads`` (``{name, host, labels, profiles, pools}``, created through the CNI plugin),
  ``policies`` (named document files applied on demand) and ``requires`` (kernel features such as
  ``ipip``).

Every problem raises :class:`TopologyError` naming the file and the field.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROLES = ("etcd", "host", "frr", "bird", "router", "switch")
ROUTER_CONFIG_TARGETS = {"frr": "/etc/frr/frr.conf", "bird": "/etc/bird/bird.conf"}
KNOWN_REQUIREMENTS = ("ipip",)
SIDECAR = "calyx-lab.yml"

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_NODE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_IFACE = re.compile(r"^eth([1-9][0-9]?)$")
#: commands a node's ``exec`` may run: each acts only on the namespace it runs in
_EXEC_ALLOWED = ("ip", "sysctl")


class TopologyError(ValueError):
    """A lab file is missing, malformed or inconsistent; the message names the file and field."""


@dataclass(frozen=True)
class LabNode:
    """One node of the topology."""

    name: str
    role: str
    mgmt_ipv4: ipaddress.IPv4Address
    env: dict[str, str] = field(default_factory=dict)
    exec: tuple[tuple[str, ...], ...] = ()
    #: the router's configuration file on this machine (frr and bird nodes only)
    config: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    """A point-to-point link: ``(node, interface)`` at each end."""

    a: tuple[str, str]
    b: tuple[str, str]


@dataclass(frozen=True)
class Workload:
    """A container to create on a host through the CNI plugin."""

    name: str
    host: str
    labels: dict[str, str] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()
    #: IP pools to take the address from (``ipam.ipv4_pools``); empty: any pool that selects the host
    pools: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    """A lab: nodes, links, management subnet and the Calyx data of its sidecar."""

    name: str
    clab_file: Path
    mgmt_subnet: ipaddress.IPv4Network
    nodes: dict[str, LabNode]
    links: tuple[Link, ...]
    cluster_file: Path | None = None
    workloads: tuple[Workload, ...] = ()
    policies: dict[str, Path] = field(default_factory=dict)
    requires: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return self.clab_file.parent

    def by_role(self, *roles: str) -> list[LabNode]:
        return [n for n in self.nodes.values() if n.role in roles]

    @property
    def etcd_node(self) -> LabNode:
        return self.by_role("etcd")[0]

    @property
    def hosts(self) -> list[LabNode]:
        return self.by_role("host")

    def interfaces(self, node: str) -> list[str]:
        """The fabric interfaces of ``node`` (eth1...), in link order."""
        out = []
        for link in self.links:
            for n, iface in (link.a, link.b):
                if n == node:
                    out.append(iface)
        return out


def labs_root() -> Path:
    """The directory holding the repository's labs (``$CALYX_LABS_DIR`` or ``<checkout>/labs``)."""
    env = os.environ.get("CALYX_LABS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "labs"


def resolve(lab: str) -> Path:
    """The clab file for ``lab``: a topology name under :func:`labs_root`, a directory or a file."""
    p = Path(lab)
    if p.is_file():
        return p.resolve()
    candidates = [p] if (p.is_dir() or "/" in lab) else [labs_root() / lab]
    for d in candidates:
        if d.is_dir():
            files = sorted(d.glob("*.clab.yml")) + sorted(d.glob("*.clab.yaml"))
            if len(files) == 1:
                return files[0].resolve()
            if len(files) > 1:
                raise TopologyError(f"{d}: more than one *.clab.yml; name the file")
            raise TopologyError(f"{d}: no *.clab.yml file")
    known = sorted(x.name for x in labs_root().glob("*") if any(x.glob("*.clab.yml")))
    raise TopologyError(f"no lab called {lab!r} (known: {', '.join(known) or 'none'}; or give a path)")


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TopologyError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: invalid YAML: {exc}") from None


def _str_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TopologyError(f"{where}: expected a mapping")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, dict | list) or v is None:
            raise TopologyError(f"{where}: {k!r} must map to a string, number or boolean")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _exec_lines(value: object, where: str) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise TopologyError(f"{where}: expected a list of command lines")
    out = []
    for i, line in enumerate(value):
        argv = tuple(shlex.split(line))
        if not argv:
            raise TopologyError(f"{where}[{i}]: empty command")
        if argv[0] not in _EXEC_ALLOWED:
            raise TopologyError(
                f"{where}[{i}]: {argv[0]!r} is not run by the namespace runner (allowed: {', '.join(_EXEC_ALLOWED)})"
            )
        if argv[0] == "sysctl" and not all(a.startswith(("-", "net.")) for a in argv[1:]):
            raise TopologyError(f"{where}[{i}]: only net.* sysctls (they are per namespace)")
        out.append(argv)
    return tuple(out)


def _node(name: str, raw: object, defaults: dict[str, Any], directory: Path, where: str) -> LabNode:
    if not _NODE.match(name):
        raise TopologyError(f"{where}: node name {name!r} must be lower-case letters, digits and '-' (at most 31)")
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected a mapping")
    kind = raw.get("kind", defaults.get("kind"))
    if kind != "linux":
        raise TopologyError(f"{where}.kind: the namespace runner builds only 'linux' nodes, not {kind!r}")
    labels = _str_map(raw.get("labels"), f"{where}.labels")
    role = labels.get("calyx.role")
    if role not in ROLES:
        raise TopologyError(f"{where}.labels: calyx.role must be one of {', '.join(ROLES)} (got {role!r})")
    mgmt = raw.get("mgmt-ipv4")
    try:
        mgmt_ip = ipaddress.IPv4Address(str(mgmt))
    except ValueError:
        raise TopologyError(f"{where}.mgmt-ipv4: an IPv4 address is required (got {mgmt!r})") from None
    config = None
    binds = raw.get("binds") or []
    if not isinstance(binds, list) or not all(isinstance(b, str) for b in binds):
        raise TopologyError(f"{where}.binds: expected a list of 'source:target' strings")
    if role in ROUTER_CONFIG_TARGETS:
        target = ROUTER_CONFIG_TARGETS[role]
        for b in binds:
            src, _, rest = b.partition(":")
            if rest.split(":")[0] == target:
                config = (directory / src).resolve()
        if config is None:
            raise TopologyError(f"{where}.binds: a {role} node needs a bind onto {target}")
        if not config.is_file():
            raise TopologyError(f"{where}.binds: {config} does not exist")
    return LabNode(
        name=name,
        role=role,
        mgmt_ipv4=mgmt_ip,
        env=_str_map(raw.get("env"), f"{where}.env"),
        exec=_exec_lines(raw.get("exec"), f"{where}.exec"),
        config=config,
        labels=labels,
    )


def _endpoint(text: object, nodes: dict[str, LabNode], where: str) -> tuple[str, str]:
    if not isinstance(text, str) or ":" not in text:
        raise TopologyError(f"{where}: expected 'node:ethN'")
    node, iface = text.split(":", 1)
    if node not in nodes:
        raise TopologyError(f"{where}: unknown node {node!r}")
    if not _IFACE.match(iface):
        raise TopologyError(f"{where}: interface {iface!r} must be eth1..eth99 (eth0 is the management one)")
    return node, iface


def _sidecar(path: Path, nodes: dict[str, LabNode]) -> dict[str, Any]:
    if not path.exists():
        return {}
    raw = _load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise TopologyError(f"{path}: expected a mapping")
    unknown = sorted(set(raw) - {"cluster", "workloads", "policies", "requires"})
    if unknown:
        raise TopologyError(f"{path}: unknown field {unknown[0]!r}")
    out: dict[str, Any] = {}
    if raw.get("cluster") is not None:
        cluster = (path.parent / str(raw["cluster"])).resolve()
        if not cluster.is_file():
            raise TopologyError(f"{path}: cluster: {cluster} does not exist")
        out["cluster_file"] = cluster
    workloads = []
    seen: set[str] = set()
    for i, w in enumerate(raw.get("workloads") or []):
        where = f"{path}: workloads[{i}]"
        if not isinstance(w, dict):
            raise TopologyError(f"{where}: expected a mapping")
        bad = sorted(set(w) - {"name", "host", "labels", "profiles", "pools"})
        if bad:
            raise TopologyError(f"{where}: unknown field {bad[0]!r}")
        name, host = w.get("name"), w.get("host")
        if not isinstance(name, str) or not _NODE.match(name) or name in seen:
            raise TopologyError(f"{where}.name: a unique lower-case name is required (got {name!r})")
        seen.add(name)
        if host not in nodes or nodes[host].role != "host":
            raise TopologyError(f"{where}.host: {host!r} is not a node with calyx.role host")
        profiles = w.get("profiles") or []
        if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
            raise TopologyError(f"{where}.profiles: expected a list of names")
        pools = w.get("pools") or []
        if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
            raise TopologyError(f"{where}.pools: expected a list of pool names")
        workloads.append(Workload(name, host, _str_map(w.get("labels"), f"{where}.labels"), tuple(profiles),
                                  tuple(pools)))
    out["workloads"] = tuple(workloads)
    policies = raw.get("policies") or {}
    if not isinstance(policies, dict):
        raise TopologyError(f"{path}: policies: expected a mapping of name to file")
    pol: dict[str, Path] = {}
    for k, v in policies.items():
        p = (path.parent / str(v)).resolve()
        if not p.is_file():
            raise TopologyError(f"{path}: policies.{k}: {p} does not exist")
        pol[str(k)] = p
    out["policies"] = pol
    requires = raw.get("requires") or []
    if not isinstance(requires, list) or any(r not in KNOWN_REQUIREMENTS for r in requires):
        raise TopologyError(f"{path}: requires: a list of {', '.join(KNOWN_REQUIREMENTS)}")
    out["requires"] = tuple(requires)
    return out


def load(clab_file: Path) -> Topology:
    """Read and validate a clab file and the sidecar beside it."""
    raw = _load_yaml(clab_file)
    if not isinstance(raw, dict):
        raise TopologyError(f"{clab_file}: expected a mapping with name and topology")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TopologyError(f"{clab_file}: name must be lower-case letters, digits and '-' (got {name!r})")
    mgmt = raw.get("mgmt") or {}
    try:
        subnet = ipaddress.IPv4Network(str(mgmt.get("ipv4-subnet", "172.20.20.0/24")))
    except ValueError as exc:
        raise TopologyError(f"{clab_file}: mgmt.ipv4-subnet: {exc}") from None
    topo = raw.get("topology")
    if not isinstance(topo, dict) or not isinstance(topo.get("nodes"), dict):
        raise TopologyError(f"{clab_file}: topology.nodes is required")
    defaults = dict(topo.get("defaults") or {})
    nodes: dict[str, LabNode] = {}
    for n, spec in topo["nodes"].items():
        node = _node(str(n), spec, defaults, clab_file.parent, f"{clab_file}: topology.nodes.{n}")
        if node.mgmt_ipv4 not in subnet or node.mgmt_ipv4 in (subnet.network_address, subnet[1]):
            raise TopologyError(f"{clab_file}: topology.nodes.{n}.mgmt-ipv4: {node.mgmt_ipv4} must be a host of "
                                f"{subnet} other than {subnet[1]} (the management gateway)")
        nodes[node.name] = node
    if len(nodes) > 200:
        raise TopologyError(f"{clab_file}: at most 200 nodes")
    if len({n.mgmt_ipv4 for n in nodes.values()}) != len(nodes):
        raise TopologyError(f"{clab_file}: two nodes share a mgmt-ipv4 address")
    etcds = [n for n in nodes.values() if n.role == "etcd"]
    if len(etcds) != 1:
        raise TopologyError(f"{clab_file}: exactly one node needs calyx.role etcd (found {len(etcds)})")
    links = []
    used: set[tuple[str, str]] = set()
    for i, link in enumerate(topo.get("links") or []):
        where = f"{clab_file}: topology.links[{i}].endpoints"
        eps = link.get("endpoints") if isinstance(link, dict) else None
        if not isinstance(eps, list) or len(eps) != 2:
            raise TopologyError(f"{where}: expected two endpoints")
        a, b = _endpoint(eps[0], nodes, where), _endpoint(eps[1], nodes, where)
        for ep in (a, b):
            if ep in used:
                raise TopologyError(f"{where}: {ep[0]}:{ep[1]} is used by two links")
            used.add(ep)
        if a[0] == b[0]:
            raise TopologyError(f"{where}: a link joins two different nodes")
        links.append(Link(a, b))
    extra = _sidecar(clab_file.parent / SIDECAR, nodes)
    return Topology(name=name, clab_file=clab_file, mgmt_subnet=subnet, nodes=nodes, links=tuple(links), **extra)
