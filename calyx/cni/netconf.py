"""Calyx's own fields of a CNI network configuration, the workload's identity, and the datastore.

Where the cluster is found (first match wins, per field):

1. the network configuration: for the ``calyx`` plugin its top level, for ``calyx-ipam`` its
   ``ipam`` object and then the top level (``etcd_endpoints``, ``etcd_ca``, ``etcd_cert``,
   ``etcd_key``, ``etcd_username``, ``etcd_password``, ``etcd_timeout``, ``node_name``);
2. ``CALYX_*`` environment variables and the configuration file (``CALYX_CONFIG`` or
   /etc/calyx/calyx.toml, its ``[cni]`` table), read by :func:`calyx.config.load` only when the
   network configuration leaves something out (it costs start-up time).

Runtimes do not always pass their environment to plugins (containerd does not), so the
network configuration is the dependable place; docs/cni.md lists every field.

MTU: the configuration's ``mtu``; when it sets none (or 0), the MTU felix computed for this host and
wrote to ``<state_dir>/mtu`` while a tunnel is in use (``state_dir``: the configuration's field, else
/var/lib/calyx; Calico reads /var/lib/calico/mtu the same way); else the kernel's default.

Identity: the endpoint is ``workloads/<node>/<orchestrator>/<workload>/<ifname>``. ``workload`` is
``<K8S_POD_NAMESPACE>.<K8S_POD_NAME>`` when both are in CNI_ARGS, ``K8S_POD_NAME`` alone (podman
passes the container name there), else the container id. The IPAM handle is
``<network name>.<container id>`` (as Calico names it). The host-side veth is ``cali`` + 11 hex
characters of a SHA-1 of ``<orchestrator>/<workload>/<ifname>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from calyx.cni.spec import INVALID_CONFIG, CNIError, Env, NetConf, caller_environ

CLUSTER_FIELDS = ("etcd_endpoints", "etcd_ca", "etcd_cert", "etcd_key", "etcd_username", "etcd_password",
                  "etcd_timeout", "node_name")
_SEGMENT = re.compile(r"^[^/\x00-\x1f]+$")


class Cluster(NamedTuple):
    """How to reach the datastore, and this node's name."""

    node_name: str
    etcd_endpoints: tuple[str, ...]
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_timeout: float = 5.0

    def store(self) -> Any:
        """A store for this cluster: etcd's JSON gateway (:class:`~calyx.ipam.etcdhttp.HttpStore`,
        fast to start), falling back to the gRPC client when the gateway cannot serve (see
        :class:`~calyx.ipam.store.GatewayUnavailable`)."""
        from calyx.ipam.etcdhttp import HttpStore
        from calyx.ipam.store import FallbackStore

        def grpc() -> Any:
            from calyx.datastore.client import Datastore
            from calyx.ipam.store import DatastoreStore

            return DatastoreStore(Datastore(self.etcd_endpoints, ca=self.etcd_ca, cert=self.etcd_cert,
                                            key=self.etcd_key, username=self.etcd_username,
                                            password=self.etcd_password, timeout=self.etcd_timeout))

        fast = HttpStore(self.etcd_endpoints, ca=self.etcd_ca, cert=self.etcd_cert, key=self.etcd_key,
                         username=self.etcd_username, password=self.etcd_password, timeout=self.etcd_timeout)
        return FallbackStore(fast, grpc)


