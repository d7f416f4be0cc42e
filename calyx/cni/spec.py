"""The CNI protocol (spec 1.0.0, and 1.1.0's STATUS and GC): environment, network configuration,
results in every supported version, errors, and executing delegated plugins.

What it owns: nothing in the kernel or the datastore. It turns the runtime's environment and stdin
into typed values, raising :class:`CNIError` with the spec's code (1 incompatible version, 4 invalid
environment, 6 undecodable input, 7 invalid network configuration, 11 try again later, 100+ ours),
and writes results and errors the way the caller's ``cniVersion`` expects (0.3.x/0.4.0 results carry
``"version"`` in every IP entry; 1.x results do not).

Only the standard library is imported here: VERSION must answer in a few milliseconds.

One call's streams and environment are the process's own, unless :func:`call_io` says otherwise:
the CNI service (:mod:`calyx.cni.server`) runs many calls at once in one process, each in its own
thread with its own stdout, stderr and caller's environment.
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NamedTuple, NoReturn

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
#: what a 1.0.0 caller may do; CHECK needs 0.4.0; STATUS and GC need 1.1.0
CHECK_MIN = (0, 4, 0)
V11 = (1, 1, 0)

# error codes of the spec
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# ours (100+)
PLUGIN_ERROR = 100  #: the kernel refused something (message names the operation)
IPAM_ERROR = 101  #: no pool, pool exhausted, fixed address unavailable
DATASTORE_ERROR = 102  #: etcd refused a request (not an outage: that is 11)
NOT_READY = 103  #: the readiness gate expired: felix did not program the endpoint in time
CHECK_FAILED = 104  #: CHECK found the container's network not as ADD left it
DELEGATE_ERROR = 105  #: the delegated IPAM plugin failed without a spec error


class CallIO(NamedTuple):
    """Where one call's output goes and which environment it was given (the CNI service's calls)."""

    stdout: IO[str]
    stderr: IO[str]
    environ: Mapping[str, str]


_CALL: contextvars.ContextVar[CallIO | None] = contextvars.ContextVar("calyx_cni_call", default=None)


def call_io(io: CallIO) -> None:
    """Route this thread's (context's) plugin output and environment to ``io``."""
    _CALL.set(io)


def stdout() -> IO[str]:
    io = _CALL.get()
    return sys.stdout if io is None else io.stdout


def stderr() -> IO[str]:
    io = _CALL.get()
    return sys.stderr if io is None else io.stderr


def caller_environ() -> Mapping[str, str]:
    """The environment the runtime gave this call (passed on to delegated plugins)."""
    io = _CALL.get()
    return os.environ if io is None else io.environ


class CNIError(Exception):
    """An error to report to the runtime as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, version: str) -> dict[str, Any]:
        d: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            d["details"] = self.details
        return d


def vtuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in version.split("."))
    except ValueError:
        return (0,)


class Env(NamedTuple):
    """The CNI_* environment of one call."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: tuple[str, ...]


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K2=V2``) as a dict; raises CNIError 4 on a pair without ``=``."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise CNIError(INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE", text)
        out[k] = v
    return out


def parse_env(environ: Mapping[str, str], *, require: Sequence[str] = ()) -> Env:
    """Read the CNI_* variables; ``require`` names the ones that must be non-empty (code 4)."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(INVALID_ENV, "CNI_COMMAND is not set: this program is a CNI plugin, run by a container runtime")
    for var in require:
        if not environ.get(var):
            raise CNIError(INVALID_ENV, f"{var} is required for {command} but is empty or unset")
    return Env(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_args(environ.get("CNI_ARGS", "")),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p),
    )


class NetConf(NamedTuple):
    """The network configuration on stdin: the spec's fields and the raw dict for plugin fields."""

    cni_version: str
    name: str
    type: str
    raw: dict[str, Any]
    ipam: dict[str, Any] = {}
    prev_result: dict[str, Any] | None = None
    runtime_config: dict[str, Any] = {}


def parse_netconf(data: bytes, *, command: str) -> NetConf:
    """Decode stdin (code 6 if it is not a JSON object) and check the spec's fields (codes 1, 7)."""
    if command == "VERSION":  # answered whatever was sent: the caller wants to learn what we support
        try:
            raw = json.loads(data) if data.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raw = {}
        asked = raw.get("cniVersion") if isinstance(raw, dict) else None
        return NetConf(asked if asked in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1], "", "", {})
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODING_FAILURE, f"network configuration on stdin is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CNIError(DECODING_FAILURE, "network configuration on stdin must be a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, f"CNI version {version} is not supported; this plugin supports "
                       f"{', '.join(SUPPORTED_VERSIONS)}")
    for fname in ("name", "type"):
        if not isinstance(raw.get(fname), str) or not raw[fname]:
            raise CNIError(INVALID_CONFIG, f"network configuration has no {fname!r} (a non-empty string)")
    ipam = raw.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise CNIError(INVALID_CONFIG, "'ipam' must be an object")
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CNIError(INVALID_CONFIG, "'prevResult' must be an object")
    rc = raw.get("runtimeConfig") or {}
    if not isinstance(rc, dict):
        raise CNIError(INVALID_CONFIG, "'runtimeConfig' must be an object")
    v = vtuple(version)
    if command == "CHECK" and v < CHECK_MIN:
        raise CNIError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, the configuration says {version}")
    if command in ("STATUS", "GC") and v < V11:
        raise CNIError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later, the configuration says "
                       f"{version}")
    return NetConf(version, raw["name"], raw["type"], raw, ipam, prev, rc)


