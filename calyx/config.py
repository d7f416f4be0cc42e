"""Configuration shared by felix, bgpd, calyxctl and the CNI plugins.

Sources, lowest precedence first: built-in defaults, the TOML file (``/etc/calyx/calyx.toml`` or
``--config`` / ``CALYX_CONFIG``), environment variables ``CALYX_<KEY>``, and command-line flags.
The TOML file may have ``[felix]``, ``[bgpd]`` and ``[cni]`` tables whose keys override the top
level for that component only (e.g. two daemons on one host need two metrics ports). Environment
variables may name the component too: ``CALYX_FELIX_METRICS_PORT`` beats ``CALYX_METRICS_PORT``
for felix.

Every key is declared once in :data:`FIELDS` with its type and check; an unknown key or a bad value
raises :class:`ConfigError` naming the key, where it came from (the file and table, the environment
variable, the flag) and what would be accepted; so does a configuration that cannot work at all: a
TLS file that does not exist, cannot be read or is not a certificate (key), half of a pair, a node
name that is not valid (also when it is the host name, the default). The commands turn that into
one line on stderr and exit code 2 (:func:`fail`), which the systemd units do not restart on
(``RestartPreventExitStatus=2``): a daemon restarted with the same configuration fails the same way.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

# ssl, difflib and calyx.logfmt are imported where they are needed: a CNI plugin that reads this
# configuration pays for every import at each call.

DEFAULT_PATH = "/etc/calyx/calyx.toml"
#: the units' EnvironmentFile=; calyxctl reads it too (systemd hands it to the daemons)
DEFAULT_ENV_FILE = "/etc/calyx/calyx.env"
COMPONENTS = ("felix", "bgpd", "cni", "calyxctl")
EXIT_CONFIG = 2
#: exit code of a daemon that must be restarted to apply a configuration change
EXIT_RESTART = 129
#: values of log_format (calyx.logfmt implements them)
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and its source."""


def _endpoints(value: object) -> tuple[str, ...]:
    items: list[str]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError("expected a list of URLs or a comma-separated string")
    if not items:
        raise ValueError("at least one endpoint is needed")
    pat = re.compile(r"^(https?://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}$")
    for item in items:
        if not pat.match(item):
            raise ValueError(f"{item!r} is not host:port or http(s)://host:port")
    return tuple(items)


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _opt_path(value: object) -> str:
    path = _str(value)
    return path


def _ipv4(value: object) -> str:
    text = _str(value)
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"expected an IPv4 address (a.b.c.d), got {text!r}") from None


def _int_range(lo: int, hi: int) -> Callable[[object], int]:
    def conv(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, str):
            if not value.strip().lstrip("-").isdigit():
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("expected an integer")
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value

    return conv


