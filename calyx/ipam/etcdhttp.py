"""A small etcd v3 client over etcd's JSON gateway (``POST /v3/kv/...``), standard library only.

Why it exists: the CNI plugins are short-lived processes started for every container, and importing
the gRPC client stack (grpc + pyetcd + protobuf) costs about 100 ms, more than the whole latency
budget of a CNI ADD. etcd serves the same v3 API as JSON on its client port (keys and values base64,
64-bit integers as strings), which needs only a socket and a little HTTP/1.1 (:class:`_Connection`;
not even ``http.client``, whose import costs ~15 ms). It implements only
:class:`calyx.ipam.store.Store` (get, prefix read, conditional transaction); everything long-lived
keeps using :class:`calyx.datastore.client.Datastore`.

Behaviour:

- endpoints are ``http://host:port``, ``https://host:port``, ``host:port`` or ``unix:///path`` (etcd
  listening on a unix socket: reachable from every network namespace, which the tests use);
- endpoints are tried in order; one that refuses the connection is skipped and the next one tried
  (for reads and writes alike: a request that never connected was never applied). An error after
  the request was sent is :class:`StoreUnavailable` (the caller re-reads: a conditional commit either
  applied or did not, and the retry sees which).
- TLS: ``https://`` endpoints, or any endpoint when a CA or client certificate is given.
- authentication: ``username``/``password`` get a token from ``/v3/auth/authenticate``, sent in the
  ``Authorization`` header, renewed once when etcd reports it invalid.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from calyx.ipam.store import Delete, GatewayUnavailable, Op, Put, Range, StoreError, StoreKV, StoreUnavailable

__all__ = ["HttpStore"]



def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    buf = bytearray(prefix)
    for i in range(len(buf) - 1, -1, -1):
        if buf[i] < 0xFF:
            buf[i] += 1
            return bytes(buf[: i + 1])
    return b"\0"


class _Connection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the status and the body.

    Enough HTTP for etcd's gateway: Content-Length and chunked bodies, keep-alive.
    """

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock
        self.host = host
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _DisconnectedError("etcd closed the connection")
        self._buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, bool]:
        """(status, body, keep the connection)."""
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock.sendall(head.encode() + b"\r\n" + body)
        status_line = self._line()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise _DisconnectedError(f"not an HTTP reply: {status_line[:80]!r}")
        status = int(parts[1])
        length = -1
        chunked = False
        keep = parts[0] == b"HTTP/1.1"
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection":
                keep = value.lower() == b"keep-alive" or (keep and value.lower() != b"close")
        if chunked:
            chunks = []
            while True:
                size = int(self._line().split(b";", 1)[0], 16)
                if size == 0:
                    while self._line():
                        pass  # trailers
                    break
                chunks.append(self._exactly(size))
                self._exactly(2)
            data = b"".join(chunks)
        elif length >= 0:
            data = self._exactly(length)
        else:
            while True:  # body until the server closes
                try:
                    self._fill()
                except _DisconnectedError:
                    break
            data, self._buf, keep = self._buf, b"", False
        return status, data, keep


class _DisconnectedError(OSError):
    """The server closed the connection (or spoke something that is not HTTP)."""


_STALE = (ConnectionResetError, BrokenPipeError, _DisconnectedError)