def normalize_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result of any supported version in 1.x form (no ``version`` in IP entries)."""
    out = {k: v for k, v in result.items() if k != "cniVersion"}
    ips = []
    for ip in result.get("ips") or []:
        if isinstance(ip, dict):
            ips.append({k: v for k, v in ip.items() if k != "version"})
    out["ips"] = ips
    return out


def convert_result(result: Mapping[str, Any], version: str) -> dict[str, Any]:
    """A 1.x-form result in the shape ``version`` expects."""
    out: dict[str, Any] = {"cniVersion": version}
    out.update({k: v for k, v in result.items() if k != "cniVersion"})
    if vtuple(version) < (1, 0, 0):
        out["ips"] = [{"version": "6" if ":" in str(ip.get("address", "")) else "4", **ip}
                      for ip in result.get("ips") or []]
    return out


def write_json(obj: Mapping[str, Any]) -> None:
    out = stdout()
    out.write(json.dumps(obj))
    out.write("\n")
    out.flush()


def fail(err: CNIError, version: str) -> NoReturn:
    """Write the error JSON to stdout and exit 1 (the spec's way)."""
    write_json(err.to_dict(version))
    sys.exit(1)


def answer_error(exc: Exception, version: str) -> int:
    """Write the spec's error JSON for ``exc`` and return the exit code 1.

    A :class:`CNIError` is the plugin's own answer; anything else is a bug, still answered with
    the spec's error JSON, and its traceback goes to stderr.
    """
    if not isinstance(exc, CNIError):
        import traceback

        traceback.print_exception(exc, file=stderr())
        exc = CNIError(PLUGIN_ERROR, f"unexpected {type(exc).__name__}: {exc}")
    write_json(exc.to_dict(version))
    return 1


def main(run: Callable[[Mapping[str, str], bytes], int]) -> NoReturn:
    """A plugin's entry point: stdin and the environment in, ``run``'s exit code out."""
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        fail(CNIError(IO_FAILURE, f"cannot read stdin: {exc}"), "1.0.0")
    sys.exit(run(os.environ, stdin))


def find_plugin(name: str, path: Sequence[str]) -> str:
    """The executable ``name`` on CNI_PATH (code 7 if ``name`` is not a plain name, 100+ if absent)."""
    if not name or "/" in name or name in (".", ".."):
        raise CNIError(INVALID_CONFIG, f"plugin type {name!r} is not a plain executable name")
    for d in path:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise CNIError(DELEGATE_ERROR, f"plugin {name!r} was not found in CNI_PATH ({os.pathsep.join(path) or 'empty'})")


def exec_plugin(
    name: str, command: str, netconf: Mapping[str, Any], env: Env, *, timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Run a delegated plugin with the CNI exec protocol; its result (None if it printed nothing).

    A spec error from the delegate is re-raised with its code and message (prefixed with the
    delegate's name); a crash without error JSON becomes code 105.
    """
    import subprocess

    binary = find_plugin(name, env.path)
    child_env = dict(caller_environ())
    child_env.update({
        "CNI_COMMAND": command, "CNI_CONTAINERID": env.container_id, "CNI_NETNS": env.netns,
        "CNI_IFNAME": env.ifname, "CNI_PATH": os.pathsep.join(env.path),
        "CNI_ARGS": ";".join(f"{k}={v}" for k, v in env.args.items()),
    })
    if extra_env:
        child_env.update(extra_env)
    try:
        proc = subprocess.run([binary], input=json.dumps(netconf).encode(), env=child_env, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CNIError(TRY_AGAIN_LATER, f"IPAM plugin {name} did not answer {command} within {timeout:.0f} s") from None
    except OSError as exc:
        raise CNIError(DELEGATE_ERROR, f"cannot run IPAM plugin {binary}: {exc.strerror}") from None
    out = proc.stdout.strip()
    parsed: Any = None
    if out:
        try:
            parsed = json.loads(out)
        except ValueError:
            parsed = None
    if proc.returncode != 0:
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), int):
            raise CNIError(int(parsed["code"]), f"{name}: {parsed.get('msg', '')}", str(parsed.get("details", "")))
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-500:]
        raise CNIError(DELEGATE_ERROR, f"IPAM plugin {name} failed ({command}, exit {proc.returncode}): {tail}")
    if out and not isinstance(parsed, dict):
        raise CNIError(DELEGATE_ERROR, f"IPAM plugin {name} printed something that is not a JSON object")
    return parsed if isinstance(parsed, dict) else None
