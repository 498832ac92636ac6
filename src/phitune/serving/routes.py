"""The OpenAI-compatible HTTP routes of `phitune serve` (and `compare --web`): one FastAPI app over one
loaded base model and its adapters.

POST /v1/chat/completions and /v1/completions (streaming over server-sent events or not), GET /v1/models.
Requests are batched together on one generation thread (generation/scheduler.py), base and adapter rows
in the same batch; a client that disconnects frees its row within one step. Every route but /health and
the page (/, /static; webui/) needs the key when an api_key is set. guard.py keeps other web pages out
(Host names, cross-origin POSTs, JSON bodies only). Prompts are tokenised off the event loop, so one long
prompt stalls no stream and no /health.
"""
import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from typing import Optional

from fastapi import FastAPI, Request

from phitune import __version__
from phitune.generation import load as gen
from phitune.generation.engine import Engine
from phitune.generation.engine import Request as EngineRequest
from phitune.generation.scheduler import Busy, Scheduler
from phitune.serving import schemas as api
from phitune.serving.guard import Guard
from phitune.serving.logprobs import TokenTexts

# On Ctrl-C uvicorn waits for open responses to end before the app's shutdown; a stream may run for
# thousands of tokens, so open responses get this long, then they are cancelled (see server()).
SHUTDOWN_GRACE_S = 2


class OpenAIRoutes:
    """What each route does: parse and check a request, queue it, stream or return its answer."""

    def __init__(self, loaded: gen.Loaded, scheduler: Scheduler, api_key: Optional[str] = None,
                 max_tokens_limit: int = 1024, max_prompt_tokens: Optional[int] = None,
                 max_body_bytes: int = 1_000_000):
        self.loaded, self.scheduler, self.api_key = loaded, scheduler, api_key
        self.max_tokens_limit, self.max_prompt_tokens, self.max_body_bytes = (max_tokens_limit, max_prompt_tokens,
                                                                              max_body_bytes)
        self.models = ["base", *loaded.adapters]
        self.context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
        self.created = api.now()
        self._tokenizing = threading.Lock()  # the routes' tokenizer is not safe to use from two threads at once
        self._texts: Optional[TokenTexts] = None

    def check_key(self, request: Request) -> None:
        """401 unless the request carries 'Authorization: Bearer KEY' (any case of 'Bearer') when a key is set."""
        if not self.api_key:
            return
        scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise api.ApiError(401, "Incorrect or missing API key", code="invalid_api_key")

    async def off_loop(self, fn, *args):
        """fn(*args) on a worker thread, one call at a time: tokenising a long prompt takes seconds that the
        event loop (every other stream, /health) must not wait for."""
        def locked():
            with self._tokenizing:
                return fn(*args)
        return await asyncio.to_thread(locked)

    async def token_texts(self) -> TokenTexts:
        if self._texts is None:
            self._texts = await self.off_loop(TokenTexts, self.loaded.tokenizer)
        return self._texts

    async def read_body(self, request: Request) -> bytes:
        """The body, refused as soon as it passes max_body_bytes (never read whole into memory first)."""
        too_big = api.ApiError(413, f"request body over {self.max_body_bytes} bytes", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > self.max_body_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise too_big
        return bytes(body)

    async def read_json(self, request: Request) -> object:
        """The key checked, then the body (at most max_body_bytes) parsed as JSON: what every POST route reads."""
        self.check_key(request)
        body = await self.read_body(request)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise api.ApiError(400, "request body is not valid JSON", code="invalid_json") from None

    async def parse(self, request: Request, cls: type) -> api.Common:
        req = api.validate(cls, await self.read_json(request))
        if req.model not in self.models and req.model != self.loaded.base_name:
            raise api.ApiError(404, f"The model '{req.model}' does not exist; available: {', '.join(self.models)}",
                               code="model_not_found", param="model")
        limit, field = req.token_limit
        if limit is not None and limit > self.max_tokens_limit:
            raise api.ApiError(400, f"{field} {limit} is over this server's limit of {self.max_tokens_limit}",
                               code="invalid_value", param=field)
        return req

    def adapter_of(self, req: api.Common) -> Optional[str]:
        return None if req.model in ("base", self.loaded.base_name) else req.model

    def new_request(self, req: api.Common, ids: list) -> EngineRequest:
        max_tokens = req.token_limit[0] or min(256, self.max_tokens_limit)
        limit = self.context - max_tokens
        if self.max_prompt_tokens is not None:
            limit = min(self.max_prompt_tokens, limit)
        if len(ids) > limit:
            raise api.ApiError(400, f"the prompt is {len(ids)} tokens; this model allows {limit} with max_tokens "
                                    f"{max_tokens} (context {self.context})", code="context_length_exceeded",
                               param="messages")
        sampling = gen.Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return self.loaded.request(ids, self.adapter_of(req), sampling, stop_strings=stops, cancel=threading.Event(),
                                   logprobs=req.top_k)

    @staticmethod
    async def _cancel_on_disconnect(request: Request, r: EngineRequest) -> None:
        """A whole (non-streamed) answer has no stream to break: watch the connection instead."""
        while not r.done:
            if await request.is_disconnected():
                r.cancel.set()
                return
            await asyncio.sleep(0.25)

    async def respond(self, req: api.Common, ids: list, kind: str, request: Optional[Request] = None) -> object:
        """Queue the request (a full queue is a 429 before any response starts), then stream or collect it.

        A streamed answer and a whole one are the same text, as generated (OpenAI strips neither)."""
        from fastapi.responses import StreamingResponse
        r = self.new_request(req, ids)
        texts = await self.token_texts() if r.logprobs is not None else None
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        # with each piece: how many tokens were generated by then, so its logprobs go out with it
        r.on_text = lambda piece: loop.call_soon_threadsafe(events.put_nowait, (piece, len(r.tokens)))
        r.on_done = lambda done: loop.call_soon_threadsafe(events.put_nowait, None)
        r.started = time.perf_counter()
        try:
            self.scheduler.submit(r)
        except Busy:
            raise api.ApiError(429, "server busy: too many queued requests, retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
        reply = api.Reply(kind, req.model, api.now(), include_usage=req.include_usage)
        sent = 0  # tokens whose logprobs went out

        def entries(upto):
            nonlocal sent
            if texts is None:
                return None
            out, sent = texts.entries(r.tokens, r.token_logprobs, sent, upto, r.stop_ids), max(sent, upto)
            return out

        async def pieces():
            try:
                while (event := await events.get()) is not None:
                    yield event
            finally:  # also on client disconnect: the row leaves the batch at the next step
                r.cancel.set()

        if req.stream:
            async def sse():
                async for piece, upto in pieces():
                    yield f"data: {json.dumps(reply.chunk(piece, entries(upto)))}\n\n"
                if r.finish_reason == "error":
                    body = api.ApiError(500, f"generation failed: {r.error}", kind="server_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    last = reply.last_chunk(r.finish_reason, len(ids), len(r.tokens), entries(len(r.tokens)))
                    yield f"data: {json.dumps(last)}\n\n"
                    if req.include_usage:
                        yield f"data: {json.dumps(reply.usage_chunk(len(ids), len(r.tokens)))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        watch = asyncio.ensure_future(self._cancel_on_disconnect(request, r)) if request is not None else None
        try:
            text = "".join([piece async for piece, _ in pieces()])
        finally:
            if watch is not None:
                watch.cancel()
        if r.finish_reason == "error":
            raise api.ApiError(500, f"generation failed: {r.error}", kind="server_error")
        return reply.whole(text, r.finish_reason, len(ids), len(r.tokens), entries(len(r.tokens)))

    async def chat(self, request: Request) -> object:
        req = await self.parse(request, api.ChatRequest)
        messages = [m.model_dump() for m in req.messages]
        if messages[-1]["role"] != "user":
            raise api.ApiError(400, "the last message must come from the user", param="messages")
        ids = await self.off_loop(self.loaded.template_for(self.adapter_of(req)).encode_prompt, messages)
        return await self.respond(req, ids, "chat", request)

    async def completions(self, request: Request) -> object:
        req = await self.parse(request, api.CompletionRequest)
        ids = await self.off_loop(lambda: self.loaded.tokenizer(req.prompt)["input_ids"])
        if not ids:
            raise api.ApiError(400, "prompt is empty", param="prompt")
        return await self.respond(req, ids, "completion", request)

    def model_list(self, request: Request) -> dict:
        self.check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created,
                                            "owned_by": "phitune"} for m in self.models]}


