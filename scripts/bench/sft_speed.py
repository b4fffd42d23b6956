"""SFT speed and memory: plain transformers + PEFT against Wenmai's SFT stage, in one run, on the same
random-init Llama-3 architecture, the same token data and the same seed.

    python scripts/bench/sft_speed.py --workload lora --shape 8b     # GPU (see scripts/bench/README.md)
    python scripts/bench/sft_speed.py --workload qlora --shape 8b
    python scripts/bench/sft_speed.py --workload lora --shape tiny   # CPU: checks the harness (a test runs it)

Configurations (the issue's baseline rows first; the first row of a workload is the reference for ratios):
  lora:  hf-gc-b4, hf-liger-gc-b4, hf-nogc-b2 (plain Trainer + PEFT), wenmai (memory budget 0.7 x the
         reference's peak), wenmai-max (budget: 85% of the GPU)
  qlora: hf-qlora-naive-b1 (nf4 + prepare_model_for_kbit_training), wenmai-qlora (budget 16 GiB)
Every configuration trains the same global batch per optimiser step (micro-batch x accumulation), so the
losses at each step are comparable. On a GPU each configuration runs in its own process (a clean peak);
on CPU all run in this one. Prints one JSON line per configuration, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {  # Llama-3-8B, Llama-3.2-1B, and a tiny one for CPU checks
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=600,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}
DEFAULTS = {
    "8b": dict(steps=8, warmup=2, seq_len=2048),
    "1b": dict(steps=10, warmup=3, seq_len=2048),
    "tiny": dict(steps=4, warmup=1, seq_len=128),
}
CONFIGS = {  # name -> (runner, micro-batch, options)
    "hf-gc-b4": ("hf", 4, {"checkpointing": True}),
    "hf-liger-gc-b4": ("hf", 4, {"checkpointing": True, "liger": True}),
    "hf-nogc-b2": ("hf", 2, {}),
    "wenmai": ("wenmai", None, {"budget": "reference"}),
    "wenmai-max": ("wenmai", None, {"budget": 0.85}),
    "hf-qlora-naive-b1": ("hf", 1, {"checkpointing": True, "nf4": True}),
    "wenmai-qlora": ("wenmai", None, {"nf4": True, "budget": 16.0}),
}
WORKLOADS = {
    "lora": ["hf-gc-b4", "hf-liger-gc-b4", "hf-nogc-b2", "wenmai", "wenmai-max"],
    "qlora": ["hf-qlora-naive-b1", "wenmai-qlora"],
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, per the vendors' data sheets
LORA = dict(r=16, alpha=32, dropout=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="lora")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, help="measured optimiser steps (default by shape)")
    parser.add_argument("--warmup", type=int, help="optimiser steps before timing starts (default by shape)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; tiny 128)")
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per optimiser step, every configuration")
    parser.add_argument(
        "--lengths",
        choices=["full", "mixed"],
        default="full",
        help="full: every sequence seq_len tokens (the issue's table); mixed: 1/8 .. 1 of it",
    )
    parser.add_argument("--configs", help="comma-separated subset (default: the workload's)")
    parser.add_argument("--workdir", type=Path, help="keep the model and outputs here (default: a temp folder)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument(
        "--isolate", action="store_true", help="each configuration in its own process (always on a GPU)"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker.read_text(encoding="utf-8"))
        result = measure(spec)
        args.worker.with_suffix(".out.json").write_text(json.dumps(result), encoding="utf-8")
        return
    for key, value in DEFAULTS[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    rows = run_all(args)
    print(table(rows, args), flush=True)


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every configuration of the workload, in order; prints each result as one JSON line."""
    import torch

    cuda = torch.cuda.is_available()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wenmai-sft-speed-"))
    model_dir = build_model(workdir / f"model-{args.shape}", args.shape, cuda)
    names = args.configs.split(",") if args.configs else WORKLOADS[args.workload]
    results: list[dict] = []
    for name in names:
        runner, micro, options = CONFIGS[name]
        spec = {
            "name": name,
            "runner": runner,
            "micro_batch": micro,
            "options": options,
            "shape": args.shape,
            "model": str(model_dir),
            "workdir": str(workdir),
            "steps": args.steps,
            "warmup": args.warmup,
            "seq_len": args.seq_len,
            "global_batch": args.global_batch,
            "lengths": args.lengths,
            "peak_tflops": args.peak_tflops,
        }
        reference = results[0] if results else {}
        if options.get("budget") == "reference":
            spec["budget"] = round(0.7 * reference["peak_gib"], 2) if reference.get("peak_gib") else 0.85
        else:
            spec["budget"] = options.get("budget", 0.85)
        skip = skip_reason(spec, cuda)
        result = (
            {"config": name, "skipped": skip}
            if skip
            else (isolated(spec, workdir) if cuda or args.isolate else measure(spec))
        )
        result.update(compare(result, reference))
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def skip_reason(spec: dict, cuda: bool) -> str | None:
    """Why a configuration cannot run on this machine (None: it can)."""
    import importlib.util

    options = spec["options"]
    if options.get("nf4") and not (cuda and importlib.util.find_spec("bitsandbytes")):
        return "nf4 needs a CUDA GPU and bitsandbytes"
    if options.get("liger") and not (cuda and importlib.util.find_spec("liger_kernel")):
        return "Liger needs a CUDA GPU and liger-kernel"
    if spec["name"] == "wenmai-max" and not cuda:
        return "same as wenmai without a GPU (the budget only matters there)"
    return None


