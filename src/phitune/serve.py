"""`phitune serve`: the base model and its adapters behind the OpenAI HTTP API.

POST /v1/chat/completions and /v1/completions (streaming over server-sent events or not), GET /v1/models.
One base model in memory; each adapter is its own model name. Requests are batched together on one
generation thread (scheduler.py), base and adapter rows in the same batch; a client that disconnects
frees its row within one step. Every route but /health and the page (/, /static; webui/) needs the key
when --api_key is set.
"""
import asyncio
import json
import sys
import threading
import time

from phitune import __version__
from phitune import generate as gen
from phitune import serve_api as api
from phitune.config import add_arguments, settings
from phitune.config_commands import Models, ServeArgs
from phitune.engine import Engine
from phitune.scheduler import Busy, Scheduler

GROUPS = {"model": Models, "serve": ServeArgs}


def add_parser(p):
    add_arguments(p, GROUPS)


def main(args):
    import uvicorn
    args = settings(args, GROUPS)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"phitune serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    loaded = gen.load(args.adapter_path, args.model, args.system_prompt, args.trust_remote_code, args.precision)
    app = build_app(loaded, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                    max_queue=args.max_queue, max_batch=args.max_batch, run_dirs=args.run_dir)
    names = ", ".join(["base", *loaded.adapters])
    print(f"phitune serve: models {names} on http://{args.host}:{args.port}/v1; page: http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def build_app(loaded, api_key=None, max_tokens_limit=1024, max_prompt_tokens=None, max_body_bytes=1_000_000,
              max_queue=64, max_batch=16, run_dirs=()):
    """The FastAPI app: OpenAI routes over one Scheduler (continuous batching on one generation thread)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError

    app = FastAPI(title="phitune", docs_url=None, redoc_url=None, openapi_url=None)
    scheduler = Scheduler(Engine(loaded, own_tokenizer=True), max_batch=max_batch, max_queue=max_queue)
    app.state.scheduler = scheduler
    models = ["base", *loaded.adapters]
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
    created = api.now()

    @app.exception_handler(api.ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise api.ApiError(401, "Incorrect or missing API key", code="invalid_api_key")

    async def read_body(request):
        """The body, refused as soon as it passes max_body_bytes (never read whole into memory first)."""
        too_big = api.ApiError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise too_big
        return bytes(body)

    async def parse(request, cls):
        check_key(request)
        body = await read_body(request)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise api.ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise api.ApiError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = cls.model_validate(payload)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            raise api.ApiError(400, f"{param}: {first['msg']}", code="invalid_value", param=param) from None
        if req.model not in models and req.model != loaded.base_name:
            raise api.ApiError(404, f"The model '{req.model}' does not exist; available: {', '.join(models)}",
                               code="model_not_found", param="model")
        if req.max_tokens is not None and req.max_tokens > max_tokens_limit:
            raise api.ApiError(400, f"max_tokens {req.max_tokens} is over this server's limit of {max_tokens_limit}",
                               code="invalid_value", param="max_tokens")
        return req

    def adapter_of(req):
        return None if req.model in ("base", loaded.base_name) else req.model

    def new_request(req, ids):
        max_tokens = req.max_tokens or min(256, max_tokens_limit)
        limit = context - max_tokens if max_prompt_tokens is None else min(max_prompt_tokens, context - max_tokens)
        if len(ids) > limit:
            raise api.ApiError(400, f"the prompt is {len(ids)} tokens; this model allows {limit} with max_tokens "
                                    f"{max_tokens} (context {context})", code="context_length_exceeded",
                               param="messages")
        sampling = gen.Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return loaded.request(ids, adapter_of(req), sampling, stop_strings=stops, cancel=threading.Event())

    async def respond(req, ids, kind):
        r = new_request(req, ids)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        r.on_text = lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece)
        r.on_done = lambda done: loop.call_soon_threadsafe(events.put_nowait, None)
        r.started = time.perf_counter()
        try:  # admission happens before any response starts, so a full queue is a real 429
            scheduler.submit(r)
        except Busy:
            raise api.ApiError(429, "server busy: too many queued requests, retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
        reply = api.Reply(kind, req.model, created)

        async def pieces():
            try:
                while (piece := await events.get()) is not None:
                    yield piece
            finally:  # also on client disconnect: the row leaves the batch at the next step
                r.cancel.set()

        if req.stream:
            async def sse():
                async for piece in pieces():
                    yield f"data: {json.dumps(reply.chunk(piece))}\n\n"
                if r.finish_reason == "error":
                    body = api.ApiError(500, f"generation failed: {r.error}", kind="server_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    yield f"data: {json.dumps(reply.last_chunk(r.finish_reason, len(ids), len(r.tokens)))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text = "".join([piece async for piece in pieces()])
        if r.finish_reason == "error":
            raise api.ApiError(500, f"generation failed: {r.error}", kind="server_error")
        return reply.whole(text.strip() if kind == "chat" else text, r.finish_reason, len(ids), len(r.tokens))

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": scheduler.active}

    @app.get("/openapi.json")
    async def openapi(request: Request):
        check_key(request)
        from fastapi.openapi.utils import get_openapi
        return get_openapi(title="phitune", version=__version__, routes=app.routes)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "phitune"}
                                           for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, api.ChatRequest)
        messages = [m.model_dump() for m in req.messages]
        if messages[-1]["role"] != "user":
            raise api.ApiError(400, "the last message must come from the user", param="messages")
        ids = loaded.template_for(adapter_of(req)).encode_prompt(messages)
        return await respond(req, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, api.CompletionRequest)
        ids = loaded.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise api.ApiError(400, "prompt is empty", param="prompt")
        return await respond(req, ids, "completion")

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(api.ApiError(404, f"unknown endpoint {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(api.ApiError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    from phitune import webui  # the page at / and its /phitune/* routes
    webui.mount(app, loaded, check_key, run_dirs=run_dirs, max_tokens_limit=max_tokens_limit)
    return app