def build_app(loaded: gen.Loaded, api_key: Optional[str] = None, max_tokens_limit: int = 1024,
              max_prompt_tokens: Optional[int] = None, max_body_bytes: int = 1_000_000, max_queue: int = 64,
              max_batch: int = 16, run_dirs: tuple = (), host: Optional[str] = None,
              allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app: OpenAI routes over one Scheduler (continuous batching on one generation thread).

    host: the address the server is bound to; requests must name it (or localhost, an IP address, or one of
    allowed_hosts) as their Host. None: no Host check (an app that is not bound to a port)."""
    from fastapi import FastAPI
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse

    from phitune.serving import webui

    scheduler = Scheduler(Engine(loaded, own_tokenizer=True), max_batch=max_batch, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # Shutdown: end the rows in flight (their streams close) and stop the generation thread.
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    app = FastAPI(title="phitune", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, host=host, allowed_hosts=tuple(allowed_hosts))
    app.state.scheduler = scheduler
    routes = OpenAIRoutes(loaded, scheduler, api_key, max_tokens_limit, max_prompt_tokens, max_body_bytes)

    @app.exception_handler(api.ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(api.ApiError(404, f"unknown endpoint {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(api.ApiError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": scheduler.active}

    @app.get("/openapi.json")
    async def openapi(request: Request):
        routes.check_key(request)
        return get_openapi(title="phitune", version=__version__, routes=app.routes)

    @app.get("/v1/models")
    async def list_models(request: Request):
        return routes.model_list(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await routes.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.completions(request)

    webui.mount(app, loaded, routes, run_dirs=run_dirs, max_tokens_limit=max_tokens_limit)
    return app


def server(app: FastAPI, host: str, port: int):
    """The uvicorn server that `serve` and `compare --web` run: on Ctrl-C open responses get SHUTDOWN_GRACE_S
    seconds, then the app's shutdown ends the rows still in flight and stops the generation thread."""
    import uvicorn
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                         timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
