import base64
import time
from email.header import Header

import pytest
from hypothesis import given, settings, strategies as st

from firmware.summary import MAX_HEADER_BYTES, HeaderCollector, decode_words, summarize

FORBIDDEN = ("\x00", "\r", "\n")


def assert_clean(result):
    assert set(result) >= {"from", "to", "cc", "subject"}
    assert isinstance(result["from"], str) and isinstance(result["subject"], str)
    assert isinstance(result["to"], list) and isinstance(result["cc"], list)
    for text in [result["from"], result["subject"], *result["to"], *result["cc"]]:
        assert isinstance(text, str)
        for bad in FORBIDDEN:
            assert bad not in text
        text.encode("utf-8")  # no lone surrogates: the page and the log can encode it


def b_word(text, charset):
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


# --- ordinary messages --------------------------------------------------------------------


def test_plain():
    header = (b"From: Alice Example <alice@example.com>\r\n"
              b"To: bob@example.net, \"Carol, C.\" <carol@example.org>\r\n"
              b"Cc: dave@example.com\r\n"
              b"Subject: Quarterly report\r\n"
              b"\r\n"
              b"Subject: not a header, the body\r\n")
    assert summarize(header) == {
        "from": "Alice Example <alice@example.com>",
        "to": ["bob@example.net", "carol@example.org"],
        "cc": ["dave@example.com"],
        "subject": "Quarterly report",
    }


def test_empty_and_missing():
    assert summarize(b"") == {"from": "", "to": [], "cc": [], "subject": ""}
    assert summarize(b"\r\nSubject: body\r\n") == {"from": "", "to": [], "cc": [], "subject": ""}
    assert summarize(b"X-Other: 1\r\n\r\n")["subject"] == ""


def test_case_insensitive_names_and_repeated_fields():
    header = (b"SUBJECT: first\r\nsubject: second\r\nto: a@x.example\r\nTO: b@y.example\r\n"
              b"from: one@x.example\r\nFrom: two@x.example\r\n")
    result = summarize(header)
    assert result["subject"] == "first"
    assert result["to"] == ["a@x.example", "b@y.example"]
    assert result["from"] == "one@x.example"


def test_groups_and_empty_lists():
    result = summarize(b"To: undisclosed-recipients:;\r\nCc: team: a@x.example, b@x.example;\r\n")
    assert result["to"] == []
    assert result["cc"] == ["a@x.example", "b@x.example"]


# --- RFC 2047 and Japanese ----------------------------------------------------------------

JAPANESE = "会議の日程について（再送）"


def test_iso_2022_jp_b_known_vector():
    # "日本語" in ISO-2022-JP, B-encoded, as Japanese mailers write it
    assert summarize(b"Subject: =?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=\r\n")["subject"] == "日本語"


@pytest.mark.parametrize("charset", ["iso-2022-jp", "utf-8", "shift_jis", "euc-jp"])
def test_japanese_b_encoding(charset):
    header = f"Subject: {b_word(JAPANESE, charset)}\r\n".encode("ascii")
    assert summarize(header)["subject"] == JAPANESE


@pytest.mark.parametrize("charset", ["iso-2022-jp", "utf-8"])
def test_japanese_from_email_header_folded(charset):
    """What Python's own encoder produces: several encoded words, folded over lines."""
    subject = JAPANESE * 4
    folded = Header(subject, charset, header_name="Subject").encode(linesep="\r\n")
    assert "\r\n " in folded  # really folded
    assert summarize(f"Subject: {folded}\r\n\r\n".encode("ascii"))["subject"] == subject


def test_utf8_q_encoding():
    header = b"Subject: =?utf-8?q?=E6=97=A5=E6=9C=AC_=E8=AA=9E?=\r\n"
    assert summarize(header)["subject"] == "日本 語"


def test_lowercase_encoding_letters_and_language_suffix():
    header = b"Subject: =?UTF-8*ja?b?5pel5pys6Kqe?=\r\n"
    assert summarize(header)["subject"] == "日本語"


def test_multibyte_character_split_across_words():
    data = "日本語".encode("utf-8")
    words = [f"=?UTF-8?B?{base64.b64encode(data[i:i + 2]).decode()}?=" for i in range(0, 9, 2)]
    header = ("Subject: " + "\r\n ".join(words) + "\r\n").encode("ascii")
    assert summarize(header)["subject"] == "日本語"


def test_whitespace_between_words_rules():
    # dropped between encoded words, kept between an encoded word and text
    assert decode_words("=?utf-8?q?a?= =?utf-8?q?b?=") == "ab"
    assert decode_words("=?utf-8?q?a?= plain =?utf-8?q?b?=") == "a plain b"
    assert decode_words("Re: =?utf-8?q?caf=C3=A9?=") == "Re: café"
    assert decode_words("=?iso-8859-1?q?caf=E9?= =?utf-8?q?_ok?=") == "café ok"


