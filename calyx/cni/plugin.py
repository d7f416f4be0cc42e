"""``calyx``: the CNI plugin that wires a container into the routed Calyx network.

Commands (spec 1.0.0; STATUS and GC of 1.1.0 when the configuration asks for 1.1.0):

- **ADD**: ask the IPAM plugin named in ``ipam.type`` (``calyx-ipam``, or any other such as
  ``host-local``) through the CNI exec protocol; create the veth pair and routes
  (:mod:`calyx.cni.dataplane`); write the workload endpoint; optionally wait until felix reports
  the endpoint programmed (``readiness_timeout``); print the result. Any failure undoes what was
  done in reverse order (endpoint, veth, IPAM DEL), so a failed ADD leaves nothing behind.
- **DEL**: delete the host veth, the endpoint, then IPAM DEL. Each step tolerates its object being
  gone, CNI_NETNS may be empty or stale and the IPAM plugin may be missing: DEL is idempotent.
- **CHECK**: the veth, addresses, default route and host routes of ``prevResult`` are in place, the
  endpoint exists with those addresses, and the IPAM plugin's CHECK passes.
- **STATUS**: etcd answers and the IPAM plugin's STATUS passes (code 50 otherwise).
- **GC**: endpoints and veths of this network's attachments on this node that are not in
  ``cni.dev/valid-attachments`` (found through the calyx-ipam handles) are removed, then GC is
  delegated to the IPAM plugin.
- **VERSION**: the versions in :data:`calyx.cni.spec.SUPPORTED_VERSIONS`.

Start-up time is the budget: nothing heavy is imported before it is needed, and the datastore is
reached with :class:`calyx.ipam.etcdhttp.HttpStore` (no gRPC).
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from calyx.cni import spec
from calyx.cni.ipam_plugin import errors_translated
from calyx.cni.netconf import Cluster, Identity, PluginConf, cluster_from, felix_mtu, identity, plugin_conf
from calyx.cni.spec import CNIError, Env, NetConf

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ipam_type(nc: NetConf) -> str:
    t = nc.ipam.get("type")
    if not isinstance(t, str) or not t:
        raise CNIError(spec.INVALID_CONFIG, "the network configuration needs ipam.type (e.g. \"calyx-ipam\" or "
                                            "\"host-local\")")
    return t


def _ipam(nc: NetConf, env: Env, command: str) -> dict[str, Any] | None:
    """Run the IPAM plugin's ``command``: ``calyx-ipam`` in this process (the same code, without
    the ~100 ms of a second interpreter start; ``"ipam_in_process": false`` forces exec), any other
    type through the CNI exec protocol on CNI_PATH."""
    ipam_type = _ipam_type(nc)
    if ipam_type == "calyx-ipam" and nc.raw.get("ipam_in_process", True) is not False:
        from calyx.cni import ipam_plugin

        if command == "ADD":
            return ipam_plugin.ipam_add(nc, env)
        if command == "DEL":
            ipam_plugin.ipam_del(nc, env)
        elif command == "CHECK":
            ipam_plugin.ipam_check(nc, env)
        elif command == "GC":
            ipam_plugin.ipam_gc(nc, env)
        elif command == "STATUS":
            ipam_plugin.ipam_status(nc, env)
        return None
    return spec.exec_plugin(ipam_type, command, nc.raw, env)


def _host_nets(result: Mapping[str, Any]) -> list[IPNet]:
    nets: list[IPNet] = []
    for ip in result.get("ips") or []:
        try:
            addr = ipaddress.ip_interface(str(ip.get("address"))).ip
        except (ValueError, AttributeError):
            raise CNIError(spec.DECODING_FAILURE, f"IPAM result has an invalid address: {ip!r}") from None
        nets.append(ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}"))
    return nets


def _endpoint(cluster: Cluster, ident: Identity, pc: PluginConf, nets: list[IPNet], mac: str | None,
              network: str) -> Any:
    """The WorkloadEndpoint, validated by the model (code 7 for bad labels or profile names)."""
    from calyx.datastore import keys
    from calyx.model import ModelError, WorkloadEndpoint

    data = {
        "iface": ident.host_iface,
        "ipv4_nets": [str(n) for n in nets if n.version == 4],
        "ipv6_nets": [str(n) for n in nets if n.version == 6],
        "profiles": list(pc.profiles),
        "labels": dict(pc.labels),
        "state": "active",
        "container_id": ident.container_id,
        "network": network,
    }
    if mac:
        data["mac"] = mac
    try:
        key = keys.workload_key(cluster.node_name, ident.orchestrator, ident.workload, ident.endpoint)
        return WorkloadEndpoint.from_dict(data, key=key, node=cluster.node_name, orchestrator=ident.orchestrator,
                                          workload=ident.workload, endpoint=ident.endpoint, strict=True)
    except ModelError as exc:
        raise CNIError(spec.INVALID_CONFIG, f"workload endpoint: {exc}") from None
    except ValueError as exc:
        raise CNIError(spec.INVALID_CONFIG, f"workload endpoint: {exc}") from None


def _quietly(undo: Callable[[], object]) -> None:
    """One step of a rollback: its own failure must not hide the error being reported (the runtime's
    DEL, and ``calyxctl ipam check --fix`` for the datastore, clean up what is left)."""
    try:
        undo()
    except Exception as exc:
        print(f"calyx: rollback step failed: {exc}", file=spec.stderr())


def _wait_ready(store: Any, cluster: Cluster, ident: Identity, timeout: float, poll: float) -> None:
    from calyx.datastore import keys

    key = keys.endpoint_status_key(cluster.node_name, ident.orchestrator, ident.workload, ident.endpoint)
    deadline = time.monotonic() + timeout
    last = "no status"
    while True:
        kv = store.get(key)
        if kv is not None:
            try:
                state = json.loads(kv.value).get("state")
            except (ValueError, AttributeError):
                state = None
            if state == "up":
                return
            last = f"state {state!r}"
        if time.monotonic() >= deadline:
            raise CNIError(spec.NOT_READY, f"felix on node {cluster.node_name} did not report endpoint "
                                           f"{ident.workload_id} programmed within {timeout:g} s ({last}): is felix "
                                           f"running? (readiness_timeout 0 disables this gate)")
        time.sleep(poll)


def cmd_add(nc: NetConf, env: Env, environ: Mapping[str, str]) -> dict[str, Any]:
    from calyx.cni import dataplane
    from calyx.ipam.store import Delete, Put

    pc = plugin_conf(nc, env)
    ident = identity(env, pc.orchestrator)
    ipam_type = _ipam_type(nc)
    cluster = cluster_from(nc.raw, environ=environ)
    _endpoint(cluster, ident, pc, [], None, nc.name)  # invalid labels fail before anything is allocated
    os.close(dataplane.open_netns(env.netns))  # so does a vanished namespace
    ipam_result = _ipam(nc, env, "ADD") or {}
    try:
        nets = _host_nets(spec.normalize_result(ipam_result))
        if not nets:
            raise CNIError(spec.IPAM_ERROR, f"IPAM plugin {ipam_type} returned no address")
        wired = dataplane.setup(env.netns, env.ifname, ident.host_iface, nets, mtu=pc.mtu or felix_mtu(nc.raw))
        try:
            ep = _endpoint(cluster, ident, pc, nets, wired.mac, nc.name)
            from calyx import model

            key = model.key_of(ep)
            store = cluster.store()
            try:
                with errors_translated():
                    store.commit([Put(key, model.encode(ep), None)])
                    try:
                        if pc.readiness_timeout > 0:
                            _wait_ready(store, cluster, ident, pc.readiness_timeout, pc.readiness_poll)
                    except BaseException:
                        _quietly(lambda: store.commit([Delete(key, None)]))
                        raise
            finally:
                store.close()
        except BaseException:
            _quietly(lambda: dataplane.teardown(ident.host_iface))
            raise
    except BaseException:
        _quietly(lambda: _ipam(nc, env, "DEL"))
        raise
    result: dict[str, Any] = {
        "interfaces": [
            {"name": wired.host_iface, "mac": wired.host_mac},
            {"name": wired.ifname, "mac": wired.mac, "sandbox": env.netns},
        ],
        "ips": [{"address": str(n), "interface": 1} for n in nets],
        "routes": [{"dst": str(d), "gw": str(dataplane.GATEWAY4 if d.version == 4 else dataplane.GATEWAY6)}
                   for d in wired.defaults],
        "dns": ipam_result.get("dns") or nc.raw.get("dns") or {},
    }
    return result


def cmd_del(nc: NetConf, env: Env, environ: Mapping[str, str]) -> None:
    """Kernel first (always possible, even with etcd down), then the endpoint, then IPAM."""
    from calyx.cni import dataplane
    from calyx.datastore import keys
    from calyx.ipam.store import Delete

    pc = plugin_conf(nc, env)
    ident = identity(env, pc.orchestrator)
    cluster = cluster_from(nc.raw, environ=environ)
    dataplane.teardown(ident.host_iface)
    store = cluster.store()
    try:
        with errors_translated():
            store.commit([Delete(keys.workload_key(cluster.node_name, ident.orchestrator, ident.workload,
                                                   ident.endpoint), None)])
    finally:
        store.close()
    ipam_type = nc.ipam.get("type")
    if isinstance(ipam_type, str) and ipam_type:
        try:
            _ipam(nc, env, "DEL")
        except CNIError as exc:
            if not (exc.code == spec.DELEGATE_ERROR and "was not found" in exc.msg):
                raise


def cmd_check(nc: NetConf, env: Env, environ: Mapping[str, str]) -> None:
    from calyx import model
    from calyx.cni import dataplane
    from calyx.datastore import keys

    if nc.prev_result is None:
        raise CNIError(spec.INVALID_CONFIG, "CHECK needs prevResult in the network configuration")
    pc = plugin_conf(nc, env)
    ident = identity(env, pc.orchestrator)
    cluster = cluster_from(nc.raw, environ=environ)
    prev = spec.normalize_result(nc.prev_result)
    nets = _host_nets(prev)
    defaults = []
    for r in prev.get("routes") or []:
        try:
            dst = ipaddress.ip_network(str(r.get("dst")))
        except (ValueError, AttributeError):
            raise CNIError(spec.DECODING_FAILURE, f"prevResult has an invalid route: {r!r}") from None
        if dst.prefixlen == 0 and str(r.get("gw")) in (str(dataplane.GATEWAY4), str(dataplane.GATEWAY6)):
            defaults.append(dst)
    dataplane.check(env.netns, env.ifname, ident.host_iface, nets, defaults)
    key = keys.workload_key(cluster.node_name, ident.orchestrator, ident.workload, ident.endpoint)
    store = cluster.store()
    try:
        with errors_translated():
            kv = store.get(key)
    finally:
        store.close()
    if kv is None:
        raise CNIError(spec.CHECK_FAILED, f"workload endpoint {key} does not exist")
    try:
        ep = model.decode(key, kv.value)
    except model.ModelError as exc:
        raise CNIError(spec.CHECK_FAILED, f"workload endpoint is malformed: {exc}") from None
    assert isinstance(ep, model.WorkloadEndpoint)
    if set(ep.nets) != set(nets) or ep.iface != ident.host_iface:
        raise CNIError(spec.CHECK_FAILED, f"workload endpoint {key} has {ep.iface} {list(map(str, ep.nets))}, "
                                          f"expected {ident.host_iface} {list(map(str, nets))}")
    _ipam(nc, env, "CHECK")


def cmd_status(nc: NetConf, env: Env, environ: Mapping[str, str]) -> None:
    from calyx.datastore import keys

    cluster = cluster_from(nc.raw, environ=environ)
    store = cluster.store()
    try:
        store.get(keys.CLUSTER_CONFIG_KEY)
    except Exception as exc:
        raise CNIError(spec.NOT_AVAILABLE, f"etcd at {','.join(cluster.etcd_endpoints)} is not usable: {exc}") \
            from None
    finally:
        store.close()
    try:
        _ipam(nc, env, "STATUS")
    except CNIError as exc:
        raise CNIError(spec.NOT_AVAILABLE if exc.code < 100 else exc.code, exc.msg) from None


def cmd_gc(nc: NetConf, env: Env, environ: Mapping[str, str]) -> None:
    from calyx import model
    from calyx.cni import dataplane
    from calyx.cni.netconf import Identity
    from calyx.datastore import keys
    from calyx.ipam.allocator import IPAM
    from calyx.ipam.store import Delete

    valid_raw = nc.raw.get("cni.dev/valid-attachments", [])
    if not isinstance(valid_raw, list):
        raise CNIError(spec.INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    valid = {(a.get("containerID"), a.get("ifname")) for a in valid_raw if isinstance(a, dict)}
    cluster = cluster_from(nc.raw, environ=environ)
    stale: dict[str, Identity] = {}  # endpoint key → identity of an attachment that is no longer valid
    store = cluster.store()
    try:
        with errors_translated():
            # endpoints that name their attachment (written by this plugin, any IPAM plugin)
            for kv in store.get_prefix(keys.workloads_prefix(cluster.node_name))[0]:
                try:
                    ep = model.decode(kv.key, kv.value)
                except model.ModelError:
                    continue
                if not isinstance(ep, model.WorkloadEndpoint) or ep.network != nc.name or not ep.container_id:
                    continue
                if (ep.container_id, ep.endpoint) not in valid:
                    stale[kv.key] = Identity(ep.orchestrator, ep.workload, ep.endpoint, ep.container_id)
            # calyx-ipam handles (also finds endpoints written before they named their attachment)
            for h, _ in IPAM(store).handles().values():
                a = h.attributes
                if a.get("network") != nc.name or a.get("node") != cluster.node_name:
                    continue
                if (a.get("container_id"), a.get("ifname")) in valid or not all(
                        a.get(k) for k in ("orchestrator", "workload", "endpoint")):
                    continue
                ident = Identity(a["orchestrator"], a["workload"], a["endpoint"], a.get("container_id", ""))
                stale[keys.workload_key(cluster.node_name, ident.orchestrator, ident.workload, ident.endpoint)] = ident
            for key, ident in stale.items():
                store.commit([Delete(key, None)])
                dataplane.teardown(ident.host_iface)
    finally:
        store.close()
    _ipam(nc, env, "GC")


def run(environ: Mapping[str, str], stdin: bytes) -> int:
    """One call of the plugin; writes the result or the error JSON to stdout; returns the exit code."""
    version = "1.0.0"
    try:
        env = spec.parse_env(environ)
        nc = spec.parse_netconf(stdin, command=env.command)
        version = nc.cni_version
        if env.command == "VERSION":
            spec.write_json({"cniVersion": version, "supportedVersions": list(spec.SUPPORTED_VERSIONS)})
        elif env.command == "ADD":
            env = spec.parse_env(environ, require=("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"))
            spec.write_json(spec.convert_result(cmd_add(nc, env, environ), version))
        elif env.command == "DEL":
            env = spec.parse_env(environ, require=("CNI_CONTAINERID", "CNI_IFNAME"))
            cmd_del(nc, env, environ)
        elif env.command == "CHECK":
            env = spec.parse_env(environ, require=("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"))
            cmd_check(nc, env, environ)
        elif env.command == "STATUS":
            cmd_status(nc, env, environ)
        elif env.command == "GC":
            cmd_gc(nc, env, environ)
        else:
            raise CNIError(spec.INVALID_ENV, f"unknown CNI_COMMAND {env.command!r} (ADD, DEL, CHECK, STATUS, GC, "
                                             f"VERSION)")
    except Exception as exc:  # CNIError: our answer; anything else: a bug, answered the same way
        return spec.answer_error(exc, version)
    return 0


def main() -> None:
    """Entry point of ``calyx``."""
    spec.main(run)


if __name__ == "__main__":
    main()