class HttpStore:
    """:class:`~calyx.ipam.store.Store` over etcd's JSON gateway."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        tls_files = ca is not None or cert is not None
        self._targets: list[tuple[bool, str, int]] = []
        for ep in endpoints:
            if ep.startswith("unix://"):
                if not ep[len("unix://"):].startswith("/"):
                    raise ValueError(f"etcd endpoint {ep!r}: a unix socket needs an absolute path (unix:///path)")
                self._targets.append((False, ep[len("unix://"):], -1))
                continue
            url = urlsplit(ep if "://" in ep else f"//{ep}")
            if url.hostname is None or url.port is None:
                raise ValueError(f"etcd endpoint {ep!r} is not host:port or http(s)://host:port")
            secure = url.scheme == "https" or (url.scheme == "" and tls_files)
            self._targets.append((secure, url.hostname, url.port))
        self._ca, self._cert, self._key = ca, cert, key
        self._username, self._password = username, password
        self._timeout = timeout
        self._token: str | None = None
        self._conn: _Connection | None = None
        self._current = 0
        self._ssl: Any = None

    # --- plumbing ---

    def _context(self) -> Any:
        if self._ssl is None:
            import ssl

            ctx = ssl.create_default_context(cafile=self._ca)
            if self._cert is not None:
                ctx.load_cert_chain(self._cert, self._key)
            self._ssl = ctx
        return self._ssl

    def _connect(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        errors = []
        n = len(self._targets)
        for i in range(n):
            idx = (self._current + i) % n
            secure, host, port = self._targets[idx]
            try:
                if port < 0:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self._timeout)
                    try:
                        sock.connect(host)
                    except OSError:
                        sock.close()
                        raise
                else:
                    sock = socket.create_connection((host, port), timeout=self._timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if secure:
                        sock = self._context().wrap_socket(sock, server_hostname=host)
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc}" if port >= 0 else f"unix://{host}: {exc}")
                continue
            self._current = idx
            self._conn = _Connection(sock, "localhost" if port < 0 else f"{host}:{port}")
            return self._conn
        raise StoreUnavailable(f"no etcd member reachable ({'; '.join(errors)})")

    def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        if auth and self._username is not None and self._token is None:
            self._authenticate()
        for attempt in (1, 2):
            conn = self._connect()
            headers = {"Content-Type": "application/json"}
            if auth and self._token is not None:
                headers["Authorization"] = self._token
            try:
                status, data, keep = conn.post(path, json.dumps(body).encode(), headers)
            except (OSError, ValueError) as exc:
                self.close()
                if attempt == 1 and isinstance(exc, _STALE):
                    # A kept-alive connection the server had closed. Sending again is safe: reads are
                    # idempotent and a conditional commit that did apply fails its condition the second time.
                    continue
                raise StoreUnavailable(f"etcd request {path} failed: {exc}") from exc
            if not keep:
                self.close()
            try:
                reply = json.loads(data) if data else {}
            except ValueError:
                raise StoreError(f"etcd {path}: reply is not JSON (HTTP {status}): {data[:200]!r}") from None
            if status == 200:
                return reply if isinstance(reply, dict) else {}
            message = str(reply.get("message") or reply.get("error") or data[:200]) if isinstance(reply, dict) else ""
            if auth and attempt == 1 and self._username is not None and "token" in message:
                self._authenticate()
                continue
            if status == 503:
                # The gateway answered but could not reach etcd's own gRPC service: with client-cert-auth,
                # a server certificate without clientAuth gives "connection closed" (or, under load, a dial
                # timeout). Either way the gRPC client may still work, so the plugins fall back to it; if
                # etcd itself is down, that client says so.
                raise GatewayUnavailable(
                    f"etcd's JSON gateway cannot reach etcd's gRPC service ({message}); with client-cert-auth "
                    f"the server certificate must also allow clientAuth"
                )
            if status in (502, 504):
                raise StoreUnavailable(f"etcd {path}: {message}")
            raise StoreError(f"etcd {path} (HTTP {status}): {message}")
        raise AssertionError("unreachable")

    def _authenticate(self) -> None:
        reply = self._post("/v3/auth/authenticate", {"name": self._username, "password": self._password}, auth=False)
        token = reply.get("token")
        if not isinstance(token, str):
            raise StoreError("etcd authentication returned no token")
        self._token = token

    @staticmethod
    def _kv(raw: dict[str, Any]) -> StoreKV:
        return StoreKV(
            key=base64.b64decode(raw["key"]).decode(),
            value=base64.b64decode(raw.get("value", "")),
            mod_revision=int(raw.get("mod_revision", 0)),
        )

    # --- Store ---

    def get(self, key: str) -> StoreKV | None:
        reply = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[StoreKV], int]:
        raw = prefix.encode()
        reply = self._post("/v3/kv/range", {"key": _b64(raw), "range_end": _b64(_prefix_end(raw))})
        rev = int(reply.get("header", {}).get("revision", 0))
        return [self._kv(kv) for kv in reply.get("kvs") or []], rev

    def read(self, ranges: Sequence[Range]) -> list[list[StoreKV]]:
        """Every range in one read-only transaction: one round trip, one revision."""
        ops = []
        for r in ranges:
            raw = r.key.encode()
            req: dict[str, Any] = {"key": _b64(raw)}
            if r.prefix:
                req["range_end"] = _b64(_prefix_end(raw))
            ops.append({"request_range": req})
        reply = self._post("/v3/kv/txn", {"success": ops})
        out = []
        for resp in reply.get("responses") or []:
            out.append([self._kv(kv) for kv in (resp.get("response_range") or {}).get("kvs") or []])
        if len(out) != len(ranges):
            raise StoreError(f"etcd answered {len(out)} of {len(ranges)} reads")
        return out

    def commit(self, ops: Sequence[Op]) -> bool:
        if not ops:
            return True
        compare = []
        success: list[dict[str, Any]] = []
        for op in ops:
            k = _b64(op.key)
            if op.expect_mod_revision is not None:
                compare.append(
                    {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(op.expect_mod_revision)}
                )
            if isinstance(op, Put):
                success.append({"request_put": {"key": k, "value": _b64(op.value)}})
            elif isinstance(op, Delete):
                success.append({"request_delete_range": {"key": k}})
        reply = self._post("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(reply.get("succeeded", False))

    def put(self, key: str, value: bytes) -> None:
        """Unconditional write (used by tests and tools)."""
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
