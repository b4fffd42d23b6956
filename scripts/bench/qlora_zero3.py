"""QLoRA (nf4) with DeepSpeed ZeRO-3 on one GPU against plain QLoRA: it runs, saves, reloads; peak memory;
Wenmai's memory estimate against the measured peak.

The model is a random-init Llama-3.2-1B shape built here (no hub). Each configuration trains the SFT stage
of the same recipe through `wenmai`'s pipeline in its own process under torchrun (1 process), then this
script reloads the saved adapter with plain PEFT, without DeepSpeed.

    python scripts/bench/qlora_zero3.py                                  # GPU: 1B shape, nf4, bf16
    python scripts/bench/qlora_zero3.py --shape tiny --quantization none # CPU: checks the harness (tests do)

Prints one JSON line per configuration, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {  # Llama-3.2-1B, and a tiny one for CPU checks
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=600,
        max_position_embeddings=1024,
    ),
}
CONFIGS = {"plain": "distributed: {strategy: none}", "zero3": "distributed: {strategy: deepspeed, zero_stage: 3}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument(
        "--quantization", choices=["nf4", "none"], default=None, help="default: nf4 on a GPU, none on CPU"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--configs", default="plain,zero3")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the model and runs here (default: a temp folder)"
    )
    parser.add_argument("--worker", nargs=2, metavar=("RECIPE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker[0]), Path(args.worker[1]))

    import torch

    cuda = torch.cuda.is_available()
    quantization = args.quantization or ("nf4" if cuda else "none")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wenmai-bench-"))
    model = build_model(workdir / f"model-{args.shape}", args.shape)
    rows = []
    for name in args.configs.split(","):
        recipe = write_recipe(workdir / f"{name}.yaml", model, quantization, CONFIGS[name], args, cuda)
        row = {
            "config": name,
            "shape": args.shape,
            "quantization": quantization,
            "device": device_name(),
            **run(recipe, workdir / "runs" / name, cuda),
        }
        row.update(estimate(recipe, row.get("peak_bytes")))
        row.update(reload(model, workdir / "runs" / name / "sft" / "adapter", quantization, cuda))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(table(rows))


def worker(recipe: Path, run_dir: Path) -> None:
    """One configuration, inside torchrun: the pipeline, then this process's peak memory."""
    import resource

    import torch

    from finetune.distributed.ranks import is_main_process
    from finetune.pipeline import load_recipe, start

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    start(load_recipe(recipe), run_dir, log=lambda _message: None)
    if is_main_process():
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        measured = {
            "seconds": round(time.perf_counter() - started, 1),
            "peak_bytes": peak,
            "host_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        (run_dir.parent / f"{run_dir.name}.measured.json").write_text(json.dumps(measured), encoding="utf-8")


def build_model(folder: Path, shape: str) -> Path:
    """A random-init Llama of the given shape in bf16 with a small ChatML tokenizer (built once per folder)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tokenizer  # the test suite's ChatML BPE tokenizer: one builder for both

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        **SHAPES[shape],
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def write_recipe(path: Path, model: Path, quantization: str, distributed: str, args, cuda: bool) -> Path:
    """The benchmark recipe: bf16 on a GPU (nf4 stored in bf16, as ZeRO-3 needs), fp32 on CPU."""
    dtype, precision = ("bfloat16", "bf16") if cuda else ("float32", "fp32")
    path.write_text(
        f"""\
name: bench-{path.stem}
model: {{path: {model}, dtype: {dtype}, quantization: {quantization}}}
lora: {{r: 16, alpha: 32, dropout: 0.0, targets: all-linear}}
data:
  culture: {{path: {ROOT / "recipes" / "data" / "culture_sft.jsonl"}, format: chat}}
stages:
  - sft: {{dataset: culture, max_steps: {args.steps}, batch_size: {args.batch_size}, seq_len: {args.seq_len},
          packing: true, gradient_checkpointing: true, precision: {precision}, warmup: 0, logging_steps: 5,
          save_steps: 1000}}
{distributed}
""",
        encoding="utf-8",
    )
    return path


def run(recipe: Path, run_dir: Path, cuda: bool) -> dict:
    """Train one configuration under torchrun (1 process); what it measured."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun replaces the previous measurement
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        __file__,
        "--worker",
        str(recipe),
        str(run_dir),
    ]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return {"ok": False, "error": (result.stdout + result.stderr)[-3000:]}
    measured = json.loads((run_dir.parent / f"{run_dir.name}.measured.json").read_text(encoding="utf-8"))
    from finetune.run_dir import RunDir

    summary = RunDir.open(run_dir).status("sft").summary
    return {"ok": True, **measured, "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss")}


def estimate(recipe: Path, peak: int | None) -> dict:
    """Wenmai's per-GPU estimate for the recipe on one process, and its ratio to the measured peak."""
    from finetune.checks.preflight import check
    from finetune.pipeline import load_recipe

    report = check(load_recipe(recipe).recipe, world_size=1, gpus_per_node=1, with_estimates=True)
    if not report.estimates:
        return {}
    est = report.estimates[0]
    out = {"estimate_bytes": int(est.allocated), "estimate_parts": {k: int(v) for k, v in est.parts.items()}}
    if peak:
        out["estimate_over_measured"] = round(est.allocated / peak, 3)
    return out


def reload(model: Path, adapter: Path, quantization: str, cuda: bool) -> dict:
    """Load the saved adapter with plain PEFT (no DeepSpeed): not empty, and it changes the logits."""
    if not (adapter / "adapter_config.json").is_file():
        return {"reload_ok": False}
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.adapters import check_adapter_weights

    weights = check_adapter_weights(adapter)
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if quantization == "nf4":
        kwargs.update(
            device_map={"": 0},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_quant_storage=torch.bfloat16,
            ),
        )
    device = "cuda" if cuda else "cpu"
    ids = torch.tensor([[5, 6, 7, 8, 9]], device=device)
    base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    base = base if quantization == "nf4" else base.to(device)
    with torch.no_grad():
        before = base(ids).logits.float()
        tuned = PeftModel.from_pretrained(base, str(adapter))
        after = tuned(ids).logits.float()
    return {
        "reload_ok": True,
        "adapter_weights": weights,
        "adapter_changes_logits": bool((after - before).abs().max() > 0),
    }


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def table(rows: list[dict]) -> str:
    gib = 1024**3
    lines = [
        "| config | quantization | device | ok | s | peak GiB | estimate GiB | estimate / peak | reload | loss first → last |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        peak = f"{r['peak_bytes'] / gib:.2f}" if r.get("peak_bytes") else "—"
        est = f"{r['estimate_bytes'] / gib:.2f}" if r.get("estimate_bytes") else "—"
        lines.append(
            f"| {r['config']} | {r['quantization']} | {r['device']} | {r['ok']} | {r.get('seconds', '—')} | {peak} | {est} | "
            f"{r.get('estimate_over_measured', '—')} | {r.get('reload_ok')} | {r.get('first_loss')} → {r.get('last_loss')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