def isolated(spec: dict, workdir: Path) -> dict:
    """Run one configuration in a fresh process (its own peak memory); errors become a result row."""
    path = workdir / f"{spec['name']}.spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    log = path.with_suffix(".log")
    with log.open("w", encoding="utf-8") as stream:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(path)], stdout=stream, stderr=subprocess.STDOUT
        )
    out = path.with_suffix(".out.json")
    if done.returncode == 0 and out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    print("\n".join(lines[-40:]), file=sys.stderr, flush=True)  # the traceback, into the run's log
    return {
        "config": spec["name"],
        "error": (lines[-1] if lines else "") + f" (exit code {done.returncode}; log {log})",
    }


def measure(spec: dict) -> dict:
    """Train one configuration; tokens/s and loss from the steps after warmup; peak GPU memory over training."""
    import torch

    cuda = torch.cuda.is_available()
    rows = token_rows(spec)
    timer = step_timer(spec["warmup"], spec["warmup"] + spec["steps"], cuda)
    try:
        trainer, plan = (train_hf if spec["runner"] == "hf" else train_wenmai)(spec, rows, timer)
    except torch.cuda.OutOfMemoryError:
        return {"config": spec["name"], "error": "out of GPU memory"}
    log = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    seconds = timer.seconds
    tokens = timer.tokens
    result = {
        "config": spec["name"],
        "shape": spec["shape"],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "micro_batch": plan.get("batch_size"),
        "accumulation": plan.get("gradient_accumulation"),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if cuda else None,
        "losses": [round(x, 4) for x in log],
        "plan": plan,
    }
    result["mfu"] = mfu(result["tokens_per_s"], spec, rows)
    return result


