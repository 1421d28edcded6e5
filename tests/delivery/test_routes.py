"""Routes (B10): explicit smarthosts per sender domain, and transparent mode's original
destination, looked up on real sockets (SO_ORIGINAL_DST) and used end to end."""

from __future__ import annotations

import socket
import struct

import pytest

from firmware import app, routes
from firmware.config import ConfigError, loads
from firmware.routes import SO_ORIGINAL_DST, Route, Router, original_destination, parse_sockaddr

DEFAULT = Route("smtp.isp.example", 587, "starttls", "gw")
SALES = Route("smtp.sales.example", 465, "implicit", "gw")
ANY_SUB = Route("mx.group.example", 25, "none", "gw")


def router(**kw) -> Router:
    return Router(default=DEFAULT, by_domain={"sales.example": SALES, ".group.example": ANY_SUB},
                  helo="gw", **kw)


def test_explicit_routes_by_sender_domain():
    r = router()
    assert r.route("bob@Sales.Example") is SALES
    assert r.route("bob@eu.group.example") is ANY_SUB
    assert r.route("bob@group.example") is DEFAULT  # ".domain" is for subdomains only
    assert r.route("bob@other.example") is DEFAULT
    assert r.route(None) is DEFAULT and r.route("") is DEFAULT
    # Explicit mode ignores an original destination.
    assert r.route("bob@other.example", ("192.0.2.9", 25, "none")) is DEFAULT


def test_transparent_mode_goes_to_the_original_destination_in_the_clients_tls_mode():
    r = router(transparent=True)
    route = r.route("bob@sales.example", ("203.0.113.5", 465, "implicit"))
    assert (route.host, route.port, route.tls, route.helo) == ("203.0.113.5", 465, "implicit", "gw")
    assert r.route("bob@x.example", None) is DEFAULT  # not intercepted: the default


def test_route_settings_are_checked():
    config = loads('[upstream]\nhost = "smtp.isp.example"\n'
                   '[routes."sales.example"]\nhost = "smtp.sales.example"\ntls = "implicit"\n'
                   '[routes.".group.example"]\nhost = "mx.group.example"\nport = 2525\n')
    assert config.routes["sales.example"].port == 465
    assert config.routes[".group.example"].port == 2525
    r = app._router(config)
    assert r.route("a@sales.example").key == ("smtp.sales.example", 465, "implicit")
    for bad, key in [
        ('[routes."sales.example"]\nhost = "x.example"\n', "upstream.host"),
        ('[upstream]\nhost = "a.example"\n[routes."nodot"]\nhost = "x.example"\n', "routes.nodot"),
        ('[upstream]\nhost = "a.example"\n[routes."s.example"]\nport = 25\n', "routes.s.example.host"),
        ('[upstream]\nhost = "a.example"\n[routes."s.example"]\nhost = "x.example"\nhots = 1\n',
         "routes.s.example.hots"),
        ('[upstream]\nmode = "transparent"\noutbox = "out"\n', "upstream.outbox"),
        ('[upstream]\nmode = "sideways"\n', "upstream.mode"),
    ]:
        with pytest.raises(ConfigError) as err:
            loads(bad)
        assert err.value.key == key
    transparent = loads('[upstream]\nmode = "transparent"\nca_file = "ca.pem"\n')
    assert transparent.upstream.outbox is None and transparent.upstream.host is None


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4) + \
        socket.inet_pton(socket.AF_INET6, ip) + bytes(4)


def test_the_kernels_sockaddr_is_read():
    assert parse_sockaddr(sockaddr_in("203.0.113.5", 587)) == ("203.0.113.5", 587)
    assert parse_sockaddr(sockaddr_in6("2001:db8::25", 465)) == ("2001:db8::25", 465)
    assert parse_sockaddr(sockaddr_in6("::ffff:192.0.2.1", 25)) == ("192.0.2.1", 25)
    assert parse_sockaddr(b"\x00" * 16) is None and parse_sockaddr(b"") is None


class Intercepted:
    """What a REDIRECTed connection's socket answers: the level and option asked are checked."""

    def __init__(self, family, raw):
        self.family, self.raw, self.asked = family, raw, []

    def getsockopt(self, level, option, size):
        self.asked.append((level, option, size))
        return self.raw

    def getsockname(self):
        return ("192.168.1.2", 25) if self.family == socket.AF_INET else ("::", 25, 0, 0)


def test_the_original_destination_is_asked_with_so_original_dst():
    v4 = Intercepted(socket.AF_INET, sockaddr_in("203.0.113.5", 587))
    assert original_destination(v4) == ("203.0.113.5", 587)
    assert v4.asked == [(socket.SOL_IP, SO_ORIGINAL_DST, 16)]
    v6 = Intercepted(socket.AF_INET6, sockaddr_in6("2001:db8::25", 465))
    assert original_destination(v6) == ("2001:db8::25", 465)
    assert v6.asked == [(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)]


def test_a_connection_that_was_not_intercepted_has_no_original_destination():
    """On a real loopback connection without NAT the kernel has no entry (or names us)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert original_destination(accepted) is None
