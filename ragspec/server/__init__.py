"""OpenAI-compatible HTTP server over an Engine (`ragspec serve`); needs the [server] extra."""

from __future__ import annotations

from ragspec.server.config import LOOPBACK_HOSTS, ServerConfig

__all__ = ["LOOPBACK_HOSTS", "ServerConfig", "create_app", "serve"]


def create_app(engine, config: ServerConfig | None = None, engine_thread=None):
    from ragspec.server.app import create_app as make

    return make(engine, config, engine_thread)


def serve(engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          engine_thread=None) -> None:
    """Serve until interrupted (blocking). `engine_thread`: the EngineThread that built `engine`."""
    import logging

    import uvicorn

    if host not in LOOPBACK_HOSTS and not config.api_key:
        logging.getLogger(__name__).warning("listening on %s without an API key: anyone who can reach this "
                                            "address can use the model (pass --api-key)", host)

    uvicorn.run(create_app(engine, config, engine_thread), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def check_installed() -> None:
    """A ConfigError naming the extra when the server's packages are missing."""
    import importlib.util

    from ragspec.errors import ConfigError

    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"ragspec serve needs {', '.join(missing)}: pip install 'ragspec[server]'")