def cluster_from(*sections: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster settings from the first section that has each field, else config.load("cni")."""
    values: dict[str, Any] = {}
    for f in CLUSTER_FIELDS:
        for sec in sections:
            if sec.get(f) not in (None, "", []):
                values[f] = sec[f]
                break
    eps = values.get("etcd_endpoints")
    if isinstance(eps, str):
        values["etcd_endpoints"] = tuple(e.strip() for e in eps.split(",") if e.strip())
    elif isinstance(eps, list) and all(isinstance(e, str) for e in eps):
        values["etcd_endpoints"] = tuple(eps)
    elif eps is not None:
        raise CNIError(INVALID_CONFIG, "etcd_endpoints must be a list of URLs or a comma-separated string")
    for f in ("etcd_ca", "etcd_cert", "etcd_key", "etcd_username", "etcd_password", "node_name"):
        if f in values and not isinstance(values[f], str):
            raise CNIError(INVALID_CONFIG, f"{f} must be a string")
    if "etcd_timeout" in values and not (isinstance(values["etcd_timeout"], int | float)
                                         and not isinstance(values["etcd_timeout"], bool)
                                         and 0 < values["etcd_timeout"] <= 600):
        raise CNIError(INVALID_CONFIG, "etcd_timeout must be a number of seconds (0-600)")
    if "etcd_endpoints" not in values or "node_name" not in values:
        from calyx import config

        try:
            cfg = config.load("cni", environ=caller_environ() if environ is None else environ)
        except config.ConfigError as exc:
            raise CNIError(INVALID_CONFIG, f"Calyx configuration: {exc}") from None
        for f in CLUSTER_FIELDS:
            values.setdefault(f, getattr(cfg, f))
    for f in ("etcd_ca", "etcd_cert", "etcd_key"):
        p = values.get(f)
        if p and not os.path.isfile(p):
            raise CNIError(INVALID_CONFIG, f"{f}: file {p} does not exist")
    if bool(values.get("etcd_cert")) != bool(values.get("etcd_key")):
        raise CNIError(INVALID_CONFIG, "etcd_cert and etcd_key must be given together")
    if not values["etcd_endpoints"]:
        raise CNIError(INVALID_CONFIG, "etcd_endpoints is empty")
    return Cluster(**values)


class Identity(NamedTuple):
    orchestrator: str
    workload: str
    endpoint: str
    container_id: str
    namespace: str | None = None

    @property
    def workload_id(self) -> str:
        return f"{self.orchestrator}/{self.workload}/{self.endpoint}"

    @property
    def host_iface(self) -> str:
        try:
            from _sha1 import sha1  # type: ignore[import-not-found]  # CPython's; hashlib (OpenSSL) costs ~2 ms more
        except ImportError:  # pragma: no cover - other interpreters
            from hashlib import sha1
        return "cali" + str(sha1(self.workload_id.encode()).hexdigest())[:11]


def identity(env: Env, orchestrator: str = "cni") -> Identity:
    pod = env.args.get("K8S_POD_NAME", "")
    ns = env.args.get("K8S_POD_NAMESPACE", "")
    workload = f"{ns}.{pod}" if ns and pod else pod or env.container_id
    for what, value in (("workload name", workload), ("orchestrator", orchestrator), ("interface", env.ifname)):
        if not _SEGMENT.match(value or ""):
            raise CNIError(INVALID_CONFIG, f"{what} {value!r} cannot be used: it must be non-empty, without '/'")
    return Identity(orchestrator, workload, env.ifname, env.container_id, ns or None)


def handle_id(netconf: NetConf, env: Env) -> str:
    hid = f"{netconf.name}.{env.container_id}"
    if not _SEGMENT.match(hid):
        raise CNIError(INVALID_CONFIG, f"network name {netconf.name!r} cannot be used in a handle (no '/')")
    return hid


class PluginConf(NamedTuple):
    """The ``calyx`` plugin's fields (see docs/cni.md)."""

    orchestrator: str = "cni"
    mtu: int = 0
    profiles: tuple[str, ...] = ()
    labels: dict[str, str] = {}
    readiness_timeout: float = 0.0
    readiness_poll: float = 0.1


DEFAULT_STATE_DIR = "/var/lib/calyx"


def felix_mtu(raw: Mapping[str, Any]) -> int:
    """The workload MTU felix wrote to ``<state_dir>/mtu`` (0 if there is none or it is not a valid MTU)."""
    state_dir = raw.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir:
        raise CNIError(INVALID_CONFIG, "state_dir must be a directory path")
    try:
        with open(os.path.join(state_dir, "mtu")) as f:
            mtu = int(f.read().strip())
    except (OSError, ValueError):
        return 0
    return mtu if 68 <= mtu <= 65535 else 0


def plugin_conf(nc: NetConf, env: Env) -> PluginConf:
    raw = nc.raw
    orch = raw.get("orchestrator", "cni")
    if not isinstance(orch, str) or not _SEGMENT.match(orch):
        raise CNIError(INVALID_CONFIG, "orchestrator must be a non-empty string without '/'")
    mtu = raw.get("mtu", 0)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not (mtu == 0 or 68 <= mtu <= 65535):
        raise CNIError(INVALID_CONFIG, f"mtu must be an integer between 68 and 65535 (0: the default), got {mtu!r}")
    profiles = raw.get("profiles", [])
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise CNIError(INVALID_CONFIG, "profiles must be a list of profile names")
    labels_raw = raw.get("labels", {})
    if not isinstance(labels_raw, dict) or not all(isinstance(v, str) for v in labels_raw.values()):
        raise CNIError(INVALID_CONFIG, "labels must be an object of string values")
    labels: dict[str, str] = dict(labels_raw)
    # CNI conventions: args.cni.labels = [{"key": k, "value": v}]
    conv = (raw.get("args") or {}).get("cni", {}) if isinstance(raw.get("args"), dict) else {}
    for item in conv.get("labels", []) if isinstance(conv, dict) else []:
        if isinstance(item, dict) and isinstance(item.get("key"), str) and isinstance(item.get("value"), str):
            labels[item["key"]] = item["value"]
    # CNI_ARGS: CALYX_LABELS=k=v,k2=v2 and CALYX_PROFILES=a,b
    for pair in filter(None, env.args.get("CALYX_LABELS", "").split(",")):
        k, sep, v = pair.partition("=")
        if not sep:
            raise CNIError(INVALID_CONFIG, f"CALYX_LABELS: {pair!r} is not key=value")
        labels[k] = v
    profiles = list(profiles) + [p for p in env.args.get("CALYX_PROFILES", "").split(",") if p and p not in profiles]
    if env.args.get("K8S_POD_NAMESPACE"):
        labels.setdefault("calyx/namespace", env.args["K8S_POD_NAMESPACE"])
    timeout = raw.get("readiness_timeout", 0)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 <= timeout <= 600:
        raise CNIError(INVALID_CONFIG, "readiness_timeout must be a number of seconds between 0 and 600")
    return PluginConf(orch, mtu, tuple(profiles), labels, float(timeout))
