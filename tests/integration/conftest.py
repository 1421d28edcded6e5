"""Real peers for end-to-end tests: aiosmtpd as the upstream, smtplib as the client."""

from __future__ import annotations

import http.client
import json
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from aiosmtpd.controller import Controller

from firmware import app
from firmware.config import loads


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes


@dataclass
class UpstreamRecorder:
    """aiosmtpd handler: keeps what the upstream received."""

    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content))
        return "250 2.0.0 Ok: stored"

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream(recorder: UpstreamRecorder, **kwargs) -> Controller:
    """aiosmtpd needs a known port (it connects to itself to check it started)."""
    recorder.port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=recorder.port, **kwargs)
    controller.start()
    return controller


@pytest.fixture
def upstream():
    recorder = UpstreamRecorder()
    controller = start_upstream(recorder)
    yield recorder
    controller.stop()


def gateway_config(tmp_path: Path, upstream_port: int | None, extra: str = "",
                   hold: int = 300, smtp_extra: str = "") -> str:
    up = (f'[upstream]\nhost = "127.0.0.1"\nport = {upstream_port}\nretry_seconds = 30\n'
          if upstream_port else "")
    return f"""
data_dir = "{tmp_path / 'data'}"
[smtp]
listen = ["127.0.0.1:0", "[::1]:0"]
listen_tls = ["127.0.0.1:0"]
{smtp_extra}
[web]
listen = ["127.0.0.1:0"]
[hold]
seconds = {hold}
{extra}
{up}
"""


@pytest.fixture
def start_gateway(tmp_path, nursery):
    """Start the whole gateway in this test's trio run; returns app.Running."""

    async def start(upstream_port: int | None, *, hold: int = 300, extra: str = "",
                    smtp_extra: str = ""):
        config = loads(gateway_config(tmp_path, upstream_port, extra, hold, smtp_extra),
                       source="test.toml")
        return await nursery.start(app.serve, config)

    return start


def in_thread(fn, *args, **kwargs):
    return trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def make_message(subject: str, to: str = "rcpt@ext.example", body: str = "Hello.\r\n") -> bytes:
    return (f"From: Sender <sender@lan.example>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@lan.example>\r\n\r\n{body}").encode()


def send_mail(port: int, message: bytes, *, sender="sender@lan.example",
              recipients=("rcpt@ext.example",), source="127.0.0.1"):
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        return s.sendmail(sender, list(recipients), message)


def api(port: int, method: str, path: str, *, source="127.0.0.1", token=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(source, 0),
                                      timeout=30)
    headers = {"Host": f"127.0.0.1:{port}"}
    if token is not None:
        headers["X-Matte-Token"] = token
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=payload, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data and resp.getheader(
        "Content-Type", "").startswith("application/json") else data)


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll a condition of the outside world (the upstream's inbox) with a bounded wait."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


def tls_client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))
