"""A small etcd v3 client over etcd's JSON gateway (``POST /v3/kv/...``), standard library only.

Why it exists: the CNI plugins are short-lived processes started for every container, and importing
the gRPC client stack (grpc + pyetcd + protobuf) costs about 100 ms, more than the whole latency
budget of a CNI ADD. etcd serves the same v3 API as JSON on its client port (keys and values base64,
64-bit integers as strings), which needs nothing but ``http.client``. It implements only
:class:`calyx.ipam.store.Store` (get, prefix read, conditional transaction); everything long-lived
keeps using :class:`calyx.datastore.client.Datastore`.

Behaviour:

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
import http.client
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from calyx.ipam.store import Delete, Op, Put, StoreError, StoreKV, StoreUnavailable

__all__ = ["HttpStore"]

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    buf = bytearray(prefix)
    for i in range(len(buf) - 1, -1, -1):
        if buf[i] < 0xFF:
            buf[i] += 1
            return bytes(buf[: i + 1])
    return b"\0"


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
            url = urlsplit(ep if "://" in ep else f"//{ep}")
            if url.hostname is None or url.port is None:
                raise ValueError(f"etcd endpoint {ep!r} is not host:port or http(s)://host:port")
            secure = url.scheme == "https" or (url.scheme == "" and tls_files)
            self._targets.append((secure, url.hostname, url.port))
        self._ca, self._cert, self._key = ca, cert, key
        self._username, self._password = username, password
        self._timeout = timeout
        self._token: str | None = None
        self._conn: http.client.HTTPConnection | None = None
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

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is not None:
            return self._conn
        errors = []
        n = len(self._targets)
        for i in range(n):
            idx = (self._current + i) % n
            secure, host, port = self._targets[idx]
            conn: http.client.HTTPConnection
            if secure:
                conn = http.client.HTTPSConnection(host, port, timeout=self._timeout, context=self._context())
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            try:
                conn.connect()
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc}")
                conn.close()
                continue
            self._current = idx
            self._conn = conn
            return conn
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
                conn.request("POST", path, json.dumps(body), headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 1 and isinstance(exc, _STALE):
                    # A kept-alive connection the server had closed. Sending again is safe: reads are
                    # idempotent and a conditional commit that did apply fails its condition the second time.
                    continue
                raise StoreUnavailable(f"etcd request {path} failed: {exc}") from exc
            try:
                reply = json.loads(data) if data else {}
            except ValueError:
                raise StoreError(f"etcd {path}: reply is not JSON (HTTP {resp.status}): {data[:200]!r}") from None
            if resp.status == 200:
                return reply if isinstance(reply, dict) else {}
            message = str(reply.get("message") or reply.get("error") or data[:200]) if isinstance(reply, dict) else ""
            if auth and attempt == 1 and self._username is not None and "token" in message:
                self._authenticate()
                continue
            if resp.status in (502, 503, 504):
                raise StoreUnavailable(f"etcd {path}: {message}")
            raise StoreError(f"etcd {path} (HTTP {resp.status}): {message}")
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
