"""How the server generates: transformers' continuous batching, or plain `model.generate`, behind one seam.

A backend turns prompt ids into an async stream of new token ids, ending with `Finished`. It runs on the
server's event loop; the model runs on the backend's own thread, and tokens cross to the loop with
`loop.call_soon_threadsafe` (nothing polls). Both backends stop at the template contract's stop ids (EOS and
the end-of-turn marker) and never yield them; leaving the stream early cancels the request.

- `ContinuousBatchingBackend`: one `ContinuousBatchingManager` (`model.init_continuous_batching`), started once;
  every request is `add_request(..., streaming=True)` with a result handler registered first
  (`register_result_handler`, which delivers on the loop; `request_id_iter`/`get_result` poll a shared queue
  and re-queue other requests' results, so they are not used). It is greedy: in transformers 5.24 sampling
  (`do_sample`) is one switch for the whole manager, and only temperature/top-p/top-k values can vary per
  request (`per_request_processors`), so sampled requests go to the plain backend.
- `PlainBackend`: `model.generate` for one request at a time on one worker thread. It serves sampled and
  watermarked requests (the watermark logits processor crashes continuous batching in 5.24) and is the
  baseline the benchmark compares against.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class GenerationParams:
    """One request's generation settings; `temperature` 0 is greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Finished:
    """The end of a generation: `stop` at a stop id (not yielded), `length` at `max_new_tokens`."""

    reason: Literal["stop", "length"]


class BackendError(RuntimeError):
    """Generation failed inside the backend (the request gets a 5xx, the server keeps serving)."""


class Backend(Protocol):
    """Prompt ids in, chunks of new token ids out, then one `Finished`."""

    name: str

    def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[list[int] | Finished]: ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BatchingOptions:
    """Continuous batching knobs (transformers' `ContinuousBatchingConfig`), sized for the server, not the machine.

    Left alone, transformers sizes the KV cache from free memory (60% of RAM on CPU); the server sizes it from
    what it admits instead: `cache_tokens` (default: max(context length, concurrency x min(context, 2048))).
    """

    page_size: int = 64
    max_batch_tokens: int = 512
    cache_tokens: int | None = None
    max_requests_per_batch: int | None = None


class ContinuousBatchingBackend:
    """Greedy generation of many requests at once, through one continuous batching manager."""

    name = "continuous-batching"

    def __init__(
        self,
        model: Any,
        stop_ids: list[int],
        pad_token_id: int | None,
        max_concurrency: int,
        context_length: int,
        options: BatchingOptions = BatchingOptions(),
    ):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.stop_ids = list(stop_ids)
        default_cache = max(context_length, max_concurrency * min(context_length, 2048))
        self.cache_tokens = options.cache_tokens or default_cache  # a longer request goes to the plain backend
        config = ContinuousBatchingConfig(
            page_size=options.page_size,
            num_blocks=math.ceil(self.cache_tokens / options.page_size),
            max_batch_tokens=options.max_batch_tokens,
            max_requests_per_batch=options.max_requests_per_batch or max_concurrency,
            allow_block_sharing=False,  # prefix sharing needs the whole prompt per batch; off keeps it simple
        )
        generation = GenerationConfig(
            do_sample=False, max_new_tokens=256, eos_token_id=self.stop_ids, pad_token_id=pad_token_id
        )
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        self.manager.start()
        self._ids = itertools.count()

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[list[int] | Finished]:
        """The request's new token ids as the manager produces them."""
        if not params.greedy:
            raise BackendError("continuous batching here is greedy; sampled requests belong to the plain backend")
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = f"serve-{next(self._ids)}"
        self.manager.register_result_handler(request_id, outputs.put_nowait)  # before add_request: no lost result
        added = self.manager.add_request(
            list(prompt_ids),
            request_id=request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=True,
            eos_token_id=self.stop_ids,
        )
        if added is None:
            self._forget(request_id)
            raise BackendError(f"continuous batching is not accepting requests ({self._fatal() or 'stopped'})")
        seen, finished = 0, False
        try:
            while not finished:
                output = await outputs.get()
                if output.error is not None:
                    finished = True
                    raise BackendError(f"continuous batching failed: {output.error}")
                tokens = list(output.generated_tokens)
                new, stopped = _until_stop(tokens[seen:], self.stop_ids)
                seen = len(tokens)
                if new:
                    yield new
                if stopped or output.is_finished():
                    finished = True
                    yield Finished("stop" if stopped else "length")
        finally:
            if not finished:  # the reader left early (stop string, refusal, disconnect)
                self.manager.cancel_request(request_id)
                self._forget(request_id)

    def healthy(self) -> bool:
        return self._fatal() is None and self.manager.is_running()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=10)

    def _fatal(self) -> Exception | None:
        return self.manager.background_thread_status.fatal_error

    def _forget(self, request_id: str) -> None:
        """Drop the result handler of a request that will deliver nothing more (cancelled or refused)."""
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)


class PlainBackend:
    """`model.generate`, one request at a time on a single worker thread, streamed token by token."""

    name = "plain"

    def __init__(self, model: Any, stop_ids: list[int], pad_token_id: int | None, watermarking_config: Any = None):
        self.model = model
        self.stop_ids = list(stop_ids)
        self.pad_token_id = pad_token_id
        self.watermarking_config = watermarking_config
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wenmai-generate")

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[list[int] | Finished]:
        """The request's new token ids as `model.generate` produces them."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        streamer = _LoopStreamer(loop, tokens)
        done = loop.run_in_executor(self._worker, self._run, prompt_ids, params, streamer, cancelled)
        count, finished = 0, False
        try:
            while True:
                item = await tokens.get()
                if item is None:
                    break
                new, stopped = _until_stop(item, self.stop_ids)
                count += len(new)
                if new:
                    yield new
                if stopped:
                    finished = True
                    yield Finished("stop")
                    return
            await done  # re-raises what generate raised
            finished = True
            yield Finished("length" if count >= params.max_new_tokens else "stop")
        finally:
            if not finished:
                cancelled.set()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _run(
        self, prompt_ids: list[int], params: GenerationParams, streamer: _LoopStreamer, cancelled: threading.Event
    ) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        ids = torch.tensor([prompt_ids], device=self.model.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if not params.greedy or self.watermarking_config is not None:  # the watermark needs sampling
            sampling = {"do_sample": True, "temperature": params.temperature or 1.0, "top_p": params.top_p}
        if self.watermarking_config is not None:
            sampling["watermarking_config"] = self.watermarking_config
        try:
            if cancelled.is_set():
                return
            with torch.no_grad():
                self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=params.max_new_tokens,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.pad_token_id,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                    **sampling,
                )
        except Exception as err:
            raise BackendError(f"generate failed: {type(err).__name__}: {err}") from err
        finally:
            streamer.end()


class _LoopStreamer:
    """A `generate` streamer that hands each new token to a queue on the event loop (the prompt is skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokens: asyncio.Queue):
        self.loop, self.tokens, self.prompt_seen = loop, tokens, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, [int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, None)


def _until_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop id, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i], True
    return tokens, False
