"""/metrics: Prometheus text exposition (format 0.0.4)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# store_status() key -> (metric, help); these are gauges.
_STORE_GAUGES = {
    "messages": ("matte_held_messages", "Messages held now."),
    "bytes": ("matte_held_bytes", "Bytes of held messages now."),
    "max_messages": ("matte_store_max_messages", "Configured limit of held messages."),
    "max_bytes": ("matte_store_max_bytes", "Configured limit of held bytes."),
}
_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _format(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _metric_name(prefix: str, key: str) -> str:
    name = _BAD_CHARS.sub("_", str(key)).strip("_").lower() or "unnamed"
    return f"{prefix}_{name}"


def _block(name: str, kind: str, help_text: str, value: float | int) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_format(value)}"]


def _is_gauge(key: str) -> bool:
    # statistics() holds counters; a value "now" is a level, not a count.
    return key.endswith("_now") or key.startswith("current_")


def _statistics(
    prefix: str, stats: Mapping[str, Any], what: str, skip: set[str], seen: set[str]
) -> Iterable[str]:
    for key, raw in stats.items():
        key = str(key)
        if key in skip:
            continue
        if isinstance(raw, Mapping):
            # A component's own statistics (e.g. the store's): their kinds are
            # not known here, so they are exported untyped.
            for sub, sub_raw in raw.items():
                value = _number(sub_raw)
                name = _metric_name(f"{prefix}_{_metric_name('', key)[1:]}", str(sub))
                if value is not None and name not in seen:
                    seen.add(name)
                    yield from _block(name, "untyped", f"{what}: {key} {sub}.", value)
            continue
        value = _number(raw)
        if value is None:
            continue  # textual entries are not metrics
        name = _metric_name(prefix, key)
        kind = "gauge"
        if not _is_gauge(key):
            kind = "counter"
            if not name.endswith("_total"):
                name += "_total"
        if name in seen:
            continue
        seen.add(name)
        yield from _block(name, kind, f"{what}: {key}.", value)


def render_metrics(
    store: Mapping[str, Any], stats: Mapping[str, Any], web: Mapping[str, Any] | None = None
) -> str:
    """The exposition text for the queue's store status and counters (and the web's own)."""
    lines: list[str] = []
    seen: set[str] = set()  # a name is exported once, first come first kept
    for key, (name, help_text) in _STORE_GAUGES.items():
        value = _number(store.get(key))
        if value is not None:
            seen.add(name)
            lines.extend(_block(name, "gauge", help_text, value))
    # store_status() keys repeated in statistics() are already gauges above.
    lines.extend(_statistics("matte", stats, "Hold queue", skip=set(_STORE_GAUGES), seen=seen))
    if web:
        lines.extend(_statistics("matte_web", web, "Web server", skip=set(), seen=seen))
    return "\n".join(lines) + "\n"
