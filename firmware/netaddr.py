"""IP address helpers shared by every service.

Scoping (S12, B1) compares addresses as strings, so every caller must agree on
one spelling: IPv4-mapped IPv6 becomes plain IPv4, zone ids are dropped and
IPv6 is written in compressed form.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["normalize_ip", "ip_in"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Every connection and page request asks about its peer: the same few LAN addresses, parsed once.
@lru_cache(maxsize=4096)
def _parse(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    # A zone id names a local interface, not a host: two peers differing only
    # in it are the same sender.
    text = text.split("%", 1)[0]
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@lru_cache(maxsize=4096)
def normalize_ip(ip: str) -> str:
    """The canonical spelling of `ip`; raises ValueError when it is not one."""
    return str(_parse(ip))


def ip_in(ip: str, networks: Iterable[_Network]) -> bool:
    """Whether `ip` (any spelling normalize_ip accepts) lies in any of `networks`.

    An unparsable address is in no network.
    """
    try:
        addr = _parse(ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)
