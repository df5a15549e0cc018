"""Certificates for the TLS tests, made with the openssl CLI (the `cryptography` package is not installed):
:func:`make_pki` writes a CA, a server certificate for localhost/127.0.0.1, a client certificate from the
same CA (subject ``CN=client``), one more (``CN=other``) and one from a rogue CA (``CN=intruder``), each
as ``<name>.pem`` / ``<name>.key``. The session fixture ``pki`` (tests/conftest.py) holds one set."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def make_leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


def make_pki(d: Path) -> Path:
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    make_leaf(d, "client", "ca", "DNS:client")
    make_leaf(d, "other", "ca", "DNS:other")
    make_leaf(d, "intruder", "rogue", "DNS:intruder")
    return d
