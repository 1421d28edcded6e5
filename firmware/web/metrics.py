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


def _counters(prefix: str, stats: Mapping[str, Any], what: str) -> Iterable[str]:
    seen: set[str] = set()
    for key, raw in stats.items():
        value = _number(raw)
        if value is None:
            continue  # nested or textual entries are not counters
        name = _metric_name(prefix, key)
        if not name.endswith("_total"):
            name += "_total"
        if name in seen:
            continue
        seen.add(name)
        yield from _block(name, "counter", f"{what}: {key}.", value)


def render_metrics(
    store: Mapping[str, Any], stats: Mapping[str, Any], web: Mapping[str, Any] | None = None
) -> str:
    """The exposition text for the queue's store status and counters (and the web's own)."""
    lines: list[str] = []
    for key, (name, help_text) in _STORE_GAUGES.items():
        value = _number(store.get(key))
        if value is not None:
            lines.extend(_block(name, "gauge", help_text, value))
    lines.extend(_counters("matte", stats, "Hold queue count"))
    if web:
        lines.extend(_counters("matte_web", web, "Web server count"))
    return "\n".join(lines) + "\n"
