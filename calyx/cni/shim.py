"""The executables ``calyx`` and ``calyx-ipam``: hand the call to the CNI service, or run it here.

A CNI plugin is a new process for every call, and a Python interpreter that imports the typed
model, the IPAM and the netlink code spends most of an ADD starting up. When the CNI service
(:mod:`calyx.cni.server`, ``calyx-cni-server``, systemd unit ``calyx-cni.service``) listens on its
socket, this module only forwards the call — environment and stdin in; exit code, stdout and stderr
back — importing nothing but :mod:`os`, :mod:`sys` and :mod:`socket`. The service runs exactly the
code this process would (:func:`calyx.cni.plugin.run`), in the caller's network namespace.

When there is no service — no socket, nobody listening, or a service that speaks another protocol
version — the call runs in this process, with the same result. Once the service has accepted the
call, it is never run a second time here: if the connection breaks before the answer, the answer is
the spec's error code 11 (try again later) and the runtime's retry or DEL cleans up.

``CALYX_CNI_SOCKET`` names the socket (default ``/run/calyx/cni.sock``); ``off`` or an empty value
always runs in-process. Runtimes do not always pass their environment (containerd passes none), so
the default path is what production uses.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DEFAULT_SOCKET = "/run/calyx/cni.sock"
MAGIC = b"CXCNI1\n"  #: protocol version 1, first bytes of both the request and the answer
REFUSED = b"CXCNI?\n"  #: the service's answer to a request it did not run (another version)
CONNECT_TIMEOUT = 2.0


class _NotServedError(Exception):
    """The service did not take the call: run it in this process."""


def _frame(chunks: list[bytes]) -> bytes:
    return b"".join(len(c).to_bytes(4, "big") + c for c in chunks)


def encode_request(plugin: str, environ: dict[bytes, bytes], stdin: bytes) -> bytes:
    env = b"\0".join(k + b"=" + v for k, v in environ.items())
    return MAGIC + _frame([plugin.encode(), env, stdin])


def _read_frames(data: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("truncated")
        n = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if pos + n > len(data):
            raise ValueError("truncated")
        out.append(data[pos:pos + n])
        pos += n
    if pos != len(data):
        raise ValueError("trailing bytes")
    return out


def decode_answer(data: bytes) -> tuple[int, bytes, bytes]:
    """(exit code, stdout, stderr) from the service's answer (ValueError when malformed)."""
    if data.startswith(REFUSED):
        raise _NotServedError()
    if not data.startswith(MAGIC):
        raise ValueError("not a Calyx CNI service answer")
    code, out, err = _read_frames(data[len(MAGIC):], 3)
    return int.from_bytes(code, "big", signed=True), out, err


def _forward(path: str, plugin: str, stdin: bytes) -> tuple[int, bytes, bytes]:
    # _socket is the C module under socket.py; socket.py itself costs ~7 ms to import (it builds
    # its IntEnums at import time), a tenth of what this client is allowed to take
    try:
        import _socket as socket
    except ImportError:  # not CPython
        import socket  # type: ignore[no-redef]

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            raise _NotServedError() from None
        sock.settimeout(None)  # the call may take as long as the plugin would (readiness gate)
        try:
            sock.sendall(encode_request(plugin, dict(os.environb), stdin))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            # the service closed before reading everything: it ran nothing (it reads the request
            # whole before acting), unless it crashed in between, which an answer would tell
            pass
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return decode_answer(b"".join(chunks))


def _try_again(msg: str) -> tuple[int, bytes, bytes]:
    # the spec's error JSON without importing json
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in msg)
    return 1, b'{"cniVersion": "1.0.0", "code": 11, "msg": "' + safe.encode() + b'"}\n', b""


def serve(plugin: str) -> int:
    """Forward this process's call to the service, or run it here; return the exit code."""
    path = os.environ.get("CALYX_CNI_SOCKET", DEFAULT_SOCKET)
    if path and path != "off" and os.path.exists(path):
        try:
            stdin = sys.stdin.buffer.read()
        except OSError:
            stdin = None
        if stdin is not None:
            try:
                code, out, err = _forward(path, plugin, stdin)
            except _NotServedError:
                return _run_here(plugin, stdin)
            except (OSError, ValueError) as exc:
                code, out, err = _try_again(
                    f"the Calyx CNI service at {path} broke off the call ({type(exc).__name__}); "
                    f"it may have been restarted: try again")
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
            if err:
                sys.stderr.buffer.write(err)
                sys.stderr.flush()
            return code
    return _run_here(plugin, None)


def _run_here(plugin: str, stdin: bytes | None) -> int:
    from calyx.cni import spec

    if stdin is None:
        try:
            stdin = sys.stdin.buffer.read()
        except OSError as exc:
            spec.fail(spec.CNIError(spec.IO_FAILURE, f"cannot read stdin: {exc}"), "1.0.0")
    return _plugin_run(plugin)(os.environ, stdin)


def _plugin_run(plugin: str) -> Callable[[Mapping[str, str], bytes], int]:
    """The ``run`` function of the plugin called ``plugin``."""
    if plugin == "calyx-ipam":
        from calyx.cni.ipam_plugin import run
    else:
        from calyx.cni.plugin import run
    return run


def main_calyx() -> None:
    """Entry point of ``calyx``."""
    sys.exit(serve("calyx"))


def main_ipam() -> None:
    """Entry point of ``calyx-ipam``."""
    sys.exit(serve("calyx-ipam"))