def test_encoded_display_name():
    header = ("From: " + b_word("山田 太郎", "iso-2022-jp") + " <taro@example.jp>\r\n"
              "To: " + b_word("佐藤, 花子", "utf-8") + " <hanako@example.jp>, x@example.com\r\n")
    result = summarize(header.encode("ascii"))
    assert result["from"] == "山田 太郎 <taro@example.jp>"
    assert result["to"] == ["hanako@example.jp", "x@example.com"]


def test_half_width_katakana_and_nec_specials():
    kana = "Subject: =?ISO-2022-JP?B?GyhJNkA2RRsoQg==?=\r\n"  # ｶﾀｶﾅ via JIS X 0201 kana
    assert summarize(kana.encode())["subject"] == "ｶﾀｶﾅ"
    circled = "Subject: =?Shift_JIS?B?h0A=?=\r\n"  # ① is a cp932 (NEC) character
    assert summarize(circled.encode())["subject"] == "①"


def test_raw_8bit_headers():
    assert summarize("Subject: 生のUTF-8\r\n".encode("utf-8"))["subject"] == "生のUTF-8"
    raw_jis = b"Subject: " + "日本語".encode("iso2022_jp") + b"\r\n"
    assert summarize(raw_jis)["subject"] == "日本語"
    assert summarize(b"Subject: caf\xe9\r\n")["subject"] == "caf\ufffd"


def test_unknown_charset_and_broken_words():
    assert summarize(b"Subject: =?x-nonsense?B?5pel?=\r\n")["subject"] == "\ufffd" * 3
    assert summarize(b"Subject: =?utf-8?B?5pel5p?=\r\n")["subject"].startswith("日")
    assert summarize(b"Subject: =?utf-8?B?!!!?=\r\n")["subject"] == ""
    # codecs that are not character sets are never used
    assert summarize(b"Subject: =?unicode_escape?Q?\\u0041?=\r\n")["subject"] != "A"
    assert summarize(b"Subject: =?zlib?B?eJwDAAAAAAE=?=\r\n")["subject"] != ""
    assert summarize(b"Subject: =?rot13?Q?nop?=\r\n")["subject"] == "nop"
    # not an encoded word at all: kept as text
    assert summarize(b"Subject: =?utf-8?X?abc?=\r\n")["subject"] == "=?utf-8?X?abc?="


# --- folding ------------------------------------------------------------------------------


def test_folded_headers():
    header = (b"Subject: a long\r\n subject\r\n\tcontinued\r\n"
              b"To: a@x.example,\r\n b@y.example,\r\n\tc@z.example\r\n")
    result = summarize(header)
    assert result["subject"] == "a long subject continued"
    assert result["to"] == ["a@x.example", "b@y.example", "c@z.example"]


def test_lf_only_line_endings():
    result = summarize(b"Subject: one\n two\nTo: a@x.example\n\nbody")
    assert result == {"from": "", "to": ["a@x.example"], "cc": [], "subject": "one two"}


def test_continuation_before_any_field_is_ignored():
    assert summarize(b" stray\r\nSubject: s\r\n")["subject"] == "s"


# --- hostile input ------------------------------------------------------------------------


def test_nul_cr_lf_never_come_out():
    header = (b"Subject: a\x00b =?utf-8?q?c=0D=0Ad=00e?= \x85f\r\n"
              b"From: =?utf-8?q?evil=0D=0ABcc=3A_x?= <e@x.example>\r\n")
    result = summarize(header)
    assert_clean(result)
    assert result["subject"] == "ab c de \ufffdf"
    assert "Bcc: x" in result["from"]


def test_bidi_kept_as_text():
    rlo = "\u202e"
    header = f"Subject: invoice {rlo}fdp.exe\r\n".encode("utf-8")
    assert summarize(header)["subject"] == f"invoice {rlo}fdp.exe"
    encoded = f"Subject: {b_word(rlo + 'abc', 'utf-8')}\r\n".encode()
    assert summarize(encoded)["subject"] == rlo + "abc"


def test_unicode_line_separators_removed():
    result = summarize("Subject: a\u2028b\u2029c\r\n".encode("utf-8"))
    assert result["subject"] == "a b c"


def test_only_the_first_64k_is_read():
    big = b"Subject: x\r\nX-Pad: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\nTo: late@x.example\r\n"
    result = summarize(big)
    assert result["subject"] == "x"
    assert result["to"] == []


def test_huge_hostile_header_is_fast():
    hostile = b"To: " + b'"(<' * 20000 + b"\r\nSubject: " + b"=?utf-8?b?" * 5000 + b"\r\n"
    start = time.monotonic()
    assert_clean(summarize(hostile))
    assert time.monotonic() - start < 2


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_never_raises_on_arbitrary_bytes(data):
    assert_clean(summarize(data))


HEADERISH = st.lists(
    st.tuples(
        st.sampled_from([b"From", b"To", b"Cc", b"Subject", b"subject", b"X", b" ", b""]),
        st.sampled_from([b": ", b":", b" "]),
        st.lists(st.sampled_from([
            b"=?utf-8?b?", b"=?iso-2022-jp?B?", b"=?q?", b"?=", b"?Q?", b"=E6", b"_", b"<", b">",
            b'"', b",", b"@", b";", b":", b"(", b")", b"\\", b"\r\n ", b"\n", b"\r", b"\x00",
            b"\x1b$B", b"\x1b(B", b"\xe6\x97", b"a@b.example", b"\xe2\x80\xae", b"GyRC", b"==",
        ]), max_size=30).map(b"".join),
    ),
    max_size=8,
).map(lambda fields: b"\r\n".join(n + s + v for n, s, v in fields))


