"""The CNI plugins' etcd client (etcd's JSON gateway over plain sockets) against real etcd members:
TLS with client certificates, user/password authentication, failover, large (chunked) replies."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from calyx.cni.netconf import Cluster
from calyx.datastore import keys
from calyx.ipam.etcdhttp import HttpStore
from calyx.ipam.store import Delete, GatewayUnavailable, Put, Range, StoreError, StoreUnavailable
from tests.fixtures.etcd import EtcdMember, TlsFiles, free_ports, new_member

pytestmark = pytest.mark.etcd


def _tls_files(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 usable for serverAuth *and* clientAuth (etcd's JSON
    gateway presents it to etcd's own gRPC service), and a client certificate."""
    directory.mkdir(parents=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=cx-ca")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(ext)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=cx-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    d = str(directory)
    return TlsFiles(ca=f"{d}/ca.crt", cert=f"{d}/client.crt", key=f"{d}/client.key",
                    server_cert=f"{d}/server.crt", server_key=f"{d}/server.key")


def test_tls_client_certificate(tmp_path: Path) -> None:
    tls = _tls_files(tmp_path / "pki")
    member = new_member(tmp_path / "etcd", tls=tls)
    try:
        store = HttpStore([member.endpoint], ca=tls.ca, cert=tls.cert, key=tls.key)
        try:
            assert store.commit([Put("/t/a", b"1", 0)])
            assert not store.commit([Put("/t/a", b"2", 0)])  # must not exist: refused
            kv = store.get("/t/a")
            assert kv is not None and kv.value == b"1"
            assert store.commit([Put("/t/a", b"2", kv.mod_revision), Put("/t/b", b"3", 0)])
            assert [k.key for k in store.get_prefix("/t/")[0]] == ["/t/a", "/t/b"]
        finally:
            store.close()
        with pytest.raises(StoreUnavailable):
            HttpStore([member.endpoint], ca=tls.ca).get("/t/a")  # no client certificate
    finally:
        member.destroy()


def test_gateway_refused_falls_back_to_grpc(etcd_tls: EtcdMember) -> None:
    """The shared TLS fixture's server certificate allows serverAuth only: etcd's gateway cannot talk
    to etcd itself. The HTTP client says so; the plugins' store falls back to gRPC."""
    tls = etcd_tls.tls
    assert tls is not None
    with pytest.raises(GatewayUnavailable, match="clientAuth"):
        HttpStore([etcd_tls.endpoint], ca=tls.ca, cert=tls.cert, key=tls.key).get("/t/a")
    cluster = Cluster(node_name="n", etcd_endpoints=(etcd_tls.endpoint,), etcd_ca=tls.ca, etcd_cert=tls.cert,
                      etcd_key=tls.key)
    store = cluster.store()
    try:
        assert store.commit([Put("/t/x", b"1", 0)])
        kv = store.get("/t/x")
        assert kv is not None and kv.value == b"1"
        assert [len(r) for r in store.read([Range("/t/", True)])] == [1]
    finally:
        store.close()


def test_password_authentication(etcd_fresh: EtcdMember) -> None:
    etcd_fresh.etcdctl("user", "add", "root:rootpw")
    etcd_fresh.etcdctl("user", "add", "calyx:secret")
    etcd_fresh.etcdctl("role", "add", "cni")
    etcd_fresh.etcdctl("role", "grant-permission", "--prefix=true", "cni", "readwrite", keys.PREFIX)
    etcd_fresh.etcdctl("user", "grant-role", "calyx", "cni")
    etcd_fresh.etcdctl("auth", "enable")
    store = HttpStore([etcd_fresh.endpoint], username="calyx", password="secret")
    try:
        assert store.commit([Put(keys.ippool_key("x"), b"{}", 0)])
        assert store.get(keys.ippool_key("x")) is not None
        store._token = "stale-token"  # an expired token is renewed once
        assert store.get(keys.ippool_key("x")) is not None
    finally:
        store.close()
    anonymous = HttpStore([etcd_fresh.endpoint])
    with pytest.raises(StoreError, match=r"user name is empty|permission denied|token"):
        anonymous.get(keys.ippool_key("x"))


def test_failover_and_large_replies(etcd: EtcdMember, etcd_prefix: str) -> None:
    [dead_port] = free_ports(1)
    store = HttpStore([f"http://127.0.0.1:{dead_port}", etcd.endpoint])
    try:
        value = b"x" * 5000  # replies well over Go's 2 KB chunking threshold
        for i in range(40):
            assert store.commit([Put(f"{etcd_prefix}k{i:02d}", value, 0)])
        kvs, rev = store.get_prefix(etcd_prefix)
        assert len(kvs) == 40 and all(kv.value == value for kv in kvs) and rev > 0
        reads = store.read([Range(etcd_prefix, True), Range(f"{etcd_prefix}k07"), Range(f"{etcd_prefix}none")])
        assert [len(r) for r in reads] == [40, 1, 0]
        assert store.commit([Delete(f"{etcd_prefix}k00", kvs[0].mod_revision), Delete(f"{etcd_prefix}k01")])
        assert store.get(f"{etcd_prefix}k00") is None
    finally:
        store.close()
    with pytest.raises(StoreUnavailable, match="no etcd member reachable"):
        HttpStore([f"127.0.0.1:{dead_port}"]).get("/x")
