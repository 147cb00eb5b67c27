"""The OpenAI chat-completions wire format: request schema, response bodies, error bodies.

Requests are validated here, with OpenAI's limits (temperature in [0, 2], top_p in (0, 1],
max_tokens > 0, n = 1). Fields this server does not use (``frequency_penalty``, ``user``, ...) are
accepted and ignored, as OpenAI-compatible servers do; ``stop`` sequences and ``n > 1`` are
refused with a clear message rather than ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crucible.serve.engine import ChatEvent


class ApiError(Exception):
    """An error that becomes an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str | list[dict[str, Any]] | None:
        if v is None or isinstance(v, str):
            return v
        ok = isinstance(v, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in v
        )
        if not ok:
            raise ValueError(
                'must be a string, null, or a list of {"type": "text", "text": ...} parts '
                "(this server handles text only)"
            )
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension (vLLM has it too); 0 = off
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch's generator accepts
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # Thinking mode: a top-level flag, or vLLM's `chat_template_kwargs={"enable_thinking": ...}`.
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v:
            raise ValueError("stop sequences are not supported by this server; omit `stop`")
        return v

    def thinking(self, default: bool) -> bool:
        if self.enable_thinking is not None:
            return self.enable_thinking
        flag = (self.chat_template_kwargs or {}).get("enable_thinking")
        return bool(flag) if flag is not None else default

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def validation_error(errors: list[Any]) -> ApiError:
    """A pydantic / FastAPI validation error list -> one 400 naming the first bad field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, f"{param or 'request body'}: {msg}", param=param)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The JSON body (whatever the Content-Type says, as curl users expect), validated."""
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to parse") from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(event: ChatEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def completion_body(
    cid: str, model: str, reasoning: str, content: str, last: ChatEvent
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": last.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(last),
    }


def chunk_body(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk_body(cid: str, model: str, created: int, last: ChatEvent) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(last),
    }
