"""DataReader's content checks (bare CR/LF, NUL, line length) give the same verdicts, and the
reader the same content, as the straightforward per-chunk reference they replaced."""

from hypothesis import given, settings, strategies as st

from firmware.smtp import MAX_TEXT_LINE
from firmware.smtp._readers import DataReader


class ReferenceReader(DataReader):
    """The former _check: counts for CR/LF pairs, a walk from LF to LF for line lengths."""

    def _check(self, raw: bytes) -> None:
        lf = raw.count(b"\n")
        if lf != raw.count(b"\r") or lf != raw.count(b"\r\n"):
            self.error = "bare"
            return
        if b"\x00" in raw:
            self.error = "nul"
            return
        n = len(raw)
        start = -self.line_len
        while True:
            end = start + MAX_TEXT_LINE
            if end > n:
                j = raw.rfind(b"\n", max(start, 0))
                if j != -1:
                    start = j + 1
                self.line_len = n - start
                return
            j = raw.rfind(b"\n", max(start, 0), end)
            if j == -1:
                self.error = "long"
                return
            start = j + 1


def verdict(error) -> str | None:
    if error is None or isinstance(error, str):
        return error
    text = str(error.reply)
    return "bare" if "bare CR" in text else "nul" if "NUL" in text else "long"


PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\x00", b"a", b"xy", b"\r\n.",
                          b"\r\n.\r\n", b"z" * 300, b"w" * 997, b"v" * 998, b"u" * 999])


def run(reader, stream: bytes, cuts: list[int]):
    buf = bytearray()
    out, pos, ended = [], 0, False
    for cut in cuts + [len(stream)]:
        buf += stream[pos:pos + cut] if cut != len(stream) else stream[pos:]
        pos = min(len(stream), pos + cut)
        while not ended:
            chunk, ended = reader.read(buf)
            if chunk:
                out.append(chunk)
            if not chunk and not ended:
                break
    return b"".join(out), ended, verdict(reader.error), reader.line_len


@settings(max_examples=1500)
@given(st.lists(PIECES, max_size=40).map(b"".join), st.lists(st.integers(1, 1200), max_size=8))
def test_same_verdicts_and_content_as_the_reference(stream, cuts):
    assert run(DataReader(), stream, cuts) == run(ReferenceReader(), stream, cuts)


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.lists(st.integers(1, 700), max_size=8))
def test_same_on_arbitrary_bytes(stream, cuts):
    assert run(DataReader(), stream, cuts) == run(ReferenceReader(), stream, cuts)


# -- the sending side: canonical CRLF and dot-stuffing --------------------------------------

from firmware.smtp._writers import DotStuffer, _crlf_only  # noqa: E402


@settings(max_examples=1000)
@given(st.lists(PIECES, max_size=30).map(b"".join))
def test_crlf_only_matches_counting(data):
    lf = data.count(b"\n")
    assert _crlf_only(data) == (lf == data.count(b"\r") == data.count(b"\r\n"))


@settings(max_examples=500)
@given(st.lists(PIECES, max_size=30).map(b"".join), st.lists(st.integers(1, 400), max_size=6))
def test_stuffed_output_is_canonical_and_reads_back(body, cuts):
    stuffer, out, pos = DotStuffer(), [], 0
    for cut in cuts:
        out.append(stuffer.feed(body[pos:pos + cut]))
        pos += cut
    out.append(stuffer.feed(body[pos:]))
    out.append(stuffer.end())
    wire = b"".join(out)
    assert wire.count(b"\n") == wire.count(b"\r") == wire.count(b"\r\n")
    canonical = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if b"\x00" in canonical or any(len(l) + l.startswith(b".") > 998 for l in canonical.split(b"\r\n")):
        return  # the reader would refuse it; the stuffer's part is only the framing
    reader, buf = DataReader(), bytearray(wire)
    got, ended = [], False
    while not ended:
        chunk, ended = reader.read(buf)
        if chunk:
            got.append(chunk)
    expected = canonical if canonical.endswith(b"\r\n") or not canonical else canonical + b"\r\n"
    assert b"".join(got) == expected and reader.error is None


DOTTY = st.sampled_from([b"\r\n", b".", b"..", b"\r\n.", b"a", b"a.b", b"\n", b"\r", b"x" * 40])


@settings(max_examples=1000)
@given(st.lists(DOTTY, max_size=40).map(b"".join))
def test_dot_stuffing_by_probes_matches_replace(data):
    from firmware.smtp._writers import _stuff_dots

    assert _stuff_dots(data) == data.replace(b"\n.", b"\n..")


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"\r\n", b"\r\n.", b".", b"a.", b"xy", b"z" * 300]),
                max_size=30).map(b"".join),
       st.lists(st.integers(1, 400), max_size=6))
def test_canonical_content_stuffed_the_same_without_the_crlf_pass(body, cuts):
    """Content already canonical (what the server side stores) may skip the line-end pass:
    the bytes on the wire are the same as with it, wherever the chunks are cut (also between
    a CR and its LF)."""
    wires = []
    for canonical in (False, True):
        stuffer, out, pos = DotStuffer(), [], 0
        for cut in cuts:
            out.append(stuffer.feed(body[pos:pos + cut], canonical))
            pos += cut
        out.append(stuffer.feed(body[pos:], canonical))
        out.append(stuffer.end())
        wires.append(b"".join(out))
    assert wires[0] == wires[1]
    assert wires[1].count(b"\n") == wires[1].count(b"\r") == wires[1].count(b"\r\n")


def test_client_sends_canonical_chunks_dot_stuffed():
    from firmware.smtp import CLIENT, Connection, Data, DataChunk, EndOfData, Hello, MailFrom
    from firmware.smtp import RcptTo

    conn = Connection(CLIENT)
    conn.receive_data(b"220 hi\r\n")
    assert conn.next_event().code == 220
    for event, reply in [(Hello("EHLO", "a.example"), b"250 ok\r\n"),
                         (MailFrom("a@a.example"), b"250 ok\r\n"),
                         (RcptTo("b@b.example"), b"250 ok\r\n"), (Data(), b"354 go\r\n")]:
        conn.send(event)
        conn.receive_data(reply)
        conn.next_event()
    wire = conn.send(DataChunk(b".one\r\ntwo\r\n", canonical=True))
    wire += conn.send(DataChunk(b".three\r\n", canonical=True)) + conn.send(EndOfData())
    assert wire == b"..one\r\ntwo\r\n..three\r\n.\r\n"
    assert DataChunk(b"x", canonical=True) == DataChunk(b"x")
