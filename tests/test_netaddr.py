import ipaddress

import pytest
from hypothesis import given, strategies as st

from firmware.netaddr import ip_in, normalize_ip

LOCAL = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "fe80::/10", "fc00::/7")
)


@pytest.mark.parametrize(
    "given_ip, expected",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:c000:0201", "192.0.2.1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("::1", "::1"),
    ],
)
def test_normalize_ip(given_ip, expected):
    assert normalize_ip(given_ip) == expected


@pytest.mark.parametrize("bad", ["", "localhost", "300.1.1.1", "1.2.3", "::g", "%eth0"])
def test_normalize_ip_rejects(bad):
    with pytest.raises(ValueError):
        normalize_ip(bad)


@given(st.ip_addresses())
def test_normalize_is_idempotent(addr):
    once = normalize_ip(str(addr))
    assert normalize_ip(once) == once


@given(st.ip_addresses(v=4))
def test_mapped_equals_plain(addr):
    mapped = ipaddress.IPv6Address(f"::ffff:{addr}")
    assert normalize_ip(str(mapped)) == normalize_ip(mapped.exploded) == str(addr)


@given(st.text(max_size=60))
def test_normalize_never_raises_other_than_valueerror(text):
    try:
        result = normalize_ip(text)
    except ValueError:
        assert ip_in(text, LOCAL) is False
    else:
        assert normalize_ip(result) == result


@pytest.mark.parametrize(
    "ip, inside",
    [
        ("127.0.0.2", True),
        ("::ffff:127.0.0.1", True),
        ("::1", True),
        ("fe80::abcd%wlan0", True),
        ("10.200.3.4", True),
        ("192.0.2.1", False),
        ("2001:db8::1", False),
        ("not an ip", False),
    ],
)
def test_ip_in(ip, inside):
    assert ip_in(ip, LOCAL) is inside


def test_ip_in_empty_networks():
    assert ip_in("127.0.0.1", ()) is False
