"""The device's own CA and server certificate, and the SSL contexts (S3).

Clients import the device CA once; the server certificate can then be
re-issued (new names, near expiry) from the same CA without touching them.
Everything lives in ``data_dir/"tls"``: ca.pem, ca.key, server.pem, server.key.

These functions do blocking file I/O; call them from a worker thread in async
code (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DevicePaths",
    "ensure_device_certificates",
    "server_context",
    "client_context",
    "CA_LIFETIME",
    "SERVER_LIFETIME",
    "RENEW_BEFORE",
    "DEFAULT_NAMES",
]

CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=730)
RENEW_BEFORE = dt.timedelta(days=30)
# Backdate notBefore a little: a device without RTC may boot with a clock
# slightly behind the clients'.
_BACKDATE = dt.timedelta(hours=1)
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevicePaths:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def under(cls, data_dir: Path) -> DevicePaths:
        d = Path(data_dir) / "tls"
        return cls(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key")


_Name = x509.DNSName | x509.IPAddress


def _san_entry(name: str) -> _Name | None:
    """The SAN for a host name or IP literal; None for a wildcard listen address."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        host = text.lower().rstrip(".")
        if not host or any(c.isspace() or c in "/@:" for c in host):
            raise ValueError(f"not a host name: {name!r}") from None
        try:
            host = host.encode("idna").decode("ascii")  # SANs hold A-labels
        except UnicodeError:
            raise ValueError(f"not a host name: {name!r}") from None
        return x509.DNSName(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return None  # "0.0.0.0" / "::" listen on every address; no client connects to them
    return x509.IPAddress(addr)


def _wanted_names(names: Iterable[str]) -> list[_Name]:
    wanted: list[_Name] = []
    for name in (*names, *DEFAULT_NAMES):
        entry = _san_entry(name)
        if entry is not None and entry not in wanted:
            wanted.append(entry)
    return wanted


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically, created with `mode` from the start."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # in case the umask narrowed or widened it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _make_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix keeps two devices' CAs apart in a client's trust store.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Matte"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Matte device CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    names: list[_Name],
    now: dt.datetime,
) -> x509.Certificate:
    first = names[0]
    cn = str(first.value)
    not_after = min(now + SERVER_LIFETIME, ca.not_valid_after_utc)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Matte"),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
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
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _server_still_good(
    cert: x509.Certificate | None,
    key: ec.EllipticCurvePrivateKey | None,
    ca: x509.Certificate,
    names: list[_Name],
    now: dt.datetime,
) -> bool:
    if cert is None or key is None or not _same_key(cert, key):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE <= now or cert.not_valid_before_utc > now:
        return False
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(name in sans for name in names)


def ensure_device_certificates(
    data_dir: Path, names: Iterable[str], *, now: dt.datetime | None = None
) -> DevicePaths:
    """Make (first start) or reuse the device CA and server certificate.

    The CA is made once and kept (clients trust it); it is only replaced when
    unreadable or expired. The server certificate is re-issued when its SANs
    do not cover `names` (+ localhost, 127.0.0.1, ::1), when it expires within
    RENEW_BEFORE, or when it no longer matches its key or the CA.
    `now` exists for tests.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    wanted = _wanted_names(names)
    paths = DevicePaths.under(Path(data_dir))
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.directory, 0o700)

    ca = _load_cert(paths.ca_cert)
    ca_key = _load_key(paths.ca_key)
    if (
        ca is None
        or ca_key is None
        or not _same_key(ca, ca_key)
        or ca.not_valid_after_utc <= now + RENEW_BEFORE
    ):
        ca, ca_key = _make_ca(now)
        _write_private(paths.ca_key, _key_pem(ca_key), 0o600)
        _write_private(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        os.chmod(paths.ca_key, 0o600)

    cert = _load_cert(paths.server_cert)
    key = _load_key(paths.server_key)
    if not _server_still_good(cert, key, ca, wanted, now):
        # A fresh key with each issue: cheap, and an old key never outlives its cert.
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_server(ca, ca_key, key, wanted, now)
        _write_private(paths.server_key, _key_pem(key), 0o600)
        _write_private(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        os.chmod(paths.server_key, 0o600)
    return paths


def server_context(paths: DevicePaths) -> ssl.SSLContext:
    """The context for the SMTPS / STARTTLS / HTTPS listeners: TLS 1.2 or later."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    return ctx


def client_context(ca_file: Path | None = None, verify: bool = True) -> ssl.SSLContext:
    """The context for talking to the upstream server: TLS 1.2 or later.

    `ca_file` None trusts the system's CAs. `verify=False` skips certificate
    and host name checks (an upstream with a self-signed certificate on a
    trusted link); the connection is still encrypted.
    """
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
