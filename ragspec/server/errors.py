"""Errors the server answers with, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from dataclasses import dataclass

from ragspec.errors import IndexNotFound, RagspecError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


@dataclass
class APIError(Exception):
    """A request the server refuses or could not serve."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def from_library(exc: RagspecError) -> APIError:
    """A library error raised while setting a request up: the request was at fault."""
    status = 404 if isinstance(exc, IndexNotFound) else 400
    return APIError(status, " ".join(str(exc).split()), code=type(exc).__name__)


def from_validation(errors: list[dict]) -> APIError:
    """pydantic's errors, the first one named with its field path."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    path = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(400, f"{path}: {message}{more}" if path else f"{message}{more}", param=path or None)
