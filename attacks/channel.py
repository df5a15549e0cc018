"""How the red team's and the probe's clients reach a proxy: plaintext, TLS, mutual TLS, a bearer token.

A proxy deployed with the secure settings (docs/OPERATIONS.md, "Security": ``server.tls``,
``server.auth``, ``server.trusted``) answers only clients that bring them; ``robustgate probe`` and
``robustgate eval --url`` take them from :func:`add_channel_arguments`' flags. Kept apart from
attacks/endpoint.py so that the flags parse without tritonclient.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Channel:
    """How a client reaches the proxy, as its clients do: plaintext, TLS (``ca``: the certificate of the CA
    that signed the server's, server.tls), mutual TLS (``cert`` and ``key``: the client's own, server.tls.
    client_ca), and a bearer token sent with every call (``token``: server.auth's, or a trusted client's,
    server.trusted). ``robustgate probe`` and ``eval --threat endpoint`` take it from
    :func:`add_channel_arguments`' flags, so they run against a proxy deployed with the secure settings."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr, a log line or a report

    def client_kwargs(self) -> dict:
        """tritonclient.grpc.InferenceServerClient's TLS keyword arguments (none for plaintext)."""
        if self.ca is None and self.cert is None:
            return {}
        return {"ssl": True, "root_certificates": self.ca, "private_key": self.key, "certificate_chain": self.cert}

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def describe(self) -> dict[str, bool]:
        """What a report may say of the channel: which of TLS, a client certificate and a token were used
        (never the token)."""
        return {"tls": self.ca is not None, "client_certificate": self.cert is not None,
                "bearer_token": self.token is not None}


def add_channel_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("connection (a proxy with server.tls, server.auth or server.trusted)")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="TLS: the CA certificate the server's is signed by")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="mutual TLS: this client's certificate")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="mutual TLS: this client's private key")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="a bearer token sent with every call (authorization: Bearer <the file's text>)")


def channel_from_args(args: argparse.Namespace) -> Channel:
    """The :class:`Channel` the flags of :func:`add_channel_arguments` describe; ValueError naming the flag
    that is missing, unreadable or alone."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    if args.tls_cert is not None and args.tls_ca is None:
        raise ValueError("--tls-cert/--tls-key need --tls-ca (mutual TLS runs over TLS)")
    for flag in ("tls_ca", "tls_cert", "tls_key", "token_file"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{flag.replace('_', '-')}: file {path} does not exist")
    token = None
    if args.token_file is not None:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"--token-file: file {args.token_file} is empty")
    return Channel(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, token=token)
