"""DPO speed: plain TRL `DPOTrainer` defaults vs Wenmai's `dpo` configuration, on a random-init Llama shape.

    python scripts/bench/dpo_speed.py --shape tiny          # CPU, seconds: checks the harness (the test suite runs it)
    python scripts/bench/dpo_speed.py --shape 1b            # one GPU: the Llama-3.2-1B shape, prompt 256 + answer 256

Both configurations train the same LoRA (r=16, all-linear) on the same random pairs with the same seed and
learning rate (--learning-rate, default 5e-5 for both, so the loss moves), so their loss curves should agree;
they differ in how the work is done:
- `trl_defaults`: a plain TRL script: `DPOTrainer(model, peft_config=...)` with DPOConfig defaults (gradient
  checkpointing on, bf16, the reference computed in every step with the adapter disabled);
- `wenmai`: what a `dpo` stage builds (`finetune.training.build_training_args` + `finetune.stages.preference.trainer_args`):
  the policy is an adapter-carrying PeftModel as after SFT (TRL keeps a frozen copy as the reference), the
  reference log-probs are precomputed once (`precompute_ref_log_probs`, in batches of twice the training
  batch: `precompute_batch_size`), activation checkpointing is off
  when memory allows (`gradient_checkpointing: false`), and Liger's kernels are used where CUDA and
  liger-kernel are present (`liger_kernel`).
Each configuration runs in its own process (clean peak memory). pairs/s counts every second from building the
trainer (the precompute pass included) to the last step; `steady_pairs_per_s` leaves out the first
`--warmup-steps`. Peak memory is `torch.cuda.max_memory_allocated` on a GPU, the process's peak RSS on CPU.
Output: one JSON line per configuration, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": None,
        "prompt": 32,
        "completion": 32,
        "batch": 4,
        "steps": 6,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "prompt": 256,
        "completion": 256,
        "batch": 8,
        "steps": 30,
    },
}
CONFIGS = ("trl_defaults", "wenmai")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: per shape)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: per shape)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of steady_pairs_per_s")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=5e-5,
        help="the same for both (Wenmai's dpo default; TRL's 1e-6 barely moves the loss in a few steps)",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    parser.add_argument("--only", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: run one configuration here
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    shape["steps"] = args.steps or shape["steps"]
    shape["batch"] = args.batch or shape["batch"]
    if args.only:
        print(json.dumps(run_one(args.only, args.shape, shape, args.learning_rate, args.warmup_steps)), flush=True)
        return
    results = []
    for name in args.configs.split(","):
        command = [
            sys.executable,
            __file__,
            "--shape",
            args.shape,
            "--steps",
            str(shape["steps"]),
            "--batch",
            str(shape["batch"]),
            "--warmup-steps",
            str(args.warmup_steps),
            "--learning-rate",
            str(args.learning_rate),
            "--only",
            name,
        ]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
        result = json.loads(lines[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with args.out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    print(table(results))


def run_one(name: str, shape_name: str, shape: dict, learning_rate: float, warmup_steps: int) -> dict:
    """Build the model, data and trainer of one configuration, train, and measure."""
    import torch
    from transformers import TrainerCallback

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix=f"wenmai-dpo-speed-{name}-"))
    tokenizer = build_tokenizer(work / "tokenizer")
    cuda = torch.cuda.is_available()
    model = random_model(shape, len(tokenizer), tokenizer, torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.to("cuda")
    pairs = random_pairs(tokenizer, shape["steps"] * shape["batch"], shape["prompt"], shape["completion"])

    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 5))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = build_trainer(name, model, tokenizer, pairs, shape, learning_rate, work)
    trainer.add_callback(Clock())
    built = time.perf_counter()
    trainer.train()
    ended = time.perf_counter()
    steps = len(times)
    steady = (
        (steps - warmup_steps) * shape["batch"] / (times[-1] - times[warmup_steps - 1])
        if steps > warmup_steps
        else None
    )
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    args = trainer.args
    return {
        "config": name,
        "shape": shape_name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "pairs": len(pairs),
        "batch": shape["batch"],
        "steps": steps,
        "prompt_tokens": shape["prompt"],
        "completion_tokens": shape["completion"],
        "pairs_per_s": round(len(pairs) / (ended - started), 3),
        "steady_pairs_per_s": round(steady, 3) if steady else None,
        "setup_s": round(built - started, 2),
        "train_s": round(ended - built, 2),
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": "cuda allocated" if cuda else "process RSS",
        "losses": losses,
        "settings": {
            "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
            "precompute_ref_log_probs": args.precompute_ref_log_probs,
            "use_liger_kernel": args.use_liger_kernel,
            "bf16": args.bf16,
            "reference": "ref adapter copy" if "ref" in trainer.model.peft_config else "adapter disabled",
        },
    }


def build_trainer(name: str, model, tokenizer, pairs: list[dict], shape: dict, learning_rate: float, work: Path):
    """The trainer of a configuration: TRL's defaults, or what Wenmai's `dpo` stage builds."""
    import importlib.util

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from finetune.model import attach_new_adapter, lora_config
    from finetune.recipe import LoraSection, Recipe

    lora = LoraSection(r=16, alpha=32, dropout=0.0)
    data = Dataset.from_list(pairs)
    max_length = shape["prompt"] + shape["completion"] + 1
    common = {
        "per_device_train_batch_size": shape["batch"],
        "max_steps": shape["steps"],
        "learning_rate": learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "max_length": max_length,
    }
    if name == "trl_defaults":
        args = DPOConfig(output_dir=str(work / "out"), use_cpu=not torch.cuda.is_available(), **common)
        return DPOTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora_config(lora)
        )

    from finetune.recipe import DpoOptions as Config
    from finetune.stages.preference import trainer_args
    from finetune.training import build_training_args

    liger = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    options = Config(
        dataset="pairs",
        max_steps=shape["steps"],
        batch_size=shape["batch"],
        learning_rate=learning_rate,
        warmup=0,
        lr_scheduler="linear",
        seq_len=max_length,
        precompute_ref_log_probs=True,
        precompute_batch_size=2 * shape["batch"],
        gradient_checkpointing=False,
        liger_kernel=liger,
        logging_steps=1,
        save_steps=10**6,
    )
    recipe = Recipe.model_validate(
        {
            "name": "bench",
            "model": {"path": "random"},
            "lora": lora.model_dump(),
            "data": {"pairs": {"path": "pairs.jsonl", "format": "pairs"}},
            "stages": [{"dpo": options.model_dump(exclude_unset=True)}],
            "tracking": {"backends": ["jsonl"]},
        }
    )
    args = build_training_args(
        DPOConfig,
        options,
        recipe,
        work,
        "bench",
        has_eval=False,
        eval_on_start=False,
        max_length=max_length,
        beta=options.beta,
        **trainer_args(options, "dpo", len(pairs)),
    )
    args.seed, args.data_seed = 0, None  # the same data order and initial adapter as the TRL run
    torch.manual_seed(0)
    policy = attach_new_adapter(model, lora)  # an adapter-carrying model, as a dpo stage gets from sft
    return DPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer)


def random_model(shape: dict, vocab: int, tokenizer, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab_size"] or vocab,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def random_pairs(tokenizer, n: int, prompt_tokens: int, completion_tokens: int) -> list[dict]:
    """Plain-text pairs of about the given token lengths, from single-token words (fixed seed)."""
    words = [
        t
        for t in (tokenizer.decode([i]) for i in range(len(tokenizer)))
        if t.startswith(" ") and t[1:].isalpha() and len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
    ]
    rng = random.Random(0)

    def text(count: int) -> str:
        return "".join(rng.choice(words) for _ in range(count))

    return [
        {"prompt": text(prompt_tokens), "chosen": text(completion_tokens - 1), "rejected": text(completion_tokens - 1)}
        for _ in range(n)
    ]


def table(results: list[dict]) -> str:
    lines = [
        "| configuration | device | pairs/s (all) | pairs/s (steady) | speed-up | peak memory | loss at steps 1 / mid / last |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = next((r for r in results if r["config"] == "trl_defaults"), None)
    for r in results:
        speedup = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "—"
        losses = r["losses"]
        marks = " / ".join(str(losses[i]) for i in sorted({0, len(losses) // 2, len(losses) - 1})) if losses else "—"
        lines.append(
            f"| {r['config']} | {r['device']} | {r['pairs_per_s']} | {r['steady_pairs_per_s']} | {speedup} | "
            f"{r['peak_memory_gib']} GiB ({r['peak_memory_kind']}) | {marks} |"
        )
    shape = results[0]
    return "\n".join(lines) + (
        f"\n{shape['shape']} shape, {shape['pairs']} pairs, batch {shape['batch']}, prompt "
        f"{shape['prompt_tokens']} + answer {shape['completion_tokens']} tokens"
    )


if __name__ == "__main__":
    main()