def _float_range(lo: float, hi: float) -> Callable[[object], float]:
    def conv(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            f = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not lo <= f <= hi:
            raise ValueError(f"{f} is outside {lo}..{hi}")
        return f

    return conv


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[object], str]:
    def conv(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return conv


_NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$")


def _node_name(value: object) -> str:
    name = _str(value)
    if not _NODE_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid node name (letters, digits, '.', '_', '-')")
    return name


def _autodetection(value: object) -> str:
    from calyx.kernel.autodetect import Method

    return str(Method.parse(_str(value)))


def _as_number(value: object) -> int:
    if isinstance(value, str) and "." in value:  # asdot, as in the datastore: "1.10" = 65546
        hi, _, lo = value.strip().partition(".")
        if hi.isdigit() and lo.isdigit() and int(hi) < 65536 and int(lo) < 65536:
            return int(hi) * 65536 + int(lo)
        raise ValueError(f"expected an AS number (1..4294967295 or asdot 'a.b'), got {value!r}")
    return _int_range(1, 4294967295)(value)


def _labels(value: object) -> tuple[tuple[str, str], ...]:
    """A TOML table of label → string, or ``"k=v,k2=v2"`` (the environment's form)."""
    from calyx.model.validate import label_error

    pairs: list[tuple[str, str]] = []
    if isinstance(value, str):
        for item in value.split(","):
            if not item.strip():
                continue
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"expected name=value pairs separated by commas, got {item.strip()!r}")
            pairs.append((k.strip(), v.strip()))
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(v, str):
                raise ValueError(f"label {k!r}: values must be strings, got {v!r}")
            pairs.append((k, v))
    else:
        raise ValueError('expected a table of label = "value" (environment: "name=value,name2=value2")')
    for k, v in pairs:
        err = label_error(k, v)
        if err:
            raise ValueError(err)
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("a label is given twice")
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class Config:
    """Resolved configuration. Field names are the TOML keys; ``CALYX_<UPPER>`` the variables."""

    node_name: str = field(default_factory=socket.gethostname)
    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_timeout: float = 5.0
    log_level: str = "info"
    log_format: str = "text"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    state_dir: str = "/var/lib/calyx"
    run_dir: str = "/run/calyx"
    # node self-registration (calyx.noderegister; felix and bgpd)
    node_ipv4_autodetection: str = "default-route"
    node_as_number: int | None = None
    node_labels: tuple[tuple[str, str], ...] = ()
    # felix
    iptables_backend: str = "auto"
    route_refresh_interval: float = 90.0
    iptables_refresh_interval: float = 90.0
    ipset_refresh_interval: float = 90.0
    status_interval: float = 10.0
    status_ttl: int = 30
    ip_forwarding: str = "warn"
    endpoint_status: bool = True
    tunnel_mtu: int = 0
    # bgpd
    exabgp_bin: str = "exabgp"
    bgp_router_id: str | None = None
    bgp_listen_port: int = 179
    bgp_metric: int = 20
    reactor_speed: float = 0.1
    bgp_link_watch: bool = True
    bgp_max_prefixes_hold_down: float = 60.0
    # where this config came from, for messages
    source: str = ""
    #: (key, where its value came from) for every key not left at its default
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, key: str) -> str:
        """Where ``key``'s value came from: a file (and table), an environment variable, a flag, or "default"."""
        return dict(self.origins).get(key, "default")


# key -> converter; every key a user may set
FIELDS: dict[str, Callable[[object], Any]] = {
    "node_name": _node_name,
    "etcd_endpoints": _endpoints,
    "etcd_ca": _opt_path,
    "etcd_cert": _opt_path,
    "etcd_key": _opt_path,
    "etcd_username": _str,
    "etcd_password": _str,
    "etcd_timeout": _float_range(0.1, 600),
    "log_level": _choice("debug", "info", "warning", "error", "critical"),
    "log_format": _choice(*LOG_FORMATS),
    "metrics_port": _int_range(0, 65535),
    "metrics_host": _str,
    "state_dir": _str,
    "run_dir": _str,
    "node_ipv4_autodetection": _autodetection,
    "node_as_number": _as_number,
    "node_labels": _labels,
    "iptables_backend": _choice("auto", "legacy", "nft"),
    "route_refresh_interval": _float_range(0, 86400),
    "iptables_refresh_interval": _float_range(0, 86400),
    "ipset_refresh_interval": _float_range(0, 86400),
    "status_interval": _float_range(0.5, 3600),
    "status_ttl": _int_range(2, 86400),
    "ip_forwarding": _choice("warn", "enable"),
    "endpoint_status": _bool,
    "tunnel_mtu": _int_range(0, 65535),
    "exabgp_bin": _str,
    "bgp_router_id": _ipv4,
    "bgp_listen_port": _int_range(1, 65535),
    "bgp_metric": _int_range(1, 4294967295),
    "reactor_speed": _float_range(0.03, 5.0),
    "bgp_link_watch": _bool,
    "bgp_max_prefixes_hold_down": _float_range(1.0, 86400),
}

#: per-component defaults that differ from the Config defaults
COMPONENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "felix": {"metrics_port": 9091},
    "bgpd": {"metrics_port": 9092},
}

assert set(FIELDS) <= {f.name for f in fields(Config)}

