import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.wal import Accept, Body, Finish, Update, from_payload

ids = st.binary(min_size=16, max_size=16)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) \
    | st.binary(max_size=20) | st.floats(allow_nan=False)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)
dicts = st.dictionaries(st.text(max_size=10), values, max_size=5)
records = st.one_of(
    st.builds(Body, ids, st.integers(0, 2**40), st.binary(max_size=200)),
    st.builds(Accept, ids, st.integers(0, 2**40), dicts),
    st.builds(Update, ids, dicts),
    st.builds(Finish, ids, st.text(max_size=20)),
)


@given(records)
def test_round_trip(rec):
    payload = rec.to_payload()
    assert from_payload(payload) == rec
    assert type(rec).from_payload(payload) == rec


def test_tags_first():
    i = os.urandom(16)
    assert Body(i, 0, b"x").to_payload()[1:2] == b"\xa1"  # fixstr of length 1
    assert [from_payload(r.to_payload()).TAG for r in
            (Body(i, 0, b""), Accept(i, 0, {}), Update(i, {}), Finish(i, "done"))] == list("BAUF")


def test_validation():
    with pytest.raises(ValueError):
        Body(b"short", 0, b"")
    with pytest.raises(ValueError):
        Body(os.urandom(16), -1, b"")
    with pytest.raises(TypeError):
        Accept(os.urandom(16), 1, [])


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x90", b"\x91\xa1Z", b"\x92\xa1F\x01",
                                     b"\x93\xa1B\xc4\x01x\x00"])
def test_bad_payloads_are_value_errors(payload):
    with pytest.raises(ValueError):
        from_payload(payload)


def test_typed_from_payload_checks_type():
    with pytest.raises(ValueError):
        Accept.from_payload(Finish(os.urandom(16), "x").to_payload())
