"""Who sent a call: the client identity the stateful detector keys each client's history on.

``client_identity(auth_context, metadata, peer, header=...)`` is a pure function of what the gRPC
layer knows about a call; ``call_identity(context, header=...)`` reads those from a
``grpc.aio.ServicerContext``. In order of preference (DESIGN.md, "Stateful stages see the stream"):

1. ``mtls:<subject>``: the verified client certificate's subject (auth context ``x509_subject``,
   else ``x509_common_name``), present only when the server required or accepted a client
   certificate that chains to its CA -- the strongest identity, one per issued certificate;
2. ``token:<sha256>``: the ``authorization: Bearer <token>`` metadata, hashed (SHA-256 of the
   token, domain-separated, first 32 hex digits): raw tokens are never stored or logged. Bearer
   tokens are high-entropy secrets, so the unkeyed hash reveals nothing and every replica derives
   the same identity (needed for a shared Redis history);
3. ``header:<value>``: a configurable metadata header (default ``x-client-id``), e.g. set by an
   API gateway that authenticated the caller. The client can write it itself, so use it only
   behind a gateway that overwrites it; values are cut to 256 characters;
4. ``peer:<address>``: the peer address without its port (``ipv4:10.0.0.7``, ``ipv6:[::1]``): one
   client behind NAT or a proxy shares it with others; a client that changes ports does not
   escape it.

An identity names a history only; it is not authentication (BearerAuth in proxy/server.py checks
the token before any stage runs). :class:`Trust` is: a call is trusted (server.trusted) only by what
it proves -- a verified certificate's subject or a bearer token -- never by a header or an address.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

DEFAULT_HEADER = "x-client-id"
MAX_HEADER_CHARS = 256


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _peer_address(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``; ``ipv6:[::1]:5678`` (gRPC writes ``ipv6:%5B::1%5D:5678``)
    -> ``ipv6:[::1]``; else unchanged."""
    peer = unquote(peer)
    if peer.startswith("ipv4:") and peer.count(":") == 2:
        return peer.rsplit(":", 1)[0]
    if peer.startswith("ipv6:[") and "]:" in peer:
        return peer.rsplit(":", 1)[0]
    return peer


def hash_token(token: bytes) -> str:
    """The identity of a bearer token: ``sha256(b"robustgate-client-token\\0" + token)``, 32 hex digits."""
    return hashlib.sha256(b"robustgate-client-token\0" + token).hexdigest()[:32]


def client_identity(auth_context: Mapping[str, Iterable[bytes]] | None,
                    metadata: Iterable[tuple[str, str | bytes]] | None,
                    peer: str | None, header: str | None = DEFAULT_HEADER) -> str:
    """The call's client identity (module docstring): ``mtls:...``, ``token:...``, ``header:...`` or
    ``peer:...``; ``peer:unknown`` when nothing identifies the caller."""
    return named_identity(auth_context, metadata, header) or peer_identity(peer)


def peer_identity(peer: str | None) -> str:
    """The last resort of :func:`client_identity`: ``peer:<address>`` (``peer:unknown`` for none)."""
    return f"peer:{_peer_address(peer)}" if peer else "peer:unknown"


def _bearer(value: str | bytes) -> bytes | None:
    """An ``authorization`` metadata value -> its bearer token, or None when it is none."""
    scheme, _, rest = (value if isinstance(value, bytes) else str(value).encode()).partition(b" ")
    return rest.strip() if scheme.lower() == b"bearer" and rest.strip() else None


def _subject(auth: Mapping[str, Iterable[bytes]]) -> str | None:
    """The verified client certificate's subject (else its common name), as ``mtls:`` identities name it."""
    for key in ("x509_subject", "x509_common_name"):
        values = [_text(v) for v in auth.get(key, ()) if v]
        if values:
            return values[0]
    return None


def named_identity(auth_context: Mapping[str, Iterable[bytes]] | None,
                   metadata: Iterable[tuple[str, str | bytes]] | None,
                   header: str | None = DEFAULT_HEADER) -> str | None:
    """:func:`client_identity`'s first three sources (certificate, token, header), or None."""
    subject = _subject(auth_context or {})
    if subject is not None:
        return f"mtls:{subject}"
    token = None
    named = None
    want = header.lower() if header else None
    for key, value in metadata or ():
        key = key.lower()
        if key == "authorization" and token is None:
            token = _bearer(value)
        elif want is not None and key == want and named is None:
            text = _text(value).strip()
            if text:
                named = text[:MAX_HEADER_CHARS]
    if token is not None:
        return f"token:{hash_token(token)}"
    if named is not None:
        return f"header:{named}"
    return None


def call_identity(context, header: str | None = DEFAULT_HEADER) -> str:
    """:func:`client_identity` of a ``grpc.aio.ServicerContext`` (or ``grpc.ServicerContext``); the
    peer is asked for only when nothing else names the caller (one call into gRPC fewer per request)."""
    return named_identity(context.auth_context(), context.invocation_metadata(), header) or peer_identity(context.peer())


@dataclass(frozen=True)
class Trust:
    """Which calls are trusted (``server.trusted``; docs/OPERATIONS.md, "Trusted clients"): a verified
    client certificate whose subject (as its ``mtls:`` identity names it) is in ``subjects``, or a
    bearer token whose :func:`hash_token` is in ``tokens`` (the tokens themselves are not kept)."""

    subjects: frozenset[str] = frozenset()
    tokens: frozenset[str] = frozenset()

    @classmethod
    def of(cls, subjects: Iterable[str] = (), token_files: Iterable[Path] = ()) -> "Trust":
        """From the config's lists; each token file holds one token (surrounding whitespace ignored)."""
        return cls(frozenset(subjects), frozenset(hash_token(Path(p).read_bytes().strip()) for p in token_files))

    @property
    def enabled(self) -> bool:
        return bool(self.subjects or self.tokens)

    def token(self, token: bytes) -> bool:
        """Whether ``token`` is one of the trusted tokens."""
        return hash_token(token) in self.tokens

    def check(self, auth_context: Mapping[str, Iterable[bytes]] | None,
              metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether a call with this auth context and metadata is trusted."""
        if self.subjects:
            subject = _subject(auth_context or {})
            if subject is not None and subject in self.subjects:
                return True
        if self.tokens:
            for key, value in metadata or ():
                if key.lower() == "authorization":
                    token = _bearer(value)
                    return token is not None and self.token(token)
        return False

    def call(self, context) -> bool:
        """:meth:`check` for a ``grpc.aio.ServicerContext``."""
        return self.enabled and self.check(context.auth_context(), context.invocation_metadata())
