"""The OpenAI wire format phitune serves: request schemas, response bodies and errors in OpenAI's shape."""
from __future__ import annotations

import time
import uuid
from typing import Optional, Union

from pydantic import BaseModel, Field, field_validator

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


class Common(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
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


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Common):
    prompt: str


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    """Builds the response objects of one request (chat or completion, streamed or whole)."""

    def __init__(self, kind: str, model: str, created: int):
        self.kind, self.model, self.created = kind, model, created
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.first = True

    def _choice(self, text, reason, delta):
        if self.kind != "chat":
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        if not delta:
            return {"index": 0, "finish_reason": reason, "message": {"role": "assistant", "content": text}}
        body = {"content": text} if text else {}
        if self.first:
            body["role"] = "assistant"
            self.first = False
        return {"index": 0, "finish_reason": reason, "delta": body}

    def _wrap(self, choice, **extra):
        obj = f"{self.object}.chunk" if self.kind == "chat" and "delta" in choice else self.object
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                **extra}

    def chunk(self, text: str) -> dict:
        return self._wrap(self._choice(text, None, True))

    def last_chunk(self, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._wrap(self._choice("", reason, True), usage=usage(prompt_tokens, completion_tokens))

    def whole(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._wrap(self._choice(text, reason, False), usage=usage(prompt_tokens, completion_tokens))


def now() -> int:
    return int(time.time())
