"""`wenmai serve`: an OpenAI-compatible chat server for an exported model (or a run's stage).

    app = create_app("runs/qs/export/model", api_key_env="WENMAI_API_KEY", banned_terms="banned.txt")

Endpoints: `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /metrics`, and
`GET /health` (the only one without the API key). Every request is validated before anything is generated
and refused with OpenAI's error body and a 4xx status; every answer carries the explicit label the reader
sees (before or after the answer) and the implicit GB 45438-2025 label (`aigc` in the body and the final
streamed chunk, `X-AIGC-Label` on JSON answers), whose ReservedCode1 is the sha256 of the content sent.
At most `max_concurrency` requests generate at once; up to `max_queue` more wait, any beyond get a 429.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from finetune.errors import WenmaiError
from finetune.review.feedback import Conversation
from finetune.serving import protocol
from finetune.serving.answers import (
    FilterMode,
    LabelLanguage,
    LabelPosition,
    OutputFilter,
    explicit_label,
    labelled,
)
from finetune.serving.backends import (
    Backend,
    BatchingOptions,
    ContinuousBatchingBackend,
    GenerationParams,
    PlainBackend,
)
from finetune.serving.feedback import FeedbackSink, served_recipe
from finetune.serving.model_source import ServedModel, load_model_source
from finetune.serving.protocol import ApiError
from finetune.serving.runtime import Admission, Metrics, ServiceHeaders, api_key_from_env
from finetune.serving.streaming import Answer, implicit, stream_events
from reward.rules import banned_pattern, read_banned_terms

log = logging.getLogger("wenmai.serve")
MAX_BODY_BYTES = 8 * 2**20  # far more than any context length in text; a bigger body is refused unread
DEFAULT_REFUSAL = "抱歉，我无法回答这个问题。Sorry, I cannot answer that."


@dataclass
class Serving:
    """One server's state: the model, its backends (started with the app), admission, filter, labels, metrics."""

    model: ServedModel
    api_key: bytes | None
    admission: Admission
    metrics: Metrics
    output_filter: OutputFilter | None
    label_position: LabelPosition
    label_language: LabelLanguage
    label_text: str | None
    default_max_tokens: int
    watermarking_config: Any
    backend_kind: str
    batching: BatchingOptions
    max_concurrency: int
    feedback: FeedbackSink | None = None
    batched: ContinuousBatchingBackend | None = None
    plain: PlainBackend | None = None

    def start(self) -> None:
        pad = self.model.contract.get("pad_token_id")
        self.plain = PlainBackend(self.model.model, self.model.stop_ids, pad, self.watermarking_config)
        if self.backend_kind == "continuous-batching" and self.watermarking_config is None:
            self.batched = ContinuousBatchingBackend(
                self.model.model,
                self.model.stop_ids,
                pad,
                self.max_concurrency,
                self.model.context_length,
                self.batching,
            )

    def close(self) -> None:
        for backend in (self.batched, self.plain):
            if backend is not None:
                backend.close()
        self.batched = self.plain = None
        if self.feedback is not None:
            self.feedback.close()

    async def remember(self, response_id: str, messages: list[dict], content: str, params: GenerationParams) -> None:
        """Keep a served answer for visitor feedback (when the server takes feedback)."""
        if self.feedback is not None:
            generation = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature}
            conversation = Conversation(
                response_id=response_id,
                model=self.model.model_id,
                messages=messages,
                answer=content,
                generation=generation,
            )
            await self.feedback.remember(conversation)

    def backend_for(self, params: GenerationParams, prompt_tokens: int) -> Backend:
        """Continuous batching for greedy requests that fit its cache; sampled and watermarked ones go to `generate`."""
        if self.plain is None:
            raise ApiError(503, "the server is not started (run it with its lifespan)", error_type="server_error")
        batched = self.batched
        fits = batched is not None and prompt_tokens + params.max_new_tokens <= batched.cache_tokens
        if fits and params.greedy and batched.healthy():  # a dead batching worker: `generate` keeps serving
            return self.batched
        return self.plain


