import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.wal import HEADER_SIZE, MAGIC, MAX_PAYLOAD, FrameDecoder, encode_frame

payloads = st.lists(st.binary(max_size=300), max_size=20)


def decode_all(data: bytes, step: int | None = None) -> tuple[list[bytes], FrameDecoder]:
    dec = FrameDecoder()
    out = []
    if step is None:
        dec.feed(data)
        out.extend(dec)
    else:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            out.extend(dec)
    return out, dec


def test_frame_layout():
    frame = encode_frame(b"hello")
    assert frame[:2] == MAGIC == b"MT"
    assert struct.unpack(">II", frame[2:10]) == (5, zlib.crc32(b"hello"))
    assert frame[HEADER_SIZE:] == b"hello"


@given(payloads)
def test_round_trip_whole(items):
    data = b"".join(map(encode_frame, items))
    out, dec = decode_all(data)
    assert out == items
    assert dec.offset == len(data) and dec.pending == 0 and dec.error is None


@given(payloads)
@settings(max_examples=50)
def test_round_trip_one_byte_at_a_time(items):
    data = b"".join(map(encode_frame, items))
    out, dec = decode_all(data, step=1)
    assert out == items
    assert dec.offset == len(data) and dec.pending == 0


@given(payloads, st.data())
def test_round_trip_arbitrary_splits(items, data):
    blob = b"".join(map(encode_frame, items))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=10)))
    dec = FrameDecoder()
    out = []
    prev = 0
    for c in cuts + [len(blob)]:
        dec.feed(blob[prev:c])
        out.extend(dec)
        prev = c
    assert out == items


def test_frame_offsets_reported():
    frames = [encode_frame(b"a" * n) for n in (0, 3, 100)]
    dec = FrameDecoder()
    dec.feed(b"".join(frames))
    starts = []
    while (f := dec.next_frame()) is not None:
        starts.append(f[0])
    assert starts == [0, len(frames[0]), len(frames[0]) + len(frames[1])]


@given(payloads, st.binary(min_size=1, max_size=40))
def test_trailing_partial_frame_is_pending(items, extra):
    good = b"".join(map(encode_frame, items))
    torn = encode_frame(extra)[: -1]  # one byte short
    out, dec = decode_all(good + torn)
    assert out == items
    assert dec.offset == len(good)
    assert dec.pending == len(torn)
    assert dec.error is None


def test_crc_mismatch_stops_decoding():
    a, b, c = encode_frame(b"first"), bytearray(encode_frame(b"second")), encode_frame(b"third")
    b[-1] ^= 0xFF
    out, dec = decode_all(a + bytes(b) + c)
    assert out == [b"first"]
    assert dec.error == "CRC mismatch"
    assert dec.offset == len(a)
    # Nothing after the damage is ever returned, even if more is fed.
    dec.feed(encode_frame(b"later"))
    assert list(dec) == []


def test_bad_magic_and_huge_length():
    out, dec = decode_all(encode_frame(b"x") + b"XX" + b"\0" * 20)
    assert out == [b"x"] and "magic" in dec.error
    huge = MAGIC + struct.pack(">II", MAX_PAYLOAD + 1, 0)
    out, dec = decode_all(huge)
    assert out == [] and "exceeds" in dec.error and dec.offset == 0


def test_encode_refuses_oversized_payload():
    with pytest.raises(ValueError):
        encode_frame(b"\0" * (MAX_PAYLOAD + 1))


@given(st.binary(max_size=500))
def test_garbage_never_raises(blob):
    for step in (1, 7, len(blob) or 1):
        out, dec = decode_all(blob, step=step)
        assert dec.offset <= len(blob)
        assert dec.offset + dec.pending <= len(blob) or dec.error is not None


def test_start_offset():
    dec = FrameDecoder(start=100)
    dec.feed(encode_frame(b"abc"))
    assert dec.next_frame() == (100, b"abc")
    assert dec.offset == 100 + HEADER_SIZE + 3
