"""OpenAI-compatible HTTP server over an Engine (`ragspec serve`); needs the [server] extra."""

from __future__ import annotations

from ragspec.server.config import LOOPBACK_HOSTS, ServerConfig

__all__ = ["LOOPBACK_HOSTS", "ServerConfig", "create_app", "serve"]


def create_app(engine, config: ServerConfig | None = None):
    from ragspec.server.app import create_app as make

    return make(engine, config)


def serve(engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(engine, config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
