from hypothesis import given, strategies as st

from firmware.web.context import WebContext, parse_id, token_for

from .conftest import FakeQueue


@given(st.binary(min_size=1, max_size=32))
def test_parse_id_round_trip(raw):
    assert parse_id(raw.hex()) == raw
    assert parse_id(raw.hex().upper()) == raw


@given(st.text(max_size=80))
def test_parse_id_never_raises(text):
    result = parse_id(text)
    assert result is None or (isinstance(result, bytes) and result.hex() == text.lower())


@given(st.text(max_size=40))
def test_token_ok_only_for_the_exact_token(candidate):
    ctx = WebContext(FakeQueue(), b"k")
    right = token_for(b"k", "192.0.2.7")
    assert len(right) == 32
    assert ctx.token_ok("192.0.2.7", candidate) is (candidate == right)
    assert ctx.token_ok("192.0.2.7", right) is True
    assert ctx.token_ok("192.0.2.8", right) is False


def test_parse_id_rejects_spaces_and_signs():
    for text in ("0a  ", " 0a ", "0a 0", "+0a0", "0x0a", "０ａ"):
        assert parse_id(text) is None
