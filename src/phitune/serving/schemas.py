"""The OpenAI wire format phitune serves: request schemas, response bodies and errors in OpenAI's shape."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from phitune.serving import logprobs

MAX_STOPS, MAX_STOP_CHARS = 4, 100  # OpenAI's bound on the count; every token is checked against each one


class ApiError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status, message, code=None, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class Common(BaseModel):
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)  # OpenAI's newer name; wins
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # the caller's own label for its user: accepted, not used
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop


    @property
    def token_limit(self) -> tuple[Optional[int], str]:
        """(the answer's token limit asked for, the field that asked): max_completion_tokens before max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)

    @property
    def top_k(self) -> Optional[int]:
        """Alternatives to record per token; None when no logprobs were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Common):
    prompt: str
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)

    @property
    def top_k(self) -> Optional[int]:
        return self.logprobs


class RenderRequest(BaseModel):
    """/phitune/render: the prompt text a model receives for these messages."""
    model: StrictStr
    messages: list[Message]


# OpenAI request fields this server does not implement, each with the values that ask for nothing (accepted).
UNSUPPORTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],),
               "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "functions": ([],),
               "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "best_of": (1,),
               "echo": (False,), "suffix": ("",), "store": (False,), "metadata": ({},)}


def _same(value: Any, choices: tuple) -> bool:
    """`value` is one of `choices` (0 and 0.0 alike; False is not 0)."""
    def key(v):
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ("number", float(v)) if number else (type(v).__name__, json.dumps(v, sort_keys=True))
    return key(value) in {key(c) for c in choices}


def validate(cls: type, payload: Any) -> BaseModel:
    """`payload` as a `cls` request, or a 400 naming the first field that is wrong or not implemented here."""
    if not isinstance(payload, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    for name, value in payload.items():
        if name in cls.model_fields or value is None or _same(value, UNSUPPORTED.get(name, ())):
            continue
        why = "is not supported by this server" if name in UNSUPPORTED else "is not a field this server knows"
        raise ApiError(400, f"{name}: {why}; remove it (or send its neutral value)", code="unsupported_parameter",
                       param=name)
    if payload.get("n") not in (None, 1):
        raise ApiError(400, f"n: this server generates one choice per request; got n={payload['n']!r}",
                       code="unsupported_parameter", param="n")
    try:
        req = cls.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}", code="invalid_value", param=param) from None
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", code="invalid_value", param="top_logprobs")
    return req


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    """Builds the response objects of one request (chat or completion, streamed or whole).

    Logprob entries (logprobs.TokenTexts) go with the text they belong to; None where none were asked for.
    include_usage: OpenAI's stream_options.include_usage (usage only in a last chunk without choices)."""

    def __init__(self, kind: str, model: str, created: int, include_usage: bool = False):
        self.kind, self.model, self.created, self.include_usage = kind, model, created, include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.first = True
        self.offset = 0  # characters of the answer sent so far (the completions' text_offset)

    def _logprobs(self, entries, whole):
        if entries is None or not (entries or whole):
            return None
        if self.kind == "chat":
            return {"content": logprobs.chat_content(entries), "refusal": None}
        out = logprobs.legacy(entries, self.offset)
        self.offset = out["text_offset"][-1] + len(out["tokens"][-1]) if entries else self.offset
        return out

    def _choice(self, text, reason, delta, entries=None):
        lp = self._logprobs(entries, not delta)
        if self.kind != "chat":
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": lp}
        if not delta:
            return {"index": 0, "finish_reason": reason, "message": {"role": "assistant", "content": text},
                    "logprobs": lp}
        body = {"content": text} if text else {}
        if self.first:
            body["role"] = "assistant"
            self.first = False
        return {"index": 0, "finish_reason": reason, "delta": body, "logprobs": lp}

    def _wrap(self, choices, streamed, **extra):
        obj = f"{self.object}.chunk" if self.kind == "chat" and streamed else self.object
        if streamed and self.include_usage:
            extra = {"usage": None, **extra}
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def chunk(self, text: str, entries: Optional[list] = None) -> dict:
        return self._wrap([self._choice(text, None, True, entries)], True)

    def last_chunk(self, reason: str, prompt_tokens: int, completion_tokens: int,
                   entries: Optional[list] = None) -> dict:
        """The chunk with the finish reason; it carries the usage too unless a usage chunk follows."""
        used = {} if self.include_usage else {"usage": usage(prompt_tokens, completion_tokens)}
        return self._wrap([self._choice("", reason, True, entries)], True, **used)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._wrap([], True, usage=usage(prompt_tokens, completion_tokens))

    def whole(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int,
              entries: Optional[list] = None) -> dict:
        return self._wrap([self._choice(text, reason, False, entries)], False,
                          usage=usage(prompt_tokens, completion_tokens))


def now() -> int:
    return int(time.time())
