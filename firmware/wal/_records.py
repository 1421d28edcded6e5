"""Log records: msgpack arrays with a one-letter type tag first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

ID_SIZE = 16


def _check_id(id: bytes) -> None:
    if type(id) is not bytes or len(id) != ID_SIZE:
        raise ValueError(f"id must be {ID_SIZE} bytes, got {id!r}")


def _check_count(name: str, value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True, slots=True)
class Body:
    """A piece of a message body; offset 0 starts (or restarts) the body."""

    id: bytes
    offset: int
    data: bytes

    TAG: ClassVar[str] = "B"

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_count("offset", self.offset)
        if not isinstance(self.data, bytes):
            raise TypeError("data must be bytes")

    def to_payload(self) -> bytes:
        # data last: its bytes are the payload's last len(data) bytes, so the
        # log can point at them in the file instead of keeping them.
        return msgpack.packb(("B", self.id, self.offset, self.data))


@dataclass(frozen=True, slots=True)
class Accept:
    """The message exists from here on: its body is complete and ``size`` long."""

    id: bytes
    size: int
    meta: dict

    TAG: ClassVar[str] = "A"

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_count("size", self.size)
        if not isinstance(self.meta, dict):
            raise TypeError("meta must be a dict")

    def to_payload(self) -> bytes:
        return msgpack.packb(("A", self.id, self.size, self.meta))


@dataclass(frozen=True, slots=True)
class Update:
    id: bytes
    changes: dict

    TAG: ClassVar[str] = "U"

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.changes, dict):
            raise TypeError("changes must be a dict")

    def to_payload(self) -> bytes:
        return msgpack.packb(("U", self.id, self.changes))


@dataclass(frozen=True, slots=True)
class Finish:
    """The message is done; its space can be reclaimed."""

    id: bytes
    outcome: str

    TAG: ClassVar[str] = "F"

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.outcome, str):
            raise TypeError("outcome must be a str")

    def to_payload(self) -> bytes:
        return msgpack.packb(("F", self.id, self.outcome))


Record = Body | Accept | Update | Finish

_BY_TAG: dict[str, Any] = {"B": Body, "A": Accept, "U": Update, "F": Finish}


def from_payload(payload: bytes) -> Record:
    """Decode one payload; ValueError when it is not a record of ours."""
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable record: {exc}") from None
    if not isinstance(fields, list) or not fields:
        raise ValueError("record is not a non-empty array")
    cls = _BY_TAG.get(fields[0]) if isinstance(fields[0], str) else None
    if cls is None:
        raise ValueError(f"unknown record tag {fields[0]!r}")
    try:
        return cls(*fields[1:])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed {cls.__name__} record: {exc}") from None


def to_payload(record: Record) -> bytes:
    return record.to_payload()


def _typed_from_payload(cls, payload: bytes):
    record = from_payload(payload)
    if not isinstance(record, cls):
        raise ValueError(f"expected a {cls.__name__} record, got {type(record).__name__}")
    return record


for _cls in (Body, Accept, Update, Finish):
    _cls.from_payload = classmethod(_typed_from_payload)
del _cls