def train_hf(spec: dict, rows: list[dict], timer) -> tuple:
    """The plain user: AutoModel + PEFT + transformers' Trainer, a padding collator, transformers' defaults."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from finetune.training import checkpointing_args  # the argument's name changed within transformers 5.x

    cuda, options = torch.cuda.is_available(), spec["options"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    if options.get("nf4"):
        from transformers import BitsAndBytesConfig

        kwargs.update(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
            device_map={"": 0},
        )
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    if options.get("nf4"):
        model = prepare_model_for_kbit_training(model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    micro = spec["micro_batch"]
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / spec["name"]),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=spec["global_batch"] // micro,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        bf16=cuda,
        use_cpu=not cuda,
        **checkpointing_args(TrainingArguments, bool(options.get("checkpointing"))),
        use_liger_kernel=bool(options.get("liger")),
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        callbacks=[timer],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    _train(trainer, cuda)
    return trainer, {"batch_size": micro, "gradient_accumulation": spec["global_batch"] // micro}


def train_wenmai(spec: dict, rows: list[dict], timer) -> tuple:
    """Wenmai's SFT stage as `wenmai run` builds it (`finetune.stages.sft.build_trainer`), on the same rows."""
    import torch

    from finetune.model import load_tokenizer, resolve_source
    from finetune.pipeline import load_recipe
    from finetune.speed import kernel_scope
    from finetune.stages.sft import build_trainer

    recipe = load_recipe(write_recipe(spec, torch.cuda.is_available())).recipe
    config = recipe.stage_configs()[0]
    tokenizer = load_tokenizer(recipe.model, resolve_source(recipe.model))
    stage_dir = Path(spec["workdir"]) / spec["name"]
    trainer, plan = build_trainer(
        recipe,
        config,
        tokenizer,
        rows,
        None,
        stage_dir,
        "bench",
        [timer],
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    with kernel_scope(plan, trainer.model):
        _train(trainer, torch.cuda.is_available())
    return trainer, {**plan.summary(), "why": plan.describe()}


def _train(trainer, cuda: bool) -> None:
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for printer in (PrinterCallback, ProgressCallback):  # stdout carries one JSON line per configuration, nothing else
        trainer.remove_callback(printer)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the weights are already there: the peak is the whole training
    trainer.train()


def write_recipe(spec: dict, cuda: bool) -> Path:
    """The Wenmai recipe for one configuration: the bench's model, LoRA r 16 on all linear layers, speed options."""
    folder = Path(spec["workdir"])
    data = folder / "unused.jsonl"  # the stage's dataset key must name a file; the bench passes token rows itself
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}) + "\n",
        encoding="utf-8",
    )
    dtype, precision = ("bfloat16", "bf16") if cuda else ("float32", "fp32")
    quantization = "nf4" if spec["options"].get("nf4") else "none"
    path = folder / f"{spec['name']}.yaml"
    path.write_text(
        f"""\
name: bench-{spec["name"]}
model: {{path: {spec["model"]}, dtype: {dtype}, quantization: {quantization}}}
lora: {{r: {LORA["r"]}, alpha: {LORA["alpha"]}, dropout: {LORA["dropout"]}, targets: all-linear}}
data:
  d: {{path: {data}, format: chat}}
stages:
  - sft: {{dataset: d, max_steps: {spec["warmup"] + spec["steps"]}, batch_size: {spec["global_batch"]}, seq_len: {spec["seq_len"]},
          learning_rate: 2.0e-4, lr_scheduler: constant, warmup: 0, precision: {precision}, logging_steps: 1, save_steps: 100000, seed: 0,
          speed: {{memory_budget: {spec["budget"]}}}}}
tracking: {{backends: [jsonl]}}
output: {{root: {folder / "runs"}}}
""",
        encoding="utf-8",
    )
    return path


