"""`phitune serve`: the base model and its adapters behind the OpenAI HTTP API.

POST /v1/chat/completions and /v1/completions (streaming over server-sent events or not), GET /v1/models.
One base model in memory; each adapter is its own model name. Requests are queued and run one at a time
on a single generation thread; a client that disconnects stops its generation.
"""
import asyncio
import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Union

from phitune import generate as gen
from phitune.inference_args import add_model_args

LIMITS_HELP = "request limits (each over-limit request gets a 4xx error in OpenAI's shape)"


def add_parser(p):
    add_model_args(p, multiple_adapters=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", "--api_key", dest="api_key", help="require 'Authorization: Bearer KEY' on every request")
    g = p.add_argument_group("limits", LIMITS_HELP)
    g.add_argument("--max_tokens_limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    g.add_argument("--max_prompt_tokens", type=int, default=None, help="longest prompt (default: context - max_tokens)")
    g.add_argument("--max_body_bytes", type=int, default=1_000_000, help="largest request body")
    g.add_argument("--max_queue", type=int, default=64, help="requests waiting at once; more get 429")


def main(args):
    import uvicorn
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"phitune serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    loaded = gen.load(args.adapter_path, args.model, args.system_prompt, args.trust_remote_code, args.precision)
    app = build_app(loaded, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                    max_queue=args.max_queue)
    names = ", ".join(["base", *loaded.adapters])
    print(f"phitune serve: models {names} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


class ApiError(Exception):
    def __init__(self, status, message, code=None, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def build_app(loaded, api_key=None, max_tokens_limit=1024, max_prompt_tokens=None, max_body_bytes=1_000_000,
              max_queue=64):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field, ValidationError

    class Message(BaseModel):
        role: str = Field(pattern="^(system|user|assistant)$")
        content: str

    class Common(BaseModel):
        model: str
        max_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0, le=2)
        top_p: float = Field(default=1.0, gt=0, le=1)
        stream: bool = False
        stop: Optional[Union[str, List[str]]] = None
        seed: Optional[int] = None
        n: int = Field(default=1, ge=1, le=1)

    class ChatRequest(Common):
        messages: List[Message] = Field(min_length=1)

    class CompletionRequest(Common):
        prompt: str

    app = FastAPI(title="phitune", docs_url=None, redoc_url=None)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phitune-generate")  # one model, one at a time
    state = {"waiting": 0}
    models = ["base", *loaded.adapters]
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "Incorrect or missing API key", code="invalid_api_key")

    async def parse(request, cls):
        check_key(request)
        body = await request.body()
        if len(body) > max_body_bytes:
            raise ApiError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = cls.model_validate(payload)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            raise ApiError(400, f"{param}: {first['msg']}", code="invalid_value", param=param) from None
        if req.model not in models and req.model != loaded.base_name:
            raise ApiError(404, f"The model '{req.model}' does not exist; available: {', '.join(models)}",
                           code="model_not_found", param="model")
        if req.max_tokens is not None and req.max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {req.max_tokens} is over this server's limit of {max_tokens_limit}",
                           code="invalid_value", param="max_tokens")
        return req

    def prepare(req, ids):
        max_tokens = req.max_tokens or min(256, max_tokens_limit)
        limit = max_prompt_tokens or context - max_tokens
        if len(ids) > limit:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model allows {limit} with max_tokens "
                                f"{max_tokens} (context {context})", code="context_length_exceeded", param="messages")
        sampling = gen.Sampling(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed)
        adapter = None if req.model in ("base", loaded.base_name) else req.model
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return sampling, adapter, stops

    async def run(request, ids, sampling, adapter, stops, chunk, final):
        """Generate on the single worker thread, streaming pieces through an asyncio queue."""
        if state["waiting"] >= max_queue:
            raise ApiError(429, "server busy: too many queued requests, retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error")
        state["waiting"] += 1
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        cancel = threading.Event()

        def job():
            text = ""
            try:
                if cancel.is_set():
                    return
                for piece in gen.stream_ids(loaded, ids, sampling, adapter, cancel):
                    text += piece
                    hit = next((s for s in stops if s and s in text), None)
                    if hit:
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece[:len(piece) - len(text) +
                                                                                   text.index(hit)]))
                        text = text[:text.index(hit)]
                        cancel.set()
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            except Exception as e:  # reported to the client as a 500 in OpenAI's shape
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e)))
            finally:
                n = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
                reason = "length" if n >= sampling.max_new_tokens else "stop"
                loop.call_soon_threadsafe(queue.put_nowait, ("done", (n, reason)))

        loop.run_in_executor(executor, job)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    if value:
                        yield chunk(value)
                elif kind == "error":
                    raise ApiError(500, f"generation failed: {value}", kind="server_error")
                else:
                    yield final(*value)
                    return
        finally:  # also on client disconnect (cancellation): stop the generation, free the worker
            cancel.set()
            state["waiting"] -= 1

    def usage(prompt, completion):
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(request, req, ids, kind):
        sampling, adapter, stops = prepare(req, ids)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def piece_body(text, reason=None, delta=True):
            if kind == "chat":
                choice = {"index": 0, "finish_reason": reason,
                          **({"delta": {"content": text} if text else {}} if delta else
                             {"message": {"role": "assistant", "content": text}})}
            else:
                choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            return choice

        if req.stream:
            async def events():
                first = True
                async for item in run(request, ids, sampling, adapter, stops,
                                      chunk=lambda t: ("piece", t), final=lambda n, r: ("done", (n, r))):
                    tag, value = item
                    if tag == "piece":
                        choice = piece_body(value)
                        if kind == "chat" and first:
                            choice["delta"]["role"] = "assistant"
                        first = False
                        data = {"id": rid, "object": f"{obj}.chunk" if kind == "chat" else obj, "created": created,
                                "model": req.model, "choices": [choice]}
                    else:
                        data = {"id": rid, "object": f"{obj}.chunk" if kind == "chat" else obj, "created": created,
                                "model": req.model, "choices": [piece_body("", value[1])],
                                "usage": usage(len(ids), value[0])}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, result = "", None
        async for tag, value in run(request, ids, sampling, adapter, stops, chunk=lambda t: ("piece", t),
                                    final=lambda n, r: ("done", (n, r))):
            if tag == "piece":
                text += value
            else:
                result = value
        return {"id": rid, "object": obj, "created": created, "model": req.model,
                "choices": [piece_body(text.strip() if kind == "chat" else text, result[1], delta=False)],
                "usage": usage(len(ids), result[0])}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "phitune"}
                                           for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        messages = [m.model_dump() for m in req.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        ids = loaded.template.encode_prompt(messages)
        return await respond(request, req, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        ids = loaded.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        return await respond(request, req, ids, "completion")

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(ApiError(404, f"unknown endpoint {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(ApiError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    return app
