"""The root nursery: the only place that wires services together.

Services start in a fixed order and the gateway says "ready" only when the store is recovered and
every listener is bound: store -> queue -> relay -> SMTP (plain + STARTTLS, implicit TLS) -> web.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

import board
from firmware import tls
from firmware.audit import AuditLog
from firmware.config import Config, parse_listen
from firmware.qmgr import HoldQueue, WallClock
from firmware.credentials import KeyStore, Vault
from firmware.relay import Relay, check_credentials
from firmware.routes import Route, Router, original_destination
from firmware.smtpd import SmtpService, serve_smtp
from firmware.supervisor import Supervisor
from firmware.wal import Log
from firmware.web import WebApp, serve_web

log = logging.getLogger("matte")


@dataclass(frozen=True)
class Running:
    """What a started gateway tells its caller (tests use the bound ports)."""

    smtp: list[tuple[str, int]]
    smtps: list[tuple[str, int]]
    web: list[tuple[str, int]]
    queue: HoldQueue
    ca_file: Path
    web_tls: list[tuple[str, int]] = field(default_factory=list)
    supervisor: Supervisor | None = None


def run(config: Config) -> None:
    trio.run(serve, config)


def _secret(path: Path) -> bytes:
    """A device secret kept in the data dir (mode 0600): signs the page's tokens."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        value = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        return value


def _certificate_names(config: Config) -> list[str]:
    names = [config.smtp.hostname]
    for entry in (*config.smtp.listen, *config.smtp.listen_tls, *config.web.listen,
                  *config.web.listen_tls):
        host, _port = parse_listen(entry)
        if host not in names:
            names.append(host)
    return names + [n for n in config.web.names if n not in names]


async def serve(config: Config, *, the_board=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    data_dir = Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    hw = the_board or board.open_board(config.board.kind, **config.board.options())
    b = config.board
    supervisor = Supervisor(hw, kick_seconds=b.kick_seconds, stall_seconds=b.stall_seconds,
                            upstream_fault_seconds=b.upstream_fault_seconds)
    supervisor.show()  # "booting"
    device = await trio.to_thread.run_sync(tls.ensure_device_certificates, data_dir,
                                           _certificate_names(config))
    server_tls = tls.server_context(device)
    with AuditLog(config.audit_log or data_dir / "audit.jsonl",
                  max_bytes=config.audit_log_max_bytes, keep=config.audit_log_keep) as audit:
        store, recovered = await Log.open(data_dir / "store")
        try:
            await _serve(config, supervisor, audit, store, recovered, server_tls, device, task_status,
                         nic_online=hw.nic_online)
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()
    if the_board is None:
        hw.close()  # a clean stop disarms the watchdog; an error leaves it armed (reboot)


async def _serve(config, supervisor, audit, store, recovered, server_tls, device, task_status,
                 *, nic_online) -> None:
    data_dir = Path(config.data_dir)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
        await nursery.start(supervisor.run)
        await nursery.start(supervisor.supervise, "store", store.run)

        now = WallClock()
        keys = await trio.to_thread.run_sync(KeyStore.open, data_dir / "keys")  # B9
        queue = HoldQueue(store, hold_seconds=config.hold.seconds,
                          max_messages=config.hold.max_messages, max_bytes=config.hold.max_bytes,
                          now=now, audit=audit, on_change=supervisor.show, keys=keys)
        supervisor.watch(queue=queue, store=store)  # the LED follows them (S10: "queue full")
        queue.recover(recovered, config.hold.on_boot)
        await queue.remove_orphan_keys()

        up = config.upstream
        router = _router(config)
        upstream = router.default
        vault = await trio.to_thread.run_sync(Vault.load_or_create, data_dir / "credentials.key")
        relay = Relay(queue, router=router, outbox=None if upstream else up.outbox,
                      retry_seconds=up.retry_seconds, now=now, vault=vault,
                      online=nic_online, hostname=config.smtp.hostname, keys=keys)
        relay.connect = supervisor.watch_connect(relay.connect)  # upstream down: LED "fault"
        await nursery.start(supervisor.supervise, "relay", relay.run)
        await nursery.start(supervisor.supervise, "queue", queue.run)

        s = config.smtp
        service = SmtpService(
            queue=queue, hostname=s.hostname, max_message_size=s.max_message_size,
            max_recipients=config.hold.max_recipients, allowed_networks=s.allowed_networks,
            plain_auth_networks=s.plain_auth_networks,
            sender_rules=config.whitelist.senders, recipient_rules=config.whitelist.recipients,
            tls_context=server_tls,
            authenticate=lambda user, password, route: check_credentials(route, user, password),
            route_of=router.route, seal=vault.seal,
            original_destination=original_destination if router.transparent else None)
        # A listener with no addresses is off (it would return at once: no service to watch).
        smtp = await nursery.start(supervisor.supervise, "smtp", partial(
            serve_smtp, service, [parse_listen(a) for a in s.listen])) if s.listen else []
        smtps = await nursery.start(supervisor.supervise, "smtps", partial(
            serve_smtp, service, [parse_listen(a) for a in s.listen_tls],
            implicit_tls=True)) if s.listen_tls else []
        secret = await trio.to_thread.run_sync(_secret, data_dir / "web.key")
        ca_pem = await trio.to_thread.run_sync(device.ca_cert.read_bytes)
        webapp = WebApp(queue, secret, ca_pem=ca_pem, names=_certificate_names(config),
                        services={"smtp": service.counters})
        web = await nursery.start(supervisor.supervise, "web", partial(
            serve_web, [parse_listen(a) for a in config.web.listen], webapp))
        web_tls = await nursery.start(supervisor.supervise, "web-tls", partial(
            serve_web, [parse_listen(a) for a in config.web.listen_tls], webapp,
            tls_context=server_tls)) if config.web.listen_tls else []
        supervisor.ready()
        log.info("ready: smtp %s, smtps %s, web %s, data %s, upstream %s",
                 _addrs(smtp), _addrs(smtps), _addrs(web), data_dir,
                 ("transparent, else " if router.transparent else "")
                 + (f"{up.host}:{up.port} ({up.tls})" if upstream
                    else f"outbox {up.outbox}" if up.outbox else "none")
                 + (f", {len(router.by_domain)} route(s)" if router.by_domain else ""))
        task_status.started(Running(smtp, smtps, web, queue, device.ca_cert, web_tls,
                                    supervisor=supervisor))


def _router(config: Config) -> Router:
    """Where released mail goes (B10): the default smarthost, routes per sender domain, or the
    original destination of each intercepted connection."""
    up, helo = config.upstream, config.upstream.helo or config.smtp.hostname
    contexts: dict = {}

    def context(mode: str):
        if mode == "none":
            return None
        if "ctx" not in contexts:  # one context for every route: the same CAs
            contexts["ctx"] = tls.client_context(up.ca_file)
        return contexts["ctx"]

    default = None
    if up.host is not None:
        default = Route(up.host, up.port, up.tls, helo, context(up.tls), up.username, up.password)
    routes = {domain: Route(r.host, r.port, r.tls, helo, context(r.tls), r.username, r.password)
              for domain, r in config.routes.items()}
    return Router(default=default, by_domain=routes, transparent=up.mode == "transparent",
                  tls_context_for=lambda: context("starttls"), helo=helo)


def _addrs(bound) -> str:
    return " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in bound) or "-"


async def _stop_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