def token_rows(spec: dict) -> list[dict]:
    """Sequences of a repeated random motif (learnable: the loss falls), the first quarter masked as a prompt."""
    rng = random.Random(0)
    vocab = min(SHAPES[spec["shape"]]["vocab_size"], 32000)
    seq = spec["seq_len"]
    rows = []
    for _ in range(spec["global_batch"] * (spec["warmup"] + spec["steps"])):
        length = seq if spec["lengths"] == "full" else rng.randint(max(seq // 8, 8), seq)
        motif = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 64))]
        ids = (motif * (length // len(motif) + 1))[:length]
        prompt = length // 4
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def step_timer(start: int, stop: int, cuda: bool):
    """A callback timing optimiser steps start+1 .. stop and counting the tokens they saw."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds = tokens = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start:
                self._sync()
                self._t0, self._tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop:
                self._sync()
                self.seconds = time.perf_counter() - self._t0
                self.tokens = state.num_input_tokens_seen - self._tokens0

        def _sync(self):
            if cuda:
                import torch

                torch.cuda.synchronize()

    return StepTimer()


def build_model(folder: Path, shape: str, cuda: bool) -> Path:
    """A random-init Llama of the shape, bf16 (fp32 on CPU), with the test suite's ChatML tokenizer; built once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tokenizer  # one tokenizer builder for the tests and the benchmarks

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        **SHAPES[shape], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # on the GPU: an 8B model initialises in seconds
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(folder)
    del model
    if cuda:
        torch.cuda.empty_cache()  # the configurations run in their own processes and need the memory
    return folder


def mfu(tokens_per_s: float | None, spec: dict, rows: list[dict]) -> float | None:
    """Model FLOPs utilisation: useful LoRA work (forward 2N, input-gradient backward 2N, causal attention),
    recomputation not counted, over the GPU's dense bf16 peak."""
    import torch

    if not tokens_per_s or not torch.cuda.is_available():
        return None
    peak = spec.get("peak_tflops") or next(
        (v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None
    )
    if peak is None:
        return None
    s = SHAPES[spec["shape"]]
    hidden, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    head_dim = hidden // s["num_attention_heads"]
    per_layer = hidden * hidden * 2 + hidden * s["num_key_value_heads"] * head_dim * 2 + 3 * hidden * inter
    matmul = layers * per_layer + s["vocab_size"] * hidden
    lora = (
        layers * LORA["r"] * (4 * hidden + 2 * s["num_key_value_heads"] * head_dim + 2 * hidden + 3 * (hidden + inter))
    )
    context = sum(len(r["input_ids"]) ** 2 for r in rows) / sum(
        len(r["input_ids"]) for r in rows
    )  # tokens attended, x2
    flops = (
        4 * matmul + 6 * lora + 6 * layers * context * hidden
    )  # attention: 2 x 2 x (context / 2) forward, x3 with backward
    return round(tokens_per_s * flops / (peak * 1e12), 4)


def compare(result: dict, reference: dict) -> dict:
    """Ratios to the reference row (tokens/s, peak memory) and the largest loss difference at the same steps."""
    if not reference or "losses" not in result or "losses" not in reference or result is reference:
        return {}
    out = {}
    if result.get("tokens_per_s") and reference.get("tokens_per_s"):
        out["speedup"] = round(result["tokens_per_s"] / reference["tokens_per_s"], 3)
    if result.get("peak_gib") and reference.get("peak_gib"):
        out["memory_ratio"] = round(result["peak_gib"] / reference["peak_gib"], 3)
    pairs = list(zip(result["losses"], reference["losses"], strict=False))
    out["max_loss_diff"] = round(max(abs(a - b) for a, b in pairs), 4) if pairs else None
    return out


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """The markdown table: one line per configuration, ratios to the first."""
    lines = [
        f"{args.workload} SFT, shape {args.shape}, seq {args.seq_len}, global batch {args.global_batch}, {args.lengths} lengths",
        "",
        "| setting | micro-batch x accumulation | tokens/s | peak GiB | speed vs first | memory vs first | MFU | max loss diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['config']} | {r.get('skipped') or 'error: ' + r['error']} | | | | | | |")
            continue
        split = f"{r.get('micro_batch')} x {r.get('accumulation')}"
        cells = [
            r["config"],
            split,
            r.get("tokens_per_s"),
            r.get("peak_gib"),
            r.get("speedup"),
            r.get("memory_ratio"),
            r.get("mfu"),
            r.get("max_loss_diff"),
        ]
        lines.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
