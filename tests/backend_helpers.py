"""The tests' live backend: the same background server the demo uses."""

from backend.server import BackgroundServer as LiveServer  # noqa: F401
