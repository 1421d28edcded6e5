"""Where a message goes upstream (B10).

Explicit mode: a default smarthost (`[upstream]`) and routes per sender domain (`[routes]`).
Transparent mode: the gateway intercepts connections (iptables REDIRECT) and delivers each message
to the destination its client was connecting to, found with SO_ORIGINAL_DST, in the same TLS mode
the client used on that connection.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass, field

# linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h
# IP6T_SO_ORIGINAL_DST: both 80, asked at SOL_IP and SOL_IPV6.
SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = socket.IPPROTO_IPV6
_SOCKADDR_IN6 = 28


@dataclass(frozen=True)
class Route:
    host: str
    port: int
    tls: str  # "none" | "starttls" | "implicit"
    helo: str
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    # Static credentials of the route, used when the client gave none.
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, int, str]:
        """Two routes with the same key reach the same server the same way."""
        return (self.host, self.port, self.tls)

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} ({self.tls})"


class Router:
    def __init__(self, *, default: Route | None, by_domain: dict[str, Route] | None = None,
                 transparent: bool = False, tls_context_for=None, helo: str = "") -> None:
        self.default = default
        self.by_domain = {d.lower(): r for d, r in (by_domain or {}).items()}
        self.transparent = transparent
        self._tls_context_for = tls_context_for or (lambda: None)
        self._helo = helo

    def route(self, sender: str | None, destination=None) -> Route | None:
        """The route for mail from `sender` (an address, or None when not known yet) on a
        connection whose original destination was `destination`; None: the outbox."""
        if self.transparent and destination is not None:
            host, port, tls = destination
            return Route(host, port, tls, self._helo,
                         self._tls_context_for() if tls != "none" else None)
        return self._by_sender(sender) or self.default

    def _by_sender(self, sender: str | None) -> Route | None:
        if not sender or not self.by_domain:
            return None
        domain = sender.rpartition("@")[2].lower()
        if domain in self.by_domain:
            return self.by_domain[domain]
        # ".example.com" routes every subdomain of example.com.
        parts = domain.split(".")
        for i in range(1, len(parts)):
            route = self.by_domain.get("." + ".".join(parts[i:]))
            if route is not None:
                return route
        return None


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where an intercepted connection was going (SO_ORIGINAL_DST), or None when it was made
    to the gateway itself (no NAT entry)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6)
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    found = parse_sockaddr(raw)
    if found is None:
        return None
    if found == tuple(sock.getsockname()[:2]):
        return None  # not redirected: addressed to us
    return found


def parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    """A struct sockaddr_in or sockaddr_in6 as the kernel returns it."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        address = ipaddress.IPv6Address(raw[8:24])
        mapped = address.ipv4_mapped
        return str(mapped or address), port
    return None
