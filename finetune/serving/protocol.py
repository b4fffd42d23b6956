"""The OpenAI chat-completions wire format: the request the server accepts, its errors, its answers.

Requests are validated here, before anything is generated; every refusal is an `ApiError`, answered with
OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and a 4xx status.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type, self.headers = error_type, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class Message(BaseModel):
    """One turn of the conversation; content is plain text."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completions request that the server honours; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[Message]
    max_tokens: int | None = Field(None, strict=True)
    max_completion_tokens: int | None = Field(None, strict=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stop: StrictStr | list[StrictStr] | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse_request(raw: bytes) -> ChatRequest:
    """The request body as a `ChatRequest`, or a 400 naming the first wrong field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        message = first["msg"]
        if first["loc"][-1] == "role":
            message = f"{message}; a message's role is one of {', '.join(ROLES)}"
        if first["loc"][-1] == "content":
            message = f"{message}; a message's content must be a string"
        raise ApiError(400, f"{param}: {message}", param=param) from None
    if not request.messages:
        raise ApiError(400, "messages: the conversation is empty; send at least one message", param="messages")
    limit = request.token_limit
    if limit is not None and limit <= 0:
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        raise ApiError(400, f"{param} must be at least 1 (got {limit})", param=param)
    if len(request.stop_strings) > 4:
        raise ApiError(400, "stop: at most 4 stop strings", param="stop")
    return request


def completion(
    response_id: str,
    model_id: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    aigc: dict,
) -> dict:
    """A `chat.completion` object, with the implicit AIGC label as an extra top-level field."""
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
        "aigc": aigc,
    }


def chunk(
    response_id: str,
    model_id: str,
    created: int,
    delta: dict,
    finish_reason: str | None = None,
    **extra: Any,
) -> str:
    """One server-sent event carrying a `chat.completion.chunk`."""
    body = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


STREAM_END = "data: [DONE]\n\n"
