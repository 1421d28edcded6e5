import datetime as dt
import ipaddress
import ssl
import stat
import warnings

import pytest
import trio
from cryptography import x509

from firmware.tls import (
    RENEW_BEFORE,
    SERVER_LIFETIME,
    client_context,
    ensure_device_certificates,
    server_context,
)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(path):
    ext = _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), set(
        ext.get_values_for_type(x509.IPAddress)
    )


@pytest.fixture
def paths(tmp_path):
    return ensure_device_certificates(tmp_path, ["matte.local", "192.0.2.10", "::ffff:10.0.0.1"])


def test_files_made_with_private_modes(tmp_path, paths):
    assert paths.directory == tmp_path / "tls"
    assert stat.S_IMODE(paths.directory.stat().st_mode) == 0o700
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (paths.ca_cert, paths.server_cert):
        assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert not [p for p in paths.directory.iterdir() if p.name.endswith(".tmp")]


def test_ca_and_server_certificate_contents(paths):
    ca = _cert(paths.ca_cert)
    server = _cert(paths.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    server.verify_directly_issued_by(ca)
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert SERVER_LIFETIME <= lifetime <= SERVER_LIFETIME + dt.timedelta(hours=2)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3600)
    dns, ips = _sans(paths.server_cert)
    assert dns == {"matte.local", "localhost"}
    assert ips == {
        ipaddress.ip_address(a) for a in ("192.0.2.10", "10.0.0.1", "127.0.0.1", "::1")
    }


def test_certificates_reused(tmp_path, paths):
    before = {p: p.read_bytes() for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)}
    again = ensure_device_certificates(tmp_path, ["MATTE.local.", "192.0.2.10"])
    assert again == paths
    assert {p: p.read_bytes() for p in before} == before


def test_new_name_reissues_server_only(tmp_path, paths):
    ca_before = paths.ca_cert.read_bytes()
    server_before = paths.server_cert.read_bytes()
    ensure_device_certificates(tmp_path, ["matte.local", "gateway.example"])
    assert paths.ca_cert.read_bytes() == ca_before
    assert paths.server_cert.read_bytes() != server_before
    assert "gateway.example" in _sans(paths.server_cert)[0]
    _cert(paths.server_cert).verify_directly_issued_by(_cert(paths.ca_cert))


def test_near_expiry_reissued(tmp_path, paths):
    server = _cert(paths.server_cert)
    just_before = server.not_valid_after_utc - RENEW_BEFORE - dt.timedelta(days=1)
    ensure_device_certificates(tmp_path, ["matte.local"], now=just_before)
    assert _cert(paths.server_cert).serial_number == server.serial_number
    inside = server.not_valid_after_utc - RENEW_BEFORE + dt.timedelta(days=1)
    ensure_device_certificates(tmp_path, ["matte.local"], now=inside)
    renewed = _cert(paths.server_cert)
    assert renewed.serial_number != server.serial_number
    assert renewed.not_valid_after_utc > server.not_valid_after_utc


def test_corrupt_server_key_reissued(tmp_path, paths):
    paths.server_key.write_bytes(b"garbage")
    ensure_device_certificates(tmp_path, ["matte.local"])
    # the pair loads together again
    server_context(paths)
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600


def test_lost_ca_key_makes_new_ca_and_server(tmp_path, paths):
    old_ca = paths.ca_cert.read_bytes()
    paths.ca_key.unlink()
    ensure_device_certificates(tmp_path, ["matte.local"])
    assert paths.ca_cert.read_bytes() != old_ca
    _cert(paths.server_cert).verify_directly_issued_by(_cert(paths.ca_cert))


def test_bad_name_rejected(tmp_path):
    with pytest.raises(ValueError):
        ensure_device_certificates(tmp_path, ["two words"])


def test_contexts_minimum_version(paths):
    assert server_context(paths).minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = client_context(paths.ca_cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    loose = client_context(None, verify=False)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


async def _handshake(server_ctx, client_ctx, server_hostname):
    """A TLS handshake over real loopback TCP; returns (client error, server error)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    errors = {}

    async def server():
        raw = await listeners[0].accept()
        stream = trio.SSLStream(raw, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            await stream.send_all(b"hello")
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            errors["server"] = exc
            await raw.aclose()

    async def client():
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(raw, client_ctx, server_hostname=server_hostname)
        try:
            await stream.do_handshake()
            errors["got"] = await stream.receive_some(10)
            errors["version"] = stream.version()
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            errors["client"] = exc
            await raw.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
    await listeners[0].aclose()
    return errors


@pytest.mark.parametrize("hostname", ["matte.local", "localhost", "127.0.0.1", "192.0.2.10"])
async def test_handshake_verifies_device_ca(paths, hostname):
    result = await _handshake(server_context(paths), client_context(paths.ca_cert), hostname)
    assert "client" not in result and "server" not in result
    assert result["got"] == b"hello"
    assert result["version"] in ("TLSv1.2", "TLSv1.3")


async def test_handshake_wrong_name_fails(paths):
    result = await _handshake(server_context(paths), client_context(paths.ca_cert), "other.example")
    assert isinstance(result["client"].__cause__, ssl.SSLCertVerificationError)
    assert "got" not in result


async def test_handshake_unknown_ca_fails(tmp_path, paths):
    other = ensure_device_certificates(tmp_path / "other", ["matte.local"])
    result = await _handshake(server_context(paths), client_context(other.ca_cert), "matte.local")
    assert isinstance(result["client"].__cause__, ssl.SSLCertVerificationError)
    assert "got" not in result


def _old_client(maximum):
    with warnings.catch_warnings():
        # Asking for TLS 1.1 is deprecated, which is the point of this test.
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = maximum
    return old


async def test_tls_1_1_refused(paths):
    result = await _handshake(server_context(paths), _old_client(ssl.TLSVersion.TLSv1_1), "x")
    assert "got" not in result
    assert "UNSUPPORTED_PROTOCOL" in str(result["server"].__cause__)
    # the same old client allowed TLS 1.2 gets through: the version was the reason
    result = await _handshake(server_context(paths), _old_client(ssl.TLSVersion.TLSv1_2), "x")
    assert result["got"] == b"hello" and result["version"] == "TLSv1.2"


def test_wildcard_listen_addresses_and_unicode_names(tmp_path):
    paths = ensure_device_certificates(tmp_path, ["0.0.0.0", "::", "[::1]", "メール.example"])
    dns, ips = _sans(paths.server_cert)
    assert dns == {"localhost", "xn--4dkua4c.example"}
    assert ipaddress.ip_address("0.0.0.0") not in ips and ipaddress.ip_address("::") not in ips
    assert ipaddress.ip_address("::1") in ips
