import pytest
from hypothesis import given, settings, strategies as st

from firmware.smtp import (
    Auth,
    AuthResponse,
    DataChunk,
    Hello,
    LocalProtocolError,
    MailFrom,
    RcptTo,
    Reply,
    Vrfy,
    Help,
    MAX_REPLY_LINE,
)


def test_reply_serialization_and_properties():
    r = Reply.of(250, "2.1.0 first", "second")
    assert bytes(r) == b"250-2.1.0 first\r\n250 second\r\n"
    assert r.lines == ("2.1.0 first", "second")
    assert r.text == "2.1.0 first\nsecond"
    assert r.enhanced == "2.1.0"
    assert r.is_positive and not r.is_error
    assert Reply.of(354, "go").is_intermediate
    assert Reply.of(451, "4.3.0 later").is_transient
    assert Reply.of(552, "5.3.4 too big").enhanced == "5.3.4"
    assert Reply.of(552, "5.3.4 too big").is_permanent
    assert Reply.of(250, "Ok").enhanced is None
    # class digit of the enhanced code must match the reply
    assert Reply.of(250, "5.0.0 odd").enhanced is None
    assert bytes(Reply.of(221)) == b"221\r\n"
    assert bytes(Reply.of(250, "", "x")) == b"250-\r\n250 x\r\n"
    assert Reply(250, ["a", "b"]).lines == ("a", "b")


@pytest.mark.parametrize(
    "code, lines",
    [
        (199, ("x",)),
        (600, ("x",)),
        ("250", ("x",)),
        (250, ()),
        (250, ("a\r\nb",)),
        (250, ("a\nb",)),
        (250, ("a\rb",)),
        (250, ("a\x00",)),
        (250, ("x" * (MAX_REPLY_LINE - 5),)),
    ],
)
def test_reply_validation(code, lines):
    with pytest.raises(LocalProtocolError):
        Reply(code, lines)


def test_reply_line_at_limit_ok():
    assert len(bytes(Reply(250, ("x" * (MAX_REPLY_LINE - 6),)))) == MAX_REPLY_LINE


@pytest.mark.parametrize(
    "make",
    [
        lambda: Hello("FOO", "x"),
        lambda: Hello("EHLO", ""),
        lambda: Hello("EHLO", "a b"),
        lambda: Hello("EHLO", "a\r\nMAIL"),
        lambda: MailFrom("no-at-sign"),
        lambda: MailFrom("a@b\r\nRCPT TO:<c@d>"),
        lambda: MailFrom("<a@b>"),
        lambda: MailFrom("a@b", size=-1),
        lambda: MailFrom("a@b", size=True),
        lambda: MailFrom("a@b", body="BINARYMIME"),
        lambda: MailFrom("ä@b"),
        lambda: MailFrom("a@b", auth="a b"),
        lambda: RcptTo(""),
        lambda: RcptTo("x@" + "a" * 300),
        lambda: Vrfy(""),
        lambda: Vrfy("a\nb"),
        lambda: Help("a\rb"),
        lambda: Auth("BAD MECH"),
        lambda: Auth("PLAIN", "str"),
        lambda: AuthResponse("str"),
        lambda: DataChunk("str"),
    ],
)
def test_event_validation(make):
    with pytest.raises(LocalProtocolError):
        make()


def test_event_normalisation():
    assert Hello("ehlo", "x").verb == "EHLO"
    assert Auth("plain").mechanism == "PLAIN"
    assert MailFrom("a@b", body="8bitmime").body == "8BITMIME"
    assert MailFrom("ä@b", smtputf8=True).sender == "ä@b"
    assert MailFrom("").sender == ""
    assert RcptTo("Postmaster").recipient == "Postmaster"
    assert RcptTo('"john doe"@[192.0.2.1]').recipient == '"john doe"@[192.0.2.1]'
    assert DataChunk(bytearray(b"x")).data == b"x"
    with pytest.raises(Exception):
        Hello("EHLO", "x").domain = "y"


# The address character classes, as RFC 5321 / 6531 write them; the module writes them as
# "any but these ASCII octets" (much faster to compile): the same sets.
_U = "\u0080-\U0010ffff"
_SPELLED_OUT = {
    "ATEXT": rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U}]",
    "QTEXT": rf"[\x20\x21\x23-\x5b\x5d-\x7e{_U}]",
    "LABEL_CHAR": rf"[A-Za-z0-9_\-{_U}]",
}


@pytest.mark.parametrize("name", sorted(_SPELLED_OUT))
def test_address_classes_are_the_rfc_sets(name):
    import re

    from firmware.smtp import _events

    ours, spelled = re.compile(getattr(_events, name)), re.compile(_SPELLED_OUT[name])
    for c in [*range(0x800), 0xD7FF, 0xE000, 0xFFFD, 0xFFFF, 0x10000, 0x10FFFF]:
        assert bool(ours.fullmatch(chr(c))) == bool(spelled.fullmatch(chr(c))), hex(c)


@settings(max_examples=500)
@given(st.characters())
def test_address_classes_agree_on_any_character(char):
    import re

    from firmware.smtp import _events

    for name, spelled in _SPELLED_OUT.items():
        assert bool(re.fullmatch(getattr(_events, name), char)) == bool(
            re.fullmatch(spelled, char)), (name, char)
