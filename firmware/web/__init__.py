"""The web server: the /mail page, the JSON API under /api/, /metrics."""

from .context import HoldQueueLike, token_for
from .routes import WebApp, serve_web

__all__ = ["serve_web", "WebApp", "HoldQueueLike", "token_for"]
