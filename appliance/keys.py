"""``armdi keys init``: the cluster key and a small certificate authority for the links.

One directory holds everything a cluster needs (``armdi keys init --out DIR``)::

    DIR/cluster.key        the HMAC key of frames and control messages, hex      (0600)
    DIR/ca.crt             the cluster's CA certificate: every node trusts it    (0644)
    DIR/ca.key             the CA's private key: keep it off the nodes           (0600)
    DIR/nodes/NAME.pem     NAME's private key and certificate, one PEM file      (0600)
    DIR/nodes/NAME.crt     NAME's certificate alone                              (0644)
    DIR/cluster-security.toml  the lines to put in cluster.toml

Each node certificate is signed by the CA, names the node (``CN=NAME``) and lists as subject
alternative names ``armdi-node`` (the name every TLS client of armdi checks: a certificate of
this CA is what makes a cluster member, whatever its address), the node's name, ``localhost``,
``127.0.0.1`` and the hosts of its addresses in the config (for other TLS clients). NNG reads
a node's key and certificate from one file, hence ``NAME.pem``.

Private keys are created with mode 0600 from the start (never written readable, then
narrowed). Nothing here runs on the data path; ``cryptography`` is imported lazily.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import ArmdiError

KEY_BYTES = 32
# Every node certificate names this host too, and every TLS client checks for it: the peer
# proves membership of the cluster (a certificate of its CA), whatever address it has.
SERVER_NAME = "armdi-node"
CERT_DAYS = 3650
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class KeysError(ArmdiError):
    """Keys could not be made or read (a file exists, a bad name, a bad certificate)."""


@dataclass(frozen=True)
class ClusterKeys:
    """What ``init_keys`` wrote."""

    out: Path
    key_file: Path
    ca_cert: Path
    ca_key: Path
    node_pems: dict[str, Path]

    def toml_snippet(self) -> str:
        """The lines of cluster.toml that use these files."""
        lines = ["# written by armdi keys init", "[cluster]",
                 f'key_file = "{self.key_file}"', f'tls_ca = "{self.ca_cert}"', ""]
        for name, pem in self.node_pems.items():
            lines.append(f'# [source] or the [[workers]] entry named "{name}":')
            lines.append(f'tls_cert = "{pem}"')
        return "\n".join(lines) + "\n"


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data`` (refuses to overwrite)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeysError(f"{path} exists; remove it first, or use another --out") from None
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.chmod(path, 0o600)  # whatever the umask


def _write_public(path: Path, data: bytes) -> None:
    if path.exists():
        raise KeysError(f"{path} exists; remove it first, or use another --out")
    path.write_bytes(data)
    os.chmod(path, 0o644)


def new_cluster_key() -> str:
    """A fresh HMAC key, hex."""
    return secrets.token_hex(KEY_BYTES)


def _subject_alt_names(name: str, hosts: Iterable[str]) -> list[Any]:
    from cryptography import x509

    seen: dict[str, Any] = {}
    for host in (SERVER_NAME, name, "localhost", "127.0.0.1", *hosts):
        if not host or host in seen:
            continue
        try:
            seen[host] = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            seen[host] = x509.DNSName(host)
    return list(seen.values())


def host_of(address: str) -> str | None:
    """The host of a ``tcp://`` or ``tls+tcp://`` address (None for ipc/inproc)."""
    scheme, _, rest = address.partition("://")
    if scheme not in ("tcp", "tls+tcp") or not rest:
        return None
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]") or None


def init_keys(out: Path, nodes: Sequence[str],
              hosts: Mapping[str, Sequence[str]] | None = None,
              days: int = CERT_DAYS) -> ClusterKeys:
    """Write a cluster key, a CA and one certificate per node into ``out`` (see the module
    docstring). ``hosts``: extra host names or IPs per node for its certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not nodes:
        raise KeysError("name at least one node (--nodes source,w1,w2 or --config)")
    for name in nodes:
        if not _NAME.match(name) or len(name) > 64:
            raise KeysError(f"node name {name!r}: use letters, digits, _ . - (at most 64)")
    if len(set(nodes)) != len(nodes):
        raise KeysError(f"a node is named twice: {list(nodes)}")
    out = out.expanduser().absolute()
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    hosts = hosts or {}
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()

    key_file = out / "cluster.key"
    write_private(key_file, (new_cluster_key() + "\n").encode())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "armdi cluster CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "armdi")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    write_private(ca_key_path, ca_key.private_bytes(pem, private, plain))
    _write_public(ca_cert_path, ca_cert.public_bytes(pem))

    pems: dict[str, Path] = {}
    for name in nodes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "armdi")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                _subject_alt_names(name, hosts.get(name, ()))), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(pem)
        pems[name] = out / "nodes" / f"{name}.pem"
        write_private(pems[name], key.private_bytes(pem, private, plain) + cert_pem)
        _write_public(out / "nodes" / f"{name}.crt", cert_pem)
    keys = ClusterKeys(out, key_file, ca_cert_path, ca_key_path, pems)
    snippet = out / "cluster-security.toml"
    snippet.unlink(missing_ok=True)
    snippet.write_text(keys.toml_snippet())
    return keys


def check_private_file(path: Path) -> str | None:
    """A warning when a private key file can be read by others than its owner, else None."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return (f"{path} has mode {mode:04o}: other users can read this secret; "
                f"chmod 600 {path}")
    return None
