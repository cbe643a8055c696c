"""The FastAPI app: OpenAI-compatible completions over one Engine, metrics, health, the web page."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ragspec.engine.request import GenerationRequest
from ragspec.errors import RagspecError
from ragspec.server.config import ServerConfig
from ragspec.server.errors import APIError, from_library, from_validation
from ragspec.server.guard import Guard
from ragspec.server.metrics import ServerMetrics
from ragspec.server.responses import Formatter, sse
from ragspec.engine.thread import EngineThread
from ragspec.server.runner import Feed, LoadPolicy, SourceSegments
from ragspec.server.schemas import ChatRequest, CompletionRequest

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "static" / "index.html"


class _EventStream(StreamingResponse):
    """SSE that, however it ends (done, client gone, cancelled), closes its generator and then
    runs `on_close` (which ends the request in the engine), shielded from cancellation."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            log.info("client disconnected mid-stream")
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._on_close()


class Server:
    """What the routes share: the engine, settings, metrics and the load policy."""

    def __init__(self, engine, config: ServerConfig, engine_thread: EngineThread | None = None):
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics()
        self.policy = LoadPolicy(config, engine_thread or EngineThread())
        self.model_id = config.model_id or engine.target.name

    async def complete(self, endpoint: str, body: ChatRequest | CompletionRequest, prompt, http: Request):
        started = time.perf_counter()
        if body.model != self.model_id:
            raise APIError(404, f"model {body.model!r} is not served here: use {self.model_id!r} (see /v1/models)",
                           param="model", code="model_not_found")
        try:
            request = GenerationRequest(prompt, **body.engine_options(self.config))
        except RagspecError as exc:
            raise from_library(exc) from exc
        feed = await self._open(request, started)
        speculative = self.engine.spec.enabled if feed.request.speculative is None else feed.request.speculative
        fmt = Formatter(chat=endpoint == "chat", model=self.model_id, speculative=speculative,
                        include_usage=bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            return _EventStream(self._events(feed, fmt), lambda: self._finish(feed, endpoint))
        return await self._whole(feed, fmt, endpoint, http)

    async def _open(self, request: GenerationRequest, started: float) -> Feed:
        admitted = self.policy.admit(request)
        self.metrics.in_flight.inc()
        try:
            feed = await Feed.open(self.engine, admitted, self.policy, started)
        except BaseException as exc:
            self.policy.release()
            self.metrics.in_flight.dec()
            if isinstance(exc, RagspecError):
                raise from_library(exc) from exc
            raise
        return feed

    async def _finish(self, feed: Feed, endpoint: str) -> None:
        """End the request (if it has not ended) and count it; runs once per request."""
        if feed.finished:
            return
        feed.finished = True
        try:
            await feed.close()
        finally:
            self.policy.release()
            self.metrics.in_flight.dec()
            if feed.result is not None:
                self.metrics.record(endpoint, feed.result, feed.first_token_s, time.perf_counter() - feed.started)

    async def _events(self, feed: Feed, fmt: Formatter):
        first = fmt.first_chunk()
        if first is not None:
            yield sse(first)
        segments = SourceSegments(self.engine.tokenizer)
        try:
            async for piece in feed:
                yield sse(fmt.piece_chunk(piece, segments.push(piece)))
        except Exception as exc:  # generation failed: the client learns it in-stream
            log.exception("generation failed")
            yield sse(APIError(500, f"generation failed: {type(exc).__name__}: {exc}").body())
            yield sse("[DONE]")
            return
        yield sse(fmt.final_chunk(feed.result))
        if fmt.include_usage:
            yield sse(fmt.usage_chunk(feed.result))
        yield sse("[DONE]")

    async def _whole(self, feed: Feed, fmt: Formatter, endpoint: str, http: Request):
        try:
            async for _ in feed:
                if await http.is_disconnected():
                    break
        except Exception as exc:
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            await self._finish(feed, endpoint)
        return JSONResponse(fmt.response(feed.result))


def create_app(engine, config: ServerConfig | None = None, engine_thread: EngineThread | None = None) -> FastAPI:
    """An ASGI app serving `engine` (run it with uvicorn, or `ragspec serve`). `engine_thread`:
    the thread that built the engine (see EngineThread); else a new one."""
    server = Server(engine, config or ServerConfig(), engine_thread)
    app = FastAPI(title="ragspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_error_handlers(app, server)
    _add_routes(app, server)
    app.add_middleware(Guard, api_key=server.config.api_key, max_bytes=server.config.max_request_bytes,
                       on_reject=lambda status: server.metrics.rejected.labels(str(status)).inc())
    return app


def _error_response(server: Server, error: APIError) -> JSONResponse:
    server.metrics.rejected.labels(str(error.status)).inc()
    return JSONResponse(error.body(), status_code=error.status)


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return _error_response(server, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return _error_response(server, from_validation(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return _error_response(server, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        log.error("request failed", exc_info=exc)
        return _error_response(server, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def _add_routes(app: FastAPI, server: Server) -> None:
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id, "requests_in_flight": server.policy.in_flight}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                             "owned_by": "ragspec"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request):
        return await server.complete("chat", body, body.prompt(), http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        return await server.complete("completions", body, body.prompt_text(), http)
