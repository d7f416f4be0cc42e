"""``bgpd render``: the ExaBGP configuration a node would run, from etcd or from a JSON file.

The JSON input (also the format of the golden files in tests/bgpd/golden/) holds the datastore
values: ``{"node_name": ..., "nodes": {name: value}, "peers": {name: value}, "cluster": value,
"helper": ..., "port": ..., "reactor_speed": ...}``. Values are validated by the model exactly as
when they come from etcd.
"""

from __future__ import annotations

from typing import Any

from bgpd import exaconf
from bgpd.exabgp import helper_command
from bgpd.peering import desired_peers, local_identity
from calyx import config as calyx_config
from calyx import model
from calyx.config import Config
from calyx.datastore import keys
from calyx.datastore.client import Datastore
from calyx.model import BGPPeer, ClusterConfig, Node

DEFAULT_HELPER = "python -m bgpd.helper /run/calyx/bgpd/bgpd-api.sock"


def render_model(
    node_name: str,
    nodes: dict[str, Node],
    peers: list[BGPPeer],
    cluster: ClusterConfig,
    *,
    helper: str = DEFAULT_HELPER,
    port: int = 179,
    reactor_speed: float = 0.1,
    router_id: str | None = None,
) -> str:
    node = nodes.get(node_name)
    me = local_identity(node, cluster, router_id) if node is not None else None
    if me is None:
        raise ValueError(f"node {node_name} is unknown or has no IPv4 address")
    neighbors = desired_peers(node_name, nodes, peers, cluster, router_id=router_id)
    cfg = exaconf.build(node_name, neighbors, helper=helper, bind=me.address, port=port,
                        restart_time=cluster.graceful_restart_time, reactor_speed=reactor_speed)
    return exaconf.render(cfg)


def render_from_input(data: dict[str, Any]) -> str:
    nodes = {
        name: Node.from_dict(v, key=keys.node_key(name), name=name) for name, v in data.get("nodes", {}).items()
    }
    peers = [
        BGPPeer.from_dict(v, key=keys.bgp_peer_key(name), name=name) for name, v in data.get("peers", {}).items()
    ]
    cluster = ClusterConfig.from_dict(data.get("cluster", {}), key=keys.CLUSTER_CONFIG_KEY)
    return render_model(data["node_name"], nodes, peers, cluster, helper=data.get("helper", DEFAULT_HELPER),
                        port=int(data.get("port", 179)), reactor_speed=float(data.get("reactor_speed", 0.1)),
                        router_id=data.get("router_id"))


def render_from_datastore(cfg: Config) -> str:
    with Datastore(cfg.etcd_endpoints, **calyx_config.datastore_kwargs(cfg)) as ds:
        nodes: dict[str, Node] = {}
        peers: list[BGPPeer] = []
        cluster = ClusterConfig()
        for prefix in (keys.NODES_PREFIX, keys.BGP_PEERS_PREFIX, keys.CLUSTER_CONFIG_KEY):
            kvs, _rev = ds.get_prefix(prefix)
            for kv in kvs:
                try:
                    obj = model.decode(kv.key, kv.value)
                except model.ModelError:
                    continue
                if isinstance(obj, Node):
                    nodes[obj.name] = obj
                elif isinstance(obj, BGPPeer):
                    peers.append(obj)
                elif isinstance(obj, ClusterConfig):
                    cluster = obj
    helper = helper_command(f"{cfg.run_dir}/bgpd-api.sock")
    return render_model(cfg.node_name, nodes, peers, cluster, helper=helper, port=cfg.bgp_listen_port,
                        reactor_speed=cfg.reactor_speed, router_id=cfg.bgp_router_id)
