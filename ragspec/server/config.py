"""Server settings: limits, authentication, the default index and the load policy."""

from __future__ import annotations

from dataclasses import dataclass

from ragspec.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """`api_key`: when set, /v1/* and /metrics need `Authorization: Bearer <key>`.
    `index`: the index of requests that name none (`"index": null` in a request asks for none).
    `spec_max_in_flight`: a request admitted while more than this many are in flight (itself
    included) runs without speculation; None never turns it off (see README, load policy)."""

    api_key: str | None = None
    index: str | None = None
    k: int = 5
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096  # a request asking for more gets a 400
    default_max_tokens: int | None = None  # for a request that names none; None: min(1024, the limit)
    max_in_flight: int = 64  # requests generating at once; more wait for a worker
    spec_max_in_flight: int | None = None
    model_id: str | None = None  # the id /v1/models lists (default: the model's name)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty: pass a non-empty --api-key, or none")
        if self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        for name in ("max_request_bytes", "max_tokens_limit", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens is not None and not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens must be 1 to max_tokens_limit ({self.max_tokens_limit}), "
                              f"got {self.default_max_tokens}")
        if self.spec_max_in_flight is not None and self.spec_max_in_flight < 1:
            raise ConfigError(f"spec_max_in_flight must be >= 1 or None, got {self.spec_max_in_flight}")

    @property
    def max_tokens_default(self) -> int:
        return self.default_max_tokens or min(1024, self.max_tokens_limit)