def create_app(
    model_source: str | Path | ServedModel,
    *,
    adapter_stage: str | None = None,
    model_id: str | None = None,
    host: str = "127.0.0.1",
    api_key_env: str | None = None,
    max_concurrency: int = 8,
    max_queue: int = 64,
    default_max_tokens: int = 512,
    label_position: LabelPosition = "suffix",
    label_language: LabelLanguage = "auto",
    label_text: str | None = None,
    banned_terms: str | Path | None = None,
    filter_mode: FilterMode = "refuse",
    refusal: str = DEFAULT_REFUSAL,
    watermarking_config: Any = None,
    backend: Literal["continuous-batching", "plain"] = "continuous-batching",
    batching: BatchingOptions | None = None,
    feedback_db: str | None = None,
    log_days: int = 0,
) -> FastAPI:
    """The server app for `model_source`: an export folder, a run folder (its last model stage, or
    `adapter_stage`), or an already loaded `ServedModel`. Its backends start and stop with the app's lifespan.

    `host` is where it will listen: beyond loopback an API key is required (the app refuses to start without
    one). The key is read from the environment variable `api_key_env`, never from an argument, and compared in
    constant time with `Authorization: Bearer ...`; on loopback it is optional (enforced when set).
    `label_position` (prefix, suffix, none), `label_language` (auto, zh, en, both) and `label_text` shape the
    explicit label; `banned_terms` is a file of terms (one a line) refused or redacted (`filter_mode`) in every
    answer; `watermarking_config` (a transformers `WatermarkingConfig`) watermarks every answer, through
    `generate` with sampling on. `backend="plain"` serves everything through `generate`, one request at a time.
    Without `banned_terms`, the served run's rlhf `banned_terms` rule applies when the run is on this machine.
    `feedback_db` (a review store) turns on `POST /v1/feedback`; `log_days` > 0 also keeps PII-scrubbed
    conversations that long.
    """
    api_key = api_key_from_env(api_key_env, host)
    if max_concurrency < 1 or max_queue < 0 or default_max_tokens < 1:
        raise WenmaiError("serve: max_concurrency and default_max_tokens must be at least 1, max_queue at least 0")
    if label_position not in ("prefix", "suffix", "none"):
        raise WenmaiError(f"serve: label position {label_position!r} is not one of prefix, suffix, none")
    if log_days and not feedback_db:
        raise WenmaiError("serve: conversation logging (--log-days) needs a review store for feedback: --feedback-db")
    served = model_source if isinstance(model_source, ServedModel) else load_model_source(model_source, adapter_stage)
    recipe = served_recipe(served.source)
    banned_terms = banned_terms if banned_terms is not None else _recipe_banned_terms(recipe)
    output_filter = None
    if banned_terms is not None:
        terms = read_banned_terms(banned_terms)
        output_filter = OutputFilter(banned_pattern(terms), max(map(len, terms)), filter_mode, refusal)
    if model_id:
        served.model_id = model_id
    serving = Serving(
        model=served,
        api_key=api_key,
        admission=Admission(max_concurrency, max_queue),
        metrics=Metrics(),
        output_filter=output_filter,
        label_position=label_position,
        label_language=label_language,
        label_text=label_text,
        default_max_tokens=default_max_tokens,
        watermarking_config=watermarking_config,
        backend_kind=backend,
        batching=batching or BatchingOptions(),
        max_concurrency=max_concurrency,
        feedback=FeedbackSink(feedback_db, served.model_id, recipe, log_days) if feedback_db else None,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        serving.start()
        try:
            yield
        finally:
            serving.close()

    app = FastAPI(title="Wenmai serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving = serving
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/feedback", feedback, methods=["POST"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(ServiceHeaders, metrics=serving.metrics)  # outermost: errors get the headers too
    return app


# --- endpoints -----------------------------------------------------------------------------------


async def chat_completions(request: Request):
    """OpenAI's chat completion: the model's next assistant turn, labelled, as JSON or server-sent events."""
    serving = _authorised(request)
    serving.metrics.requests += 1
    chat = protocol.parse_request(await _body(request))
    served = serving.model
    if chat.model != served.model_id:
        raise ApiError(
            404,
            f"model {chat.model!r} is not served here; this server serves {served.model_id!r}",
            param="model",
            code="model_not_found",
        )
    messages = [m.model_dump() for m in chat.messages]
    prompt_ids = _render(served, messages)
    params = _params(serving, chat, len(prompt_ids))
    backend = serving.backend_for(params, len(prompt_ids))
    slot = await serving.admission.enter()
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    prompt_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    answer = Answer(serving, backend, prompt_ids, params, chat.stop_strings)
    if chat.stream:
        events = stream_events(serving, answer, response_id, prompt_text, slot, messages)
        weakref.finalize(events, slot.release)  # a stream never started still frees its slot
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(slot.release))
    try:
        async with aclosing(answer.deltas()) as deltas:
            text = "".join([delta async for delta in deltas])
    finally:
        slot.release()
    label = explicit_label(serving.label_language, text, prompt_text, serving.label_position)
    content = labelled(text, serving.label_text or label, serving.label_position)
    aigc = implicit(serving, content, response_id)
    body = protocol.completion(
        response_id, served.model_id, content, answer.finish_reason, len(prompt_ids), answer.tokens, aigc
    )
    header = json.dumps(aigc["AIGC"], ensure_ascii=True, separators=(",", ":"))
    await serving.remember(response_id, messages, content, params)
    return JSONResponse(body, headers={"X-AIGC-Label": header})


async def feedback(request: Request) -> JSONResponse:
    """A visitor's feedback on one answer (by its `id`), stored in the review store for curators."""
    serving = _authorised(request)
    if serving.feedback is None:
        raise ApiError(404, "this server takes no feedback; start it with --feedback-db", code="feedback_disabled")
    try:
        body = json.loads(await _body(request))
    except ValueError:
        raise ApiError(400, "the body is not JSON", param="body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", param="body")
    return JSONResponse(await serving.feedback.receive(body))


async def list_models(request: Request) -> JSONResponse:
    """The one model this server serves."""
    served = _authorised(request).model
    entry = {"id": served.model_id, "object": "model", "created": 0, "owned_by": "wenmai"}
    return JSONResponse({"object": "list", "data": [entry]})


async def metrics(request: Request) -> JSONResponse:
    """Counters since start: requests, tokens, filtered answers, queue, errors by status."""
    serving = _authorised(request)
    return JSONResponse(serving.metrics.snapshot(serving.admission))


async def health(request: Request) -> JSONResponse:
    """200 while the server can answer (`degraded` when only `generate` can), else 503; no API key needed."""
    serving: Serving = request.app.state.serving
    if serving.plain is None or not serving.plain.healthy():
        return JSONResponse({"status": "unavailable"}, status_code=503)
    degraded = serving.batched is not None and not serving.batched.healthy()
    return JSONResponse({"status": "degraded" if degraded else "ok"})


# --- helpers -------------------------------------------------------------------------------------


def _authorised(request: Request) -> Serving:
    """The app's state, once the request's bearer token matches the API key (when there is one)."""
    serving: Serving = request.app.state.serving
    if serving.api_key is None:
        return serving
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), serving.api_key):
        raise ApiError(
            401,
            "invalid or missing API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return serving


async def _body(request: Request) -> bytes:
    """The request body, refused (413) once it passes `MAX_BODY_BYTES`."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB", code="request_too_large")
    return bytes(body)


def _render(served: ServedModel, messages: list[dict]) -> list[int]:
    from jinja2 import TemplateError

    try:
        return served.prompt_ids(messages)
    except TemplateError as err:  # the template's own checks (e.g. roles must alternate)
        raise ApiError(400, f"messages: the model's chat template refused them: {err}", param="messages") from None


def _params(serving: Serving, chat: protocol.ChatRequest, prompt_tokens: int) -> GenerationParams:
    """Generation settings within the context length, or a 400 that says the lengths."""
    context = serving.model.context_length
    asked = chat.token_limit
    max_new = asked if asked is not None else min(serving.default_max_tokens, context - prompt_tokens)
    if prompt_tokens + max(max_new, 1) > context:
        wanted = f" + {max_new} to generate = {prompt_tokens + max_new}" if asked is not None else ""
        raise ApiError(
            400,
            f"this model's context length is {context} tokens; the messages take {prompt_tokens} "
            f"tokens{wanted}. Shorten the messages or ask for fewer tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    temperature = chat.temperature or 0.0
    return GenerationParams(max_new, temperature, chat.top_p if chat.top_p is not None else 1.0)


def _recipe_banned_terms(recipe) -> str | None:
    """The served run's rlhf `banned_terms` file, when it has one."""
    for config in recipe.stage_configs() if recipe is not None else []:
        rule = getattr(getattr(config, "rules", None), "banned_terms", None)
        if rule is not None and getattr(rule, "path", None):
            return rule.path
    return None


async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
    messages = {404: "there is no such endpoint", 405: "this endpoint does not take that method"}
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = ApiError(err.status_code, messages.get(err.status_code, str(err.detail)), code=codes.get(err.status_code))
    return JSONResponse(error.body(), status_code=err.status_code, headers=getattr(err, "headers", None))


async def _server_error(_request: Request, err: Exception) -> JSONResponse:
    log.exception("serve: request failed", exc_info=err)
    error = ApiError(500, "the server failed on this request; it keeps serving", error_type="server_error")
    return JSONResponse(error.body(), status_code=500)
