import math

from firmware.web.metrics import CONTENT_TYPE, render_metrics

from .conftest import request


async def test_metrics_endpoint(port, queue):
    queue.add("127.0.0.1", size=1000)
    queue.add("127.0.0.2", size=500)
    reply = await request(port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == CONTENT_TYPE
    lines = reply.text.splitlines()
    assert "matte_held_messages 2" in lines
    assert "matte_held_bytes 1500" in lines
    assert "matte_store_max_messages 500" in lines
    assert "# TYPE matte_accepted_total counter" in lines
    assert "matte_accepted_total 5" in lines
    assert "matte_cancelled_total 1" in lines
    assert any(line.startswith("matte_web_requests_total ") for line in lines)


def _samples(text):
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" ")
            samples[name] = value
    return samples


def test_render_skips_non_numbers_and_sanitises_names():
    text = render_metrics(
        {"messages": 1, "bytes": 2.5, "max_messages": None},
        {"sent-now": 3, "note": "text", "flag": True, "deliveries_total": 4, "lat": math.inf},
    )
    samples = _samples(text)
    assert samples == {
        "matte_held_messages": "1",
        "matte_held_bytes": "2.5",
        "matte_sent_now_total": "3",
        "matte_deliveries_total": "4",
        "matte_lat_total": "+Inf",
    }
    assert text.endswith("\n")
    # every sample has HELP and TYPE lines
    for name in samples:
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text


def test_statistics_repeating_store_status_and_nested_stats():
    store = {"messages": 2, "bytes": 10, "max_messages": 5, "max_bytes": 100}
    stats = {"accepted": 7, **store, "held_now": 2, "store": {"segments": 3, "fsyncs": 9, "path": "x"}}
    text = render_metrics(store, stats)
    samples = _samples(text)
    assert samples == {
        "matte_held_messages": "2",
        "matte_held_bytes": "10",
        "matte_store_max_messages": "5",
        "matte_store_max_bytes": "100",
        "matte_accepted_total": "7",
        "matte_held_now": "2",
        "matte_store_segments": "3",
        "matte_store_fsyncs": "9",
    }
    assert "# TYPE matte_held_now gauge" in text
    assert "# TYPE matte_store_fsyncs untyped" in text
    assert len(set(samples)) == len([line for line in text.splitlines() if line.startswith("# TYPE")])


async def test_metrics_include_other_services_counters(nursery, queue):
    from firmware.web import serve_web

    from .conftest import make_app, request

    app = make_app(queue, services={"smtp": {"connections": 7, "refused": 1}})
    port = (await nursery.start(serve_web, [("127.0.0.1", 0)], app))[0][1]
    text = (await request(port, "GET", "/metrics")).text
    assert "matte_smtp_connections 7" in text and "matte_smtp_refused 1" in text
