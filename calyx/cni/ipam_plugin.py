"""``calyx-ipam``: Calyx IPAM as a CNI IPAM plugin (ADD, DEL, CHECK, VERSION; STATUS and GC of 1.1).

The ``ipam`` object of the network configuration::

    "ipam": {"type": "calyx-ipam", "assign_ipv4": true, "assign_ipv6": false,
             "ipv4_pools": ["default"], "ipv6_pools": [], "etcd_endpoints": [...], "node_name": "h1"}

(cluster fields fall back to the top level of the configuration, then to CALYX_* variables and the
configuration file: :mod:`calyx.cni.netconf`). Fixed addresses come from a reservation for the
workload, from ``runtimeConfig.ips`` (the ``ips`` capability) or from ``IP=`` in CNI_ARGS.

ADD allocates for the handle ``<network>.<container id>`` and is idempotent; DEL releases it and
succeeds when there is nothing to release; CHECK verifies the handle holds the addresses of
``prevResult``; GC releases this node's handles of this network whose attachment is not in
``cni.dev/valid-attachments``; STATUS fails with code 50 when etcd cannot be reached or no pool
can serve this node.

Errors: an etcd outage or lost compare-and-swap races are code 11 (try again later); no pool, an
exhausted pool or an unavailable fixed address are 101; a datastore refusal is 102.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from calyx.cni import spec
from calyx.cni.netconf import Cluster, cluster_from, handle_id, identity
from calyx.cni.spec import CNIError, Env, NetConf


def _bool(value: Any, what: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise CNIError(spec.INVALID_CONFIG, f"ipam.{what} must be true or false")


def _pools(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CNIError(spec.INVALID_CONFIG, f"ipam.{what} must be a list of pool names or CIDRs")
    return tuple(value)


def cluster_of(nc: NetConf) -> Cluster:
    return cluster_from(nc.ipam, nc.raw)


@contextmanager
def errors_translated() -> Iterator[None]:
    """IPAM and datastore exceptions as CNI errors with the right codes."""
    from calyx.ipam.logic import IPAMError, RetryLimitError
    from calyx.ipam.store import StoreError, StoreUnavailable

    try:
        yield
    except RetryLimitError as exc:
        raise CNIError(spec.TRY_AGAIN_LATER, str(exc)) from None
    except IPAMError as exc:
        raise CNIError(spec.IPAM_ERROR, str(exc)) from None
    except StoreUnavailable as exc:
        raise CNIError(spec.TRY_AGAIN_LATER, f"etcd is unreachable: {exc}") from None
    except StoreError as exc:
        raise CNIError(spec.DATASTORE_ERROR, f"etcd refused a request: {exc}") from None


def _fixed(nc: NetConf, env: Env) -> list[Any]:
    out: list[Any] = []
    texts: list[str] = []
    ips = nc.runtime_config.get("ips")
    if isinstance(ips, list):
        texts += [t for t in ips if isinstance(t, str)]
    if env.args.get("IP"):
        texts += env.args["IP"].split(",")
    for t in texts:
        try:
            out.append(ipaddress.ip_interface(t.strip()).ip)
        except ValueError:
            raise CNIError(spec.INVALID_CONFIG, f"{t!r} is not an IP address (from runtimeConfig.ips or IP=)") from None
    return out


def ipam_add(nc: NetConf, env: Env) -> dict[str, Any]:
    """Allocate and return the 1.x-form IPAM result."""
    from calyx.ipam.allocator import IPAM

    ipam = nc.ipam
    v4 = _bool(ipam.get("assign_ipv4"), "assign_ipv4", True)
    v6 = _bool(ipam.get("assign_ipv6"), "assign_ipv6", False)
    pools = _pools(ipam.get("ipv4_pools"), "ipv4_pools") + _pools(ipam.get("ipv6_pools"), "ipv6_pools")
    orchestrator = nc.raw.get("orchestrator", "cni") if isinstance(nc.raw.get("orchestrator"), str) else "cni"
    ident = identity(env, orchestrator)
    hid = handle_id(nc, env)
    cluster = cluster_of(nc)
    attrs = {"created": str(int(time.time())), "container_id": env.container_id, "ifname": env.ifname,
             "network": nc.name}
    if nc.type == "calyx":  # the handle belongs to a Calyx workload endpoint: check can find leaks
        attrs.update(node=cluster.node_name, orchestrator=ident.orchestrator, workload=ident.workload,
                     endpoint=ident.endpoint)
    store = cluster.store()
    try:
        with errors_translated():
            got = IPAM(store).allocate(hid, cluster.node_name, num_ipv4=1 if v4 else 0, num_ipv6=1 if v6 else 0,
                                       addresses=_fixed(nc, env), workload=ident.workload, pools=pools,
                                       attributes=attrs)
    finally:
        store.close()
    return {"ips": [{"address": str(a.network)} for a in got], "routes": [], "dns": {}}


def ipam_del(nc: NetConf, env: Env) -> None:
    from calyx.ipam.allocator import IPAM

    store = cluster_of(nc).store()
    try:
        with errors_translated():
            IPAM(store).release(handle_id(nc, env))
    finally:
        store.close()


def ipam_check(nc: NetConf, env: Env) -> None:
    from calyx.ipam.allocator import IPAM

    if nc.prev_result is None:
        raise CNIError(spec.INVALID_CONFIG, "CHECK needs prevResult in the network configuration")
    want = set()
    for ip in nc.prev_result.get("ips") or []:
        try:
            want.add(ipaddress.ip_interface(str(ip.get("address"))).ip)
        except ValueError:
            raise CNIError(spec.DECODING_FAILURE, f"prevResult has an invalid address {ip.get('address')!r}") from None
    store = cluster_of(nc).store()
    try:
        with errors_translated():
            held = IPAM(store).handle(handle_id(nc, env))
    finally:
        store.close()
    have = set(held[0].addresses) if held else set()
    missing = sorted(map(str, want - have))
    if missing:
        raise CNIError(spec.CHECK_FAILED, f"IPAM handle {handle_id(nc, env)} does not hold {', '.join(missing)}")


def ipam_gc(nc: NetConf, env: Env) -> list[str]:
    """Release this node's handles of this network whose attachment is no longer valid."""
    from calyx.ipam.allocator import IPAM

    valid_raw = nc.raw.get("cni.dev/valid-attachments", [])
    if not isinstance(valid_raw, list):
        raise CNIError(spec.INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    valid = {(a.get("containerID"), a.get("ifname")) for a in valid_raw if isinstance(a, dict)}
    cluster = cluster_of(nc)
    store = cluster.store()
    released = []
    try:
        with errors_translated():
            ipam = IPAM(store)
            for h, _ in ipam.handles().values():
                a = h.attributes
                if a.get("network") != nc.name or a.get("node", cluster.node_name) != cluster.node_name:
                    continue
                if "container_id" not in a or (a["container_id"], a.get("ifname")) in valid:
                    continue
                ipam.release(h.handle_id)
                released.append(h.handle_id)
    finally:
        store.close()
    return released


def ipam_status(nc: NetConf, env: Env) -> None:
    from calyx.ipam.allocator import IPAM
    from calyx.ipam.logic import usable_pools

    cluster = cluster_of(nc)
    store = cluster.store()
    try:
        ipam = IPAM(store)
        try:
            pools = ipam.pools()
            labels = ipam.node_labels(cluster.node_name)
        except Exception as exc:
            raise CNIError(spec.NOT_AVAILABLE, f"etcd at {','.join(cluster.etcd_endpoints)} is not usable: {exc}") \
                from None
    finally:
        store.close()
    if not any(usable_pools(pools, labels, v) for v in (4, 6)):
        raise CNIError(spec.NOT_AVAILABLE, f"no enabled IP pool selects node {cluster.node_name}")


def version_reply(nc: NetConf | None) -> dict[str, Any]:
    return {"cniVersion": nc.cni_version if nc else spec.SUPPORTED_VERSIONS[-1],
            "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


def run(environ: Mapping[str, str], stdin: bytes) -> int:
    """One call of the plugin; writes the result or the error JSON to stdout."""
    version = "1.0.0"
    try:
        env = spec.parse_env(environ)
        nc = spec.parse_netconf(stdin, command=env.command)
        version = nc.cni_version
        if env.command == "VERSION":
            spec.write_json(version_reply(nc))
        elif env.command == "ADD":
            env = spec.parse_env(environ, require=("CNI_CONTAINERID",))
            spec.write_json(spec.convert_result(ipam_add(nc, env), version))
        elif env.command == "DEL":
            env = spec.parse_env(environ, require=("CNI_CONTAINERID",))
            ipam_del(nc, env)
        elif env.command == "CHECK":
            env = spec.parse_env(environ, require=("CNI_CONTAINERID",))
            ipam_check(nc, env)
        elif env.command == "GC":
            ipam_gc(nc, env)
        elif env.command == "STATUS":
            ipam_status(nc, env)
        else:
            raise CNIError(spec.INVALID_ENV, f"unknown CNI_COMMAND {env.command!r}")
    except Exception as exc:  # CNIError: our answer; anything else: a bug, answered the same way
        return spec.answer_error(exc, version)
    return 0


def main() -> None:
    """Entry point of ``calyx-ipam``."""
    spec.main(run)


if __name__ == "__main__":
    main()
