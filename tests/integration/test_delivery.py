"""AUTH passthrough and upstream TLS against a real peer (S4, B9): aiosmtpd as the upstream,
requiring STARTTLS and AUTH, with a certificate from a test CA made here."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import smtplib
import ssl
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from firmware import app
from tests.integration.conftest import (
    UpstreamRecorder,
    in_thread,
    make_message,
    send_mail,
    start_upstream,
    wait_for,
)

USER, PASSWORD = "alice@lan.example", "Tr0ub4dor&3-matte"


def make_ca(directory: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA (written to directory/NAME-ca.pem) and a server context for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file = directory / f"{name}-ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = directory / f"{name}-server.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    return ca_file, context


class Authenticator:
    """aiosmtpd's authenticator: one good account; remembers every attempt."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, bytes, bytes, bool]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
        self.attempts.append((mechanism, auth_data.login, auth_data.password, ok))
        return AuthResult(success=ok, handled=False)


class AuthRecorder(UpstreamRecorder):
    async def handle_DATA(self, server, session, envelope):
        assert session.authenticated  # auth_required: never reached otherwise
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def tls_upstream(tmp_path):
    ca_file, context = make_ca(tmp_path, "upstream")
    recorder, authenticator = AuthRecorder(), Authenticator()
    controller = start_upstream(recorder, tls_context=context, require_starttls=True,
                                auth_require_tls=True, auth_required=True,
                                authenticator=authenticator)
    recorder.ca_file, recorder.auth = ca_file, authenticator
    yield recorder
    controller.stop()


def upstream_settings(upstream, ca_file) -> str:
    return (f'[upstream]\nhost = "127.0.0.1"\nport = {upstream.port}\ntls = "starttls"\n'
            f'ca_file = "{ca_file}"\nretry_seconds = 30\n')


def submit(port: int, user: str, password: str, message: bytes,
           sender: str = "alice@lan.example"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.login(user, password)  # plain connection from loopback: plain_auth_networks
        return s.sendmail(sender, ["bob@ext.example"], message)


def forms_of_the_password() -> list[bytes]:
    token = f"\0{USER}\0{PASSWORD}".encode()
    return [PASSWORD.encode(), base64.b64encode(PASSWORD.encode()), token,
            base64.b64encode(token), PASSWORD.encode("utf-16-le")]


async def test_a_clients_password_is_checked_live_and_used_after_the_hold(
        start_gateway, tls_upstream, tmp_path, nursery):
    running = await start_gateway(None, hold=1, extra=upstream_settings(
        tls_upstream, tls_upstream.ca_file))
    port = running.smtp[0][1]

    # Wrong password: the upstream's 535 at once, and nothing is held.
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        await in_thread(submit, port, USER, "wrong", make_message("never held"))
    assert refused.value.smtp_code == 535
    assert running.queue.store_status()["messages"] == 0
    assert tls_upstream.auth.attempts[-1][3] is False

    # Good password: accepted (235), held, then delivered with that same password.
    message = make_message("sent with my own password")
    await in_thread(submit, port, USER, PASSWORD, message)
    assert running.queue.store_status()["messages"] == 1
    await wait_for(lambda: tls_upstream.received())
    [got] = tls_upstream.received()
    assert got.content == message and got.recipients == ["bob@ext.example"]
    good = [a for a in tls_upstream.auth.attempts if a[3]]
    assert len(good) == 2  # the live check at AUTH, then the delivery after the hold
    assert {(login, password) for _, login, password, _ in good} == {
        (USER.encode(), PASSWORD.encode())}
    await wait_for(lambda: running.queue.store_status()["messages"] == 0)

    # B9: no form of the password anywhere under the data directory.
    data_dir = tmp_path / "data"
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wal" for p in files)
    for path in files:
        content = path.read_bytes()
        for form in forms_of_the_password():
            assert form not in content, (path, form)
    key = data_dir / "credentials.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert not key.is_relative_to(data_dir / "store")
    assert list((data_dir / "keys").iterdir()) == []  # the message's own key is destroyed


async def test_an_upstream_certificate_that_does_not_verify_is_a_clear_4xx(
        start_gateway, tls_upstream, tmp_path, caplog):
    other_ca, _ = make_ca(tmp_path, "other")  # the gateway trusts another CA
    running = await start_gateway(None, hold=1, extra=upstream_settings(tls_upstream, other_ca))
    port = running.smtp[0][1]
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        await in_thread(submit, port, USER, PASSWORD, make_message("not verified"))
    assert refused.value.smtp_code == 454  # temporary: the client keeps the mail
    assert running.queue.store_status()["messages"] == 0
    assert "certificate" in caplog.text and "not verified" in caplog.text

    # Mail without AUTH is held, then deferred (4xx), never sent in the clear or unverified.
    await in_thread(send_mail, port, make_message("deferred"), sender="alice@lan.example",
                    recipients=["bob@ext.example"])
    await wait_for(lambda: "deferred: TLS certificate of" in caplog.text)
    assert tls_upstream.received() == []
    assert running.queue.store_status()["messages"] == 1
    assert running.queue.counters["deferred"] >= 1


async def test_transparent_mode_delivers_to_the_intercepted_destination(
        start_gateway, upstream, monkeypatch):
    """The gateway asks each accepted socket where it was going; here that answer is the
    aiosmtpd upstream, as an iptables REDIRECT would make it."""
    looked_up = []

    def lookup(sock):
        looked_up.append(sock.getsockname())
        return ("127.0.0.1", upstream.port)

    monkeypatch.setattr(app, "original_destination", lookup)
    running = await start_gateway(None, hold=1, extra='[upstream]\nmode = "transparent"\n'
                                  'retry_seconds = 30\n')
    message = make_message("intercepted")
    await in_thread(send_mail, running.smtp[0][1], message)
    await wait_for(lambda: upstream.received())
    [got] = upstream.received()
    assert got.content == message
    assert looked_up and looked_up[0][1] == running.smtp[0][1]
