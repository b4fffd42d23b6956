"""Stage `merge`: fold one adapter into its base model, QLoRA-correct, and refuse a merge that drifted.

Writes `model/` (a plain from_pretrained folder with the trained tokenizer), `template.json` (the contract,
carried forward) and `parity.json` (the probe set and the drift of the merged model, in memory and reloaded
from disk, from the unmerged adapter).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.parity import Tolerance
from finetune.stages.base import StageConfig, StageContext, StageResult, dataset_field, input_field

PROBE_FORMATS = ("chat", "instruction", "text")


class Config(StageConfig):
    """Merge an adapter into the base (reloaded unquantised in the training dtype) behind a logit-parity gate (PEFT)."""

    kind: ClassVar[str] = "merge"
    produces: ClassVar[tuple[str, ...]] = ("model",)

    adapter: str | None = input_field("adapter", "Stage whose adapter is merged (default: the latest earlier stage producing one).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to merge and run the probes; auto is CUDA when there is a GPU, else CPU."
    )
    probe_dataset: str | None = dataset_field(
        PROBE_FORMATS, "Dataset the probe prompts come from (default: the first training stage's).", required=False
    )
    probes: int = Field(6, ge=0, le=200, description="Prompts taken from `probe_dataset`; four built-in bilingual ones are always added.")
    max_new_tokens: int = Field(16, ge=1, le=512, description="Greedy tokens generated per probe and compared step by step.")
    tolerance: Tolerance | None = Field(
        None, description="Allowed drift from the unmerged adapter (default per dtype: max |logit diff| 2e-3 for float32, 0.5 for float16, 3.0 for bfloat16)."
    )


def run(ctx: StageContext) -> StageResult:
    """Merge, compare against the unmerged adapter, save atomically, reload from disk, compare again."""
    import gc
    import sys
    import time

    from transformers import AutoModelForCausalLM

    from finetune import merging, parity
    from finetune import model as model_path
    from finetune.errors import WenmaiError
    from finetune.run_dir import atomic_dir, atomic_write_json

    config: Config = ctx.config
    recipe = ctx.recipe
    started = time.perf_counter()
    adapter_stage = ctx.input_stages["adapter"]
    produced = ctx.inputs["adapter"]
    trained = merging.trained_tokenizer(ctx.run_dir, recipe, produced, f"stage {config.stage_name}")
    tokenizer, contract = trained.tokenizer, trained.contract

    section = merging.merge_section(recipe.model)
    source = model_path.resolve_source(section)
    device = merging.choose_device(config.device)
    memory = merging.plan_memory(section, source.location, device)
    print(f"merge: {memory.describe()}", file=sys.stderr, flush=True)
    tolerance = config.tolerance or parity.default_tolerance(section.dtype)

    base = model_path.load_model(section, source).to(device).eval()
    adapted = model_path.load_adapter(base, produced["adapter"], trainable=False).eval()
    dataset = parity.probe_dataset(recipe, config.probe_dataset)
    probes = parity.build_probes(recipe, tokenizer, dataset, config.probes)
    traces = parity.trace(adapted, probes, contract["stop_token_ids"], config.max_new_tokens)
    merged = merging.apply_contract(merging.fold(adapted), contract)
    comparisons = [parity.compare("merged", merged, traces, tolerance, reference="unmerged adapter")]

    report = {
        "stage": config.stage_name,
        "reference": f"base model ({section.dtype}, unquantised) + adapter of stage '{adapter_stage}', unmerged",
        "adapter": {"stage": adapter_stage, **merging.adapter_settings(produced["adapter"])},
        "training_quantization": recipe.model.quantization,
        "merge_dtype": section.dtype,
        "memory": memory.to_json(),
        "probe_dataset": dataset,
        "probes": parity.probes_json(traces, tokenizer),
    }
    with atomic_dir(ctx.stage_dir / "model") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, adapted, base
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=model_path.compute_dtype(section)).to(device).eval()
        comparisons.append(parity.compare("merged, reloaded from disk", reloaded, traces, tolerance, reference="unmerged adapter"))
        del reloaded
        report["comparisons"] = {c.name: c.to_json() for c in comparisons}
        report["passed"] = all(c.passed for c in comparisons)
        atomic_write_json(ctx.stage_dir / "parity.json", report)
        if not report["passed"]:
            raise WenmaiError(
                "merge refused: the merged model drifted from the adapter it was trained as (nothing was written; "
                f"details in {ctx.stage_dir / 'parity.json'})\n  - " + "\n  - ".join(c.line() for c in comparisons)
                + "\nA merge into a quantised or wrong-dtype base does this; if the drift is expected, loosen "
                f"stages.{config.stage_name}.tolerance"
            )
    from finetune.data.template import write_contract

    write_contract(contract, ctx.stage_dir)
    first, last = comparisons
    return StageResult(
        outputs={"model": "model", "tokenizer": "model", "template": "template.json", "parity": "parity.json"},
        summary={
            "adapter_stage": adapter_stage,
            "merge_dtype": section.dtype,
            "memory_needed_gib": memory.to_json()["needed_gib"],
            "parity_passed": True,
            "merged_max_abs_logit_diff": float(f"{first.max_abs_logit_diff:.3g}"),
            "merged_greedy_agreement": first.greedy_agreement,
            "reloaded_max_abs_logit_diff": float(f"{last.max_abs_logit_diff:.3g}"),
            "probes": len(traces),
            "merge_s": round(time.perf_counter() - started, 2),
        },
    )
