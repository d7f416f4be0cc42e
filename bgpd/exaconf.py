"""ExaBGP's configuration and environment, rendered from the desired peer set.

What it owns: the text of ``<state_dir>/bgpd/exabgp.conf`` and the environment ExaBGP runs with.
:func:`build` turns :class:`bgpd.peering.Neighbor` objects into a view model of plain strings;
:func:`render` fills the logic-free templates ``templates/exabgp.conf.tmpl`` and
``templates/neighbor.tmpl`` (``string.Template``: substitutions only, no conditionals or loops, so
every decision is here in typed code and covered by the golden files in tests/bgpd/golden/).

What every neighbour gets, and why (docs/bgpd.md has the ExaBGP findings):

- ``manual-eor true``: ExaBGP would send End-of-RIB as soon as a session comes up, before bgpd has
  re-announced anything, and a peer doing graceful restart would flush our routes; bgpd sends it.
- ``adj-rib-in true``: lets bgpd re-learn every received route (``show adj-rib in``) after the API
  helper restarts, since ExaBGP replays nothing to a new helper.
- ``passive``: set by the peering rules (the higher address of two nodes waits).
- the MD5 password base64-encoded (``md5-base64 true``), so no character needs quoting;
- ``graceful-restart <cluster time>`` when the peering keeps it.

:func:`environment` gives ExaBGP no privilege drop (it would run the helper as ``nobody``), no CLI
FIFOs, the listening address and port, the reactor speed, and the v2 format for ``show adj-rib``.
:func:`needs_restart` says whether a change can be applied by SIGUSR1 (neighbours only) or needs a
restart (anything in the ``process`` section or the environment).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from string import Template

from bgpd.peering import Neighbor

TEMPLATES = "templates"


@dataclass(frozen=True, slots=True)
class ExaNeighbor:
    """One ``neighbor`` block, every value already a string."""

    peer_ip: str
    description: str
    router_id: str
    local_address: str
    local_as: str
    peer_as: str
    hold_time: str
    passive: str
    manual_eor: str
    md5_lines: str
    graceful_restart_lines: str


@dataclass(frozen=True, slots=True)
class ExaConfig:
    """Everything ExaBGP is started with: configuration text inputs and environment inputs."""

    node: str
    helper: str
    neighbors: tuple[ExaNeighbor, ...]
    bind: str
    port: int
    reactor_speed: float

    def global_key(self) -> tuple[str, str, int, float]:
        """What cannot change without restarting ExaBGP."""
        return (self.helper, self.bind, self.port, self.reactor_speed)


def _description(nb: Neighbor) -> str:
    text = f"{nb.peer_type} {nb.peer_node or nb.source}".strip()
    return "".join(c for c in text if c.isalnum() or c in " -_.:/")


def build_neighbor(nb: Neighbor, restart_time: int) -> ExaNeighbor:
    md5 = ""
    if nb.password:
        encoded = base64.b64encode(nb.password.encode()).decode()
        md5 = f"\n    md5-password {encoded};\n    md5-base64 true;"
    gr = f"\n        graceful-restart {restart_time};" if nb.graceful_restart and restart_time > 0 else ""
    return ExaNeighbor(
        peer_ip=nb.peer_ip,
        description=_description(nb),
        router_id=nb.router_id,
        local_address=nb.local_address,
        local_as=str(nb.local_as),
        peer_as=str(nb.peer_as),
        hold_time=str(nb.hold_time),
        passive="true" if nb.passive else "false",
        manual_eor="true",
        md5_lines=md5,
        graceful_restart_lines=gr,
    )


def build(
    node: str,
    neighbors: Mapping[str, Neighbor],
    *,
    helper: str,
    bind: str,
    port: int = 179,
    restart_time: int = 120,
    reactor_speed: float = 0.1,
) -> ExaConfig:
    """The view model for ``node`` (neighbours sorted by address for a stable file)."""
    import ipaddress

    ordered = sorted(neighbors.values(), key=lambda n: int(ipaddress.ip_address(n.peer_ip)))
    return ExaConfig(
        node=node,
        helper=helper,
        neighbors=tuple(build_neighbor(n, restart_time) for n in ordered),
        bind=bind,
        port=port,
        reactor_speed=reactor_speed,
    )


def _template(name: str) -> Template:
    return Template(resources.files("bgpd").joinpath(TEMPLATES, name).read_text())


def render(cfg: ExaConfig) -> str:
    """The configuration file text."""
    nb_tmpl = _template("neighbor.tmpl")
    blocks = "".join(nb_tmpl.substitute(_fields(n)) for n in cfg.neighbors)
    return _template("exabgp.conf.tmpl").substitute(node=cfg.node, helper=cfg.helper, neighbors=blocks)


def _fields(n: ExaNeighbor) -> dict[str, str]:
    return {f: getattr(n, f) for f in ExaNeighbor.__slots__}


def environment(cfg: ExaConfig) -> dict[str, str]:
    """ExaBGP's settings as environment variables (dotted names: some options have hyphens)."""
    return {
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.api.cli": "false",
        "exabgp.api.ack": "true",
        "exabgp.api.respawn": "true",
        "exabgp.api.show-routes-format": "v2",
        "exabgp.api.chunk": "100",
        "exabgp.tcp.bind": cfg.bind,
        "exabgp.tcp.port": str(cfg.port),
        "exabgp.reactor.speed": repr(cfg.reactor_speed),
        "exabgp.log.destination": "stdout",
        "exabgp.log.level": "INFO",
        "exabgp.log.statistics": "false",
        "exabgp.log.packets": "false",
        "exabgp.log.message": "false",
        "exabgp.log.network": "true",
        "exabgp.log.reactor": "true",
        "exabgp.log.processes": "true",
        "exabgp.log.routes": "false",
        "exabgp.log.rib": "false",
        "exabgp.log.parser": "false",
        "exabgp.cache.attributes": "true",
    }


def needs_restart(old: ExaConfig | None, new: ExaConfig) -> bool:
    """True when ``new`` cannot be applied to a running ExaBGP by a reload."""
    return old is None or old.global_key() != new.global_key()
