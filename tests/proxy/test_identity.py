"""proxy/identity.py: the client identity of real gRPC calls on loopback (plaintext, TLS, mutual TLS)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from robustgate.proxy.identity import call_identity, client_identity, hash_token

METHOD = "/test.Identity/Who"


def _serve_and_call(calls, server_creds=None, channel_creds=None, header="x-client-id"):
    """Starts a grpc.aio server on a free loopback port whose one method answers ``call_identity``,
    makes ``calls`` (a list of metadata tuples) through one channel, returns the identities."""
    async def who(request: bytes, context) -> bytes:
        return call_identity(context, header).encode()

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Identity", {"Who": grpc.unary_unary_rpc_method_handler(who)})])
        address = "localhost:0" if server_creds else "127.0.0.1:0"
        port = server.add_secure_port(address, server_creds) if server_creds else server.add_insecure_port(address)
        await server.start()
        try:
            target = f"localhost:{port}" if server_creds else f"127.0.0.1:{port}"
            async with (grpc.aio.secure_channel(target, channel_creds) if channel_creds
                        else grpc.aio.insecure_channel(target)) as channel:
                stub = channel.unary_unary(METHOD)
                return [(await stub(b"", metadata=md, timeout=10)).decode() for md in calls]
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_plaintext_token_then_header_then_peer():
    got = _serve_and_call([(), (("x-client-id", "alice"),), (("authorization", "Bearer s3cret"), ("x-client-id", "alice")),
                           (("authorization", "Basic abc"),)])
    assert got[0] == "peer:ipv4:127.0.0.1"  # no port: a new connection is the same client
    assert got[1] == "header:alice"
    assert got[2] == f"token:{hash_token(b's3cret')}" and "s3cret" not in got[2]
    assert got[3] == "peer:ipv4:127.0.0.1"  # not a bearer token


def test_configured_header_name():
    assert _serve_and_call([(("x-api-key-id", "k1"),)], header="x-api-key-id") == ["header:k1"]
    assert _serve_and_call([(("x-api-key-id", "k1"),)], header=None) == ["peer:ipv4:127.0.0.1"]


def test_mutual_tls_subject_comes_first(pki):
    server = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
                                         root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
    client = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "client.key").read_bytes(),
                                          (pki / "client.pem").read_bytes())
    got = _serve_and_call([(), (("authorization", "Bearer t"), ("x-client-id", "bob"))], server, client)
    assert got == ["mtls:CN=client", "mtls:CN=client"]


def test_tls_without_client_certificate_falls_back_to_the_token(pki):
    server = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())])
    client = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    got = _serve_and_call([(("authorization", "Bearer t"),), ()], server, client)
    assert got[0] == f"token:{hash_token(b't')}"
    assert got[1] in ("peer:ipv4:127.0.0.1", "peer:ipv6:[::1]")  # localhost resolves to either


@pytest.mark.parametrize("peer, want", [("ipv6:[::1]:5000", "peer:ipv6:[::1]"), ("ipv6:%5B::1%5D:41800", "peer:ipv6:[::1]"), ("unix:/tmp/s", "peer:unix:/tmp/s"),
                                        (None, "peer:unknown")])
def test_peer_forms(peer, want):
    assert client_identity(None, None, peer) == want


def test_pure_function_order_and_limits():
    auth = {"x509_common_name": [b"c1"]}
    assert client_identity(auth, [("authorization", "Bearer x")], "ipv4:1.2.3.4:5") == "mtls:c1"
    long = "a" * 1000
    assert client_identity({}, [("x-client-id", long)], None) == "header:" + "a" * 256
    assert client_identity({}, [("x-client-id", "  ")], "ipv4:1.2.3.4:5") == "peer:ipv4:1.2.3.4"