#: keys that describe the host, not one program: felix and bgpd both register the node with them and
#: must agree, so a component table or a CALYX_<COMPONENT>_<KEY> variable may not set them
HOST_KEYS = frozenset({"node_ipv4_autodetection", "node_as_number", "node_labels"})


def _host_key_error(key: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: {key} describes the host (felix and bgpd both register the node with it and "
                       f"must agree): set it at the top level of the file or as CALYX_{key.upper()}")


def _convert(key: str, value: object, source: str) -> Any:
    conv = FIELDS.get(key)
    if conv is None:
        import difflib

        near = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f"did you mean {near[0]!r}?" if near else "docs/configuration.md lists the keys"
        raise ConfigError(f"{source}: unknown configuration key {key!r}: {hint}")
    try:
        return conv(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid value for {key}: {exc}") from None


def _check_files(values: Mapping[str, Any], origins: Mapping[str, str]) -> None:
    """The TLS files exist, can be read by this process, and are a CA, a certificate and its key."""
    def where(key: str) -> str:
        return origins.get(key, "default")

    for a, b in (("etcd_cert", "etcd_key"), ("etcd_username", "etcd_password")):
        if bool(values.get(a)) != bool(values.get(b)):
            have, missing = (a, b) if values.get(a) else (b, a)
            raise ConfigError(f"{where(have)}: {have} is set but {missing} is not: {a} and {b} must be given together "
                              f"(set {missing} too, or remove {have})")
    for key in ("etcd_ca", "etcd_cert", "etcd_key"):
        p = values.get(key)
        if not p:
            continue
        if not Path(p).is_file():
            raise ConfigError(f"{where(key)}: {key}: file {p} does not exist: create it (docs/install.md, etcd with "
                              f"TLS) or correct the path")
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{where(key)}: {key}: file {p} cannot be read by uid {os.geteuid()} ({exc.strerror}): "
                              f"let this user read it (bgpd runs as calyx: install -m 0640 -g calyx) or correct the "
                              f"path") from None
    if not (values.get("etcd_ca") or values.get("etcd_cert")):
        return
    import ssl

    try:
        if values.get("etcd_ca"):
            ssl.create_default_context(cafile=values["etcd_ca"])
    except ssl.SSLError as exc:
        raise ConfigError(f"{where('etcd_ca')}: etcd_ca: {values['etcd_ca']} holds no CA certificate in PEM form "
                          f"({exc.reason or exc}): name the CA's .crt file") from None
    try:
        if values.get("etcd_cert"):
            ssl.create_default_context().load_cert_chain(values["etcd_cert"], values["etcd_key"])
    except ssl.SSLError as exc:
        raise ConfigError(f"{where('etcd_cert')}: etcd_cert {values['etcd_cert']} and etcd_key {values['etcd_key']} "
                          f"are not a PEM certificate and its private key ({exc.reason or exc}): name the client "
                          f"certificate and the key it was made with") from None


def read_env_file(env: Mapping[str, str]) -> dict[str, str]:
    """The ``CALYX_*`` variables of the units' environment file (``$CALYX_ENV_FILE`` or
    /etc/calyx/calyx.env, which may be absent), so that calyxctl on a host sees what felix and bgpd
    see. systemd's syntax: ``KEY=VALUE`` lines, ``#`` comments, values optionally quoted."""
    path = Path(env.get("CALYX_ENV_FILE") or DEFAULT_ENV_FILE)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if "CALYX_ENV_FILE" in env:
            raise ConfigError(f"environment variable CALYX_ENV_FILE: {path} does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror} (run calyxctl as root, or as a member of "
                          f"the file's group)") from None
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE, got {line[:60]!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key.startswith("CALYX_"):
            out[key] = value
    return out


def load(
    component: str,
    *,
    path: str | None = None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the configuration of ``component`` (felix, bgpd, cni, calyxctl).

    ``path`` None means ``$CALYX_CONFIG`` or the default path, which may be absent; an explicitly
    named file must exist. ``flags`` holds values given on the command line (None values ignored).
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component}")
    env: Mapping[str, str] = os.environ if environ is None else environ
    from_file: dict[str, str] = {}
    if component == "calyxctl":
        from_file = {k: v for k, v in read_env_file(env).items() if k not in env}
        env = {**from_file, **env}  # the real environment wins, as a shell's export would
    env_file = env.get("CALYX_ENV_FILE") or DEFAULT_ENV_FILE
    values: dict[str, Any] = dict(COMPONENT_DEFAULTS.get(component, {}))
    origins: dict[str, str] = {}
    sources: list[str] = []

    explicit = path is not None or "CALYX_CONFIG" in env
    cfg_path = Path(path or env.get("CALYX_CONFIG") or DEFAULT_PATH)
    named_by = "--config" if path is not None else "environment variable CALYX_CONFIG"
    if cfg_path.exists() or explicit:
        try:
            raw = tomllib.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{named_by}: configuration file {cfg_path} does not exist: create it (etc/calyx.toml "
                              f"is an example) or name the right file") from None
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {cfg_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: not valid TOML: {exc}") from None
        sources.append(str(cfg_path))
        for key, value in raw.items():
            if key in COMPONENTS:
                continue
            values[key] = _convert(key, value, str(cfg_path))
            origins[key] = str(cfg_path)
        section = raw.get(component)
        if section is not None:
            if not isinstance(section, dict):
                raise ConfigError(f"{cfg_path}: [{component}] must be a table")
            for key, value in section.items():
                values[key] = _convert(key, value, f"{cfg_path} [{component}]")
                origins[key] = f"{cfg_path} [{component}]"
        for comp in COMPONENTS:
            sec = raw.get(comp)
            if isinstance(sec, dict):
                for key, value in sec.items():  # validate the other sections too: typos anywhere fail
                    _convert(key, value, f"{cfg_path} [{comp}]")
                    if key in HOST_KEYS:
                        raise _host_key_error(key, f"{cfg_path} [{comp}]")

    for key in FIELDS:
        for var in (f"CALYX_{key.upper()}", f"CALYX_{component.upper()}_{key.upper()}"):
            where = f"{env_file} ({var})" if var in from_file else f"environment variable {var}"
            if var in env and key in HOST_KEYS and var != f"CALYX_{key.upper()}":
                raise _host_key_error(key, where)
            if var in env:
                values[key] = _convert(key, env[var], where)
                origins[key] = where
                if "environment" not in sources:
                    sources.append("environment")

    for key, value in (flags or {}).items():
        if value is None or value == ():
            continue
        values[key] = _convert(key, value, f"--{key.replace('_', '-')}")
        origins[key] = f"--{key.replace('_', '-')}"

    if "node_name" not in values:
        host = socket.gethostname()
        try:
            values["node_name"] = _node_name(host)
        except ValueError:
            raise ConfigError(f"node_name is not set and the host name {host!r} is not a valid node name (letters, "
                              f"digits, '.', '_', '-'): set node_name in the configuration file or CALYX_NODE_NAME"
                              ) from None
    _check_files(values, origins)
    return replace(Config(), **values, source=", ".join(sources) or "defaults", origins=tuple(origins.items()))


def fail(program: str, exc: ConfigError) -> NoReturn:
    """Print ``exc`` as one line on stderr and exit :data:`EXIT_CONFIG`.

    Under systemd the line carries priority 3 (error) for journald, like a logged error.
    """
    import logging

    from calyx import logfmt

    prefix = f"<{logfmt.priority(logging.ERROR)}>" if logfmt.stderr_is_journal() else ""
    text = " ".join(str(exc).split("\n"))
    print(f"{prefix}{program}: configuration error: {text}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG)


def datastore_kwargs(cfg: Config) -> dict[str, Any]:
    """Arguments for :class:`calyx.datastore.client.Datastore` from a Config."""
    return {
        "ca": cfg.etcd_ca,
        "cert": cfg.etcd_cert,
        "key": cfg.etcd_key,
        "username": cfg.etcd_username,
        "password": cfg.etcd_password,
        "timeout": cfg.etcd_timeout,
    }