@settings(max_examples=500)
@given(HEADERISH)
def test_never_raises_on_header_like_bytes(data):
    assert_clean(summarize(data))


@given(st.text(max_size=200))
def test_decode_words_total(text):
    assert isinstance(decode_words(text), str)


# --- HeaderCollector ----------------------------------------------------------------------

MESSAGE = (b"From: a@x.example\r\nSubject: =?UTF-8?B?5pel5pys6Kqe?=\r\n\r\n"
           b"body line\r\nSubject: not this\r\n\r\nmore\r\n")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 10000])
def test_collector_in_chunks(size):
    collector = HeaderCollector()
    for i in range(0, len(MESSAGE), size):
        collector.feed(MESSAGE[i:i + size])
    assert collector.done
    assert collector.header_bytes() == MESSAGE[:MESSAGE.index(b"\r\n\r\n")]
    assert collector.summarize()["subject"] == "日本語"


def test_collector_is_bounded():
    collector = HeaderCollector()
    chunk = b"X-Long: " + b"a" * 1000 + b"\r\n"
    for _ in range(200):
        collector.feed(chunk)
        assert len(collector.header_bytes()) <= MAX_HEADER_BYTES
    assert collector.done
    assert len(collector.header_bytes()) == MAX_HEADER_BYTES


def test_collector_not_done_until_blank_line():
    collector = HeaderCollector()
    collector.feed(b"Subject: s\r\n")
    assert not collector.done
    collector.feed(b"\r")
    assert not collector.done
    collector.feed(b"\nbody")
    assert collector.done
    assert collector.header_bytes() == b"Subject: s"


def test_collector_message_without_header():
    collector = HeaderCollector()
    collector.feed(b"\r\nSubject: body\r\n\r\n")
    assert collector.done
    assert collector.header_bytes() == b""


@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=20))
def test_collector_matches_whole_parse(data, cuts):
    collector = HeaderCollector()
    pos = 0
    for cut in cuts:
        collector.feed(data[pos:pos + cut])
        pos += cut
    collector.feed(data[pos:])
    assert summarize(collector.header_bytes()) == summarize(data)


# --- fast paths agree with the general ones -----------------------------------------------

from firmware.summary import _WANTED_FIRST, _fields, _mailboxes, _parsed_mailboxes  # noqa: E402

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
SIMPLE_ADDRESS = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.lists(st.text(ATEXT, min_size=1, max_size=6), min_size=1, max_size=3).map(".".join),
    st.lists(st.text("abz09-", min_size=1, max_size=6), min_size=1, max_size=3).map(".".join),
)
SIMPLE_ITEM = st.builds(
    lambda left, addr, bracket, right: f"{left}<{addr}>{right}" if bracket else f"{left}{addr}{right}",
    st.sampled_from(["", " ", "\t", "  "]), SIMPLE_ADDRESS, st.booleans(),
    st.sampled_from(["", " ", "\t"]),
)


@settings(max_examples=300)
@given(st.lists(SIMPLE_ITEM, min_size=1, max_size=4).map(",".join))
def test_simple_address_lists_take_the_fast_path_and_agree(raw):
    from firmware.summary import _SIMPLE_LIST
    assert _SIMPLE_LIST.fullmatch(raw)
    assert _mailboxes(raw) == _parsed_mailboxes(raw)


@settings(max_examples=300)
@given(st.lists(st.one_of(SIMPLE_ITEM, st.sampled_from(
    ['"A, B" <a@b.example>', "(c) x@y.example", "a@", "@b", "<a@b", "a..b@c", "a@b..c", " ",
     "Name <n@m.example>", "=?utf-8?q?x?= <e@f.example>", "a@[1.2.3.4]", "x@y.example."])),
    min_size=1, max_size=4).map(",".join))
def test_address_lists_agree_with_the_general_parser(raw):
    assert _mailboxes(raw) == _parsed_mailboxes(raw)


@settings(max_examples=300)
@given(HEADERISH)
def test_wanted_field_filter_keeps_every_wanted_field(data):
    wanted = [(n, v) for n, v in _fields(data) if n[0].encode() in {b"f", b"t", b"c", b"s"}]
    assert _fields(data, _WANTED_FIRST) == wanted


def test_mail_without_a_blank_line_reads_only_the_wanted_fields():
    header = (b"From: <a@lan.example>\r\nTo: <b@ext.example>\r\nDate: Fri, 4 Dec 2026\r\n"
              + b"".join(b"%dXXXX\r\n" % i for i in range(50)))
    assert summarize(header) == {"from": "a@lan.example", "to": ["b@ext.example"], "cc": [],
                                 "subject": ""}
