"""Tokenisation time of the quickstart's SFT data with and without the tokenised-data cache.

    python scripts/bench/tokenise_cache.py              # 5 repeats of each: no cache, first run (fills it), later run (hit)
    python scripts/bench/tokenise_cache.py --repeats 3

Reads recipes/quickstart.yaml (dataset `culture`, the sft stage's sequence length, its data policy: PII scrub,
exact + near dedup, sensitive-topic register) with the quickstart's own tokenizer (SmolLM2-135M-Instruct; its
GGUF is converted to a float folder in model.cache_dir on first use). Each timing is one `tokenize_records`
call, as the sft stage makes it: without a cache (the data layer and tokenising), filling an empty cache,
and reading an entry back. The cache folder is a fresh temporary folder. Prints a JSON line per timing and
the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from finetune import model as model_path
from finetune.data import tokenize_records
from finetune.pipeline import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe).recipe
    sft = next(c for c in recipe.stage_configs() if c.kind == "sft")
    tokenizer = model_path.load_tokenizer(recipe.model, model_path.resolve_source(recipe.model))
    name, seq_len = sft.dataset, sft.seq_len

    def timed(cache: Path | None) -> tuple[float, dict]:
        started = time.perf_counter()
        result = tokenize_records(recipe, name, tokenizer, seq_len, True, None, cache)
        return time.perf_counter() - started, result.stats

    tokenize_records(recipe, name, tokenizer, seq_len, True, None, None)  # warm imports and file caches
    times: dict[str, list[float]] = {"no_cache": [], "cache_miss": [], "cache_hit": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            cache = Path(folder)
            for label, where in (("no_cache", None), ("cache_miss", cache), ("cache_hit", cache)):
                seconds, stats = timed(where)
                assert stats["token_cache"] == {"no_cache": "off", "cache_miss": "miss", "cache_hit": "hit"}[label]
                times[label].append(seconds)
                print(json.dumps({"timing": label, "seconds": round(seconds, 4), "sequences": stats["sequences"]}))
    print(
        json.dumps(
            {
                "dataset": f"{name} ({stats['records']} records, {stats['sequences']} sequences, {stats['tokens']} tokens)",
                "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
                "speedup_hit_vs_no_cache": round(
                    statistics.median(times["no_cache"]) / statistics.median(times["cache_hit"]), 1
                ),
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
