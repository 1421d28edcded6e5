"""The write-ahead log: framed msgpack records in segment files, group commit,
replay that drops a torn tail. Knows records, not SMTP nor the page."""

from ._framing import HEADER_SIZE, MAGIC, MAX_PAYLOAD, FrameDecoder, encode_frame
from ._records import Accept, Body, Finish, Record, Update, from_payload
from .log import Log, Recovered, StoreError

__all__ = [
    "Log", "Recovered", "StoreError",
    "Body", "Accept", "Update", "Finish", "Record", "from_payload",
    "encode_frame", "FrameDecoder", "MAGIC", "HEADER_SIZE", "MAX_PAYLOAD",
]
