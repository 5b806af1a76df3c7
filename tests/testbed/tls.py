"""A throw-away certificate authority so tests verify TLS exactly as production does.

Our servers (Dovecot, aiosmtpd) present a certificate for 127.0.0.1/localhost
signed by a test CA. The `test_ca` fixture points ``SSL_CERT_FILE`` at a bundle
of the system CAs plus that test CA, so ``ssl.create_default_context()`` in the
code under test verifies our servers with no test-only switches.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SERVER_HOSTNAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class TestCA:
    """Paths of the generated PEM files."""

    __test__ = False  # not a pytest test class despite the name

    ca_cert_path: Path
    cert_path: Path
    key_path: Path
    bundle_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mailroom test bed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def write_test_ca(directory: Path) -> TestCA:
    """Create a CA, a server certificate for 127.0.0.1/localhost and a CA bundle.

    EC keys keep generation at a few milliseconds. The extensions (AKI/SKI, key
    usage, EKU) are the ones strict verifiers (OpenSSL 3 with X509_STRICT) expect.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(days=1)  # tolerate small clock skew
    not_after = now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Mailroom Test CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(name) for name in SERVER_HOSTNAMES] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    paths = TestCA(
        ca_cert_path=directory / "ca.pem",
        cert_path=directory / "server.pem",
        key_path=directory / "server.key",
        bundle_path=directory / "bundle.pem",
    )
    paths.ca_cert_path.write_bytes(ca_pem)
    paths.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Owner-only: Dovecot's master (root) and aiosmtpd (this process) read it.
    fd = os.open(paths.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.is_file() else b""
    if system and not system.endswith(b"\n"):
        system += b"\n"
    paths.bundle_path.write_bytes(system + ca_pem)
    return paths


@pytest.fixture(scope="session")
def test_ca() -> Iterator[TestCA]:
    """Session CA; sets ``SSL_CERT_FILE`` to the bundle and restores it afterwards.

    OpenSSL reads ``SSL_CERT_FILE`` each time a default context loads its verify
    paths, so every ``ssl.create_default_context()`` made during the session
    trusts our servers.
    """
    directory = Path(tempfile.mkdtemp(prefix="mailroom-tls-"))
    previous = os.environ.get("SSL_CERT_FILE")
    try:
        paths = write_test_ca(directory)
        os.environ["SSL_CERT_FILE"] = str(paths.bundle_path)
        yield paths
    finally:
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous
        shutil.rmtree(directory, ignore_errors=True)
