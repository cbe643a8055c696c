"""ASGI middleware in front of every route: the API key and the request size limit.

Checked before the body is parsed, so an unauthorised or oversized request is refused as such
(401, 413) whatever its body holds. The body is read here (up to the limit) and replayed.
"""

from __future__ import annotations

import hmac
import json

from ragspec.server.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/metrics")


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, api_key: str | None, max_bytes: int, on_reject=None):
        self.app = app
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.on_reject = on_reject or (lambda status: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._check_headers(scope)
        body = None
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, error = await self._read_body(receive)
        if error is not None:
            self.on_reject(error.status)
            return await send_error(send, error)
        return await self.app(scope, _replay(body, receive) if body is not None else receive, send)

    def _check_headers(self, scope) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith(PROTECTED_PREFIXES):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def _read_body(self, receive) -> tuple[bytes | None, APIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, APIError(400, "client disconnected while sending the request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
