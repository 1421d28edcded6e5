import datetime
import json
import logging
import os
import threading
from pathlib import Path

import pytest

import firmware.audit as audit_module
from firmware.audit import AuditLog


def read_lines(path):
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("ascii").split("\n")[:-1]]


def test_one_json_line_per_event(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"  # parent created on demand
    with AuditLog(path) as audit:
        audit.write("accept", id=b"\x01\x02", sender="a@x.example", size=12,
                    recipients=["b@y.example"], held=True)
        audit.write("cancel", id=b"\x01\x02", ip="192.0.2.1")
    first, second = read_lines(path)
    assert first["event"] == "accept"
    assert first["id"] == "0102"
    assert first["sender"] == "a@x.example"
    assert first["size"] == 12 and first["held"] is True
    assert first["recipients"] == ["b@y.example"]
    assert second == {"ts": second["ts"], "event": "cancel", "id": "0102", "ip": "192.0.2.1"}
    assert list(first)[:2] == ["ts", "event"]
    assert audit.statistics()["written"] == 2


def test_timestamp_is_utc_iso8601(tmp_path):
    audit = AuditLog(tmp_path / "a.jsonl")
    before = datetime.datetime.now(datetime.timezone.utc)
    audit.write("release")
    audit.close()
    (line,) = read_lines(tmp_path / "a.jsonl")
    assert line["ts"].endswith("Z")
    ts = datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() == datetime.timedelta(0)
    assert abs((ts - before).total_seconds()) < 5


def test_appends_and_is_flushed_at_once(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as earlier:
        earlier.write("one")
    audit = AuditLog(path)
    audit.write("two")
    audit.flush()
    # visible to another reader without close(): line-buffered
    assert [line["event"] for line in read_lines(path)] == ["one", "two"]
    audit.close()


def test_hostile_text_stays_on_one_line(tmp_path):
    path = tmp_path / "a.jsonl"
    subject = "evil\r\n{\"event\": \"forged\"}\u2028\u2029\x00\u202e\udcff 日本語"
    with AuditLog(path) as audit:
        audit.write("accept", subject=subject)
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1 and b"\r" not in raw
    (line,) = read_lines(path)
    assert line["subject"] == subject
    assert line["event"] == "accept"


def test_ts_and_event_cannot_be_overridden(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as audit:
        audit.write("accept", **{"ts": "forged"})
    (line,) = read_lines(tmp_path / "a.jsonl")
    assert line["ts"] != "forged" and line["event"] == "accept"


def test_odd_values_are_stringified(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as audit:
        audit.write("x", path=Path("/a/b"), when=datetime.date(2024, 1, 2), tags={"b", "a"})
    (line,) = read_lines(tmp_path / "a.jsonl")
    assert line["path"] == "/a/b" and line["when"] == "2024-01-02" and line["tags"] == ["a", "b"]


def test_unwritable_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    audit = AuditLog(blocker / "audit.jsonl")  # parent is a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="firmware.audit"):
        audit.write("accept", id=b"\x00")
        audit.write("accept", id=b"\x01")
        audit.flush()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning per run of failures
    assert "audit event dropped" in warnings[0].getMessage()
    assert audit.statistics() == {"written": 0, "dropped": 2, "failing": True}


def test_recovers_after_failure(tmp_path, caplog):
    blocker = tmp_path / "d"
    blocker.write_text("")
    audit = AuditLog(blocker / "audit.jsonl")
    audit.write("lost")
    audit.flush()
    os.unlink(blocker)
    with caplog.at_level(logging.WARNING, logger="firmware.audit"):
        audit.write("kept")
        audit.flush()
    assert [line["event"] for line in read_lines(blocker / "audit.jsonl")] == ["kept"]
    assert "written again" in caplog.text
    audit.close()


def test_unencodable_fields_are_dropped_with_a_warning(tmp_path, caplog):
    cyclic = []
    cyclic.append(cyclic)
    audit = AuditLog(tmp_path / "a.jsonl")
    with caplog.at_level(logging.WARNING, logger="firmware.audit"):
        audit.write("bad", loop=cyclic)
        audit.write("bad", keys={b"k": 1})
    assert audit.statistics()["dropped"] == 2
    assert "cannot encode" in caplog.text
    audit.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_never_raises(caplog):
    audit = AuditLog("/dev/full")
    with caplog.at_level(logging.WARNING, logger="firmware.audit"):
        audit.write("accept")
        audit.flush()
    assert audit.statistics()["dropped"] == 1
    assert "No space left" in caplog.text


def test_the_log_moves_to_a_numbered_file_before_it_grows_past_its_limit(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=300, keep=2) as audit:
        for n in range(40):
            audit.write("accept", n=n)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]  # the oldest deleted
    for name in files:
        assert 0 < (tmp_path / name).stat().st_size <= 300
    kept = [line["n"] for name in reversed(files) for line in read_lines(tmp_path / name)]
    assert kept == list(range(40 - len(kept), 40))  # the newest events, in order, none torn
    assert audit.statistics()["written"] == 40


def test_a_log_left_near_its_limit_moves_on_at_the_next_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text(json.dumps({"event": "before"}) + "\n")
    with AuditLog(path, max_bytes=len(path.read_bytes()) + 10, keep=1) as audit:
        audit.write("after a restart")
    assert [e["event"] for e in read_lines(path.with_name("audit.jsonl.1"))] == ["before"]
    assert [e["event"] for e in read_lines(path)] == ["after a restart"]


def test_a_line_longer_than_the_limit_is_still_written_whole(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_bytes=50, keep=1) as audit:
        audit.write("small")
        audit.write("large", subject="s" * 200)
        audit.write("small again")
    assert [e["event"] for e in read_lines(path.with_name("audit.jsonl.1"))] == ["large"]
    assert [e["event"] for e in read_lines(path)] == ["small again"]


def test_writing_never_waits_for_the_disk(tmp_path):
    """The event loop calls write(): it only queues the line. Here the "disk" is a FIFO nobody
    reads yet, where opening for writing blocks; write() returns all the same."""
    path = tmp_path / "audit.jsonl"
    os.mkfifo(path)
    audit = AuditLog(path)
    caller = threading.Thread(target=audit.write, args=("accept",), kwargs={"n": 1}, daemon=True)
    caller.start()
    caller.join(10)
    assert not caller.is_alive()  # returned while the file could not even be opened
    reader = os.open(path, os.O_RDONLY)  # lets the log's thread open and write
    try:
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(reader, 4096)
    finally:
        audit.close()
        os.close(reader)
    assert json.loads(line)["event"] == "accept"
    assert audit.statistics() == {"written": 1, "dropped": 0, "failing": False}


def test_lines_beyond_what_the_disk_can_take_are_dropped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_module, "MAX_QUEUED_LINES", 3)
    path = tmp_path / "audit.jsonl"
    os.mkfifo(path)  # nothing is written until a reader comes
    audit = AuditLog(path)
    for n in range(20):
        audit.write("accept", n=n)
    # at most 3 wait, and the thread holds at most the 3 it took before the FIFO blocked it
    assert audit.statistics()["dropped"] >= 20 - 2 * 3
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        audit.flush()
        data = os.read(reader, 65536)
    finally:
        audit.close()
        os.close(reader)
    got = [json.loads(line)["n"] for line in data.decode().splitlines()]
    stats = audit.statistics()
    assert got == list(range(stats["written"]))  # the oldest kept, in order, none torn
    assert stats["written"] + stats["dropped"] == 20
