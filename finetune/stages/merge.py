"""Stage `merge`: fold one adapter into its base model, QLoRA-correct, and refuse a merge that drifted.

Writes `model/` (a plain from_pretrained folder with the trained tokenizer), `template.json` (the contract,
carried forward) and `parity.json` (the probe set and the drift of the merged model, in memory and reloaded
from disk, from the unmerged adapter). The options are `finetune.recipe.MergeOptions`.
"""

from __future__ import annotations

import gc
import sys
import time

from finetune import merging, parity
from finetune import model as model_path
from finetune.data.template import trained_tokenizer, write_contract
from finetune.errors import WenmaiError
from finetune.recipe import MergeOptions, Recipe
from finetune.run_dir import StageContext, StageResult, atomic_dir, atomic_write_json


def run(ctx: StageContext) -> StageResult:
    """Merge, compare against the unmerged adapter, save atomically, reload from disk, compare again."""
    from transformers import AutoModelForCausalLM

    config: MergeOptions = ctx.config
    recipe = ctx.recipe
    started = time.perf_counter()
    adapter_stage = ctx.input_stages["adapter"]
    produced = ctx.inputs["adapter"]
    trained = trained_tokenizer(ctx.run_dir, recipe, produced, f"stage {config.stage_name}")
    tokenizer, contract = trained.tokenizer, trained.contract

    section = merging.merge_section(recipe.model)
    source = model_path.resolve_source(section)
    device = merging.choose_device(config.device)
    memory = merging.plan_memory(section, source.location, device)
    print(f"merge: {memory.describe()}", file=sys.stderr, flush=True)
    tolerance = config.tolerance or parity.default_tolerance(section.dtype)

    dataset = parity.probe_dataset(recipe, config.probe_dataset)
    probes = parity.build_probes(recipe, tokenizer, dataset, config.probes)
    quantised = _quantised_traces(recipe, source, produced["adapter"], probes, contract, config)
    base = model_path.load_model(section, source).to(device).eval()
    adapted = model_path.load_adapter(base, produced["adapter"], trainable=False).eval()
    traces = parity.trace(adapted, probes, contract["stop_token_ids"], config.max_new_tokens)
    merged = merging.apply_contract(merging.fold(adapted), contract)
    comparisons = [parity.compare("merged", merged, traces, tolerance, reference="unmerged adapter")]
    quantisation_gap = _quantisation_gap(recipe, merged, quantised, tolerance)

    report = {
        "stage": config.stage_name,
        "reference": f"base model ({section.dtype}, unquantised) + adapter of stage '{adapter_stage}', unmerged",
        "gate": "comparisons (against the reference); quantisation_gap is reported, not gated",
        "adapter": {"stage": adapter_stage, **merging.adapter_settings(produced["adapter"])},
        "training_quantization": recipe.model.quantization,
        "merge_dtype": section.dtype,
        "memory": memory.to_json(),
        "probe_dataset": dataset,
        "probes": parity.probes_json(traces, tokenizer),
        "quantisation_gap": quantisation_gap,
    }
    with atomic_dir(ctx.stage_dir / "model") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, adapted, base
        gc.collect()
        reloaded = (
            AutoModelForCausalLM.from_pretrained(str(tmp), dtype=model_path.compute_dtype(section)).to(device).eval()
        )
        comparisons.append(
            parity.compare("merged, reloaded from disk", reloaded, traces, tolerance, reference="unmerged adapter")
        )
        del reloaded
        report["comparisons"] = {c.name: c.to_json() for c in comparisons}
        report["passed"] = all(c.passed for c in comparisons)
        atomic_write_json(ctx.stage_dir / "parity.json", report)
        if not report["passed"]:
            raise WenmaiError(
                "merge refused: the merged model drifted from the adapter it was trained as (nothing was written; "
                f"details in {ctx.stage_dir / 'parity.json'})\n  - "
                + "\n  - ".join(c.line() for c in comparisons)
                + "\nThe gate compares with the unquantised base + adapter: a merge into a quantised or wrong-dtype "
                f"base drifts from it; if the drift is expected, loosen stages.{config.stage_name}.tolerance"
            )
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
            **(
                {"quantisation_gap_max_abs_logit_diff": float(f"{quantisation_gap['max_abs_logit_diff']:.3g}")}
                if quantisation_gap.get("measured")
                else {}
            ),
            "merge_s": round(time.perf_counter() - started, 2),
        },
    )


def _quantised_traces(recipe: Recipe, source, adapter, probes, contract: dict, config: MergeOptions):
    """For a QLoRA run: the probes through the model the adapter trained on (4-bit base + adapter), or why not."""
    if recipe.model.quantization == "none":
        return None
    problems = model_path.check_hardware(recipe.model)
    if problems:
        return "; ".join(problems)
    base = model_path.load_model(recipe.model, source).eval()
    adapted = model_path.load_adapter(base, adapter, trainable=False).eval()
    traces = parity.trace(adapted, probes, contract["stop_token_ids"], config.max_new_tokens)
    del adapted, base
    gc.collect()
    return traces


def _quantisation_gap(recipe: Recipe, merged, quantised, tolerance) -> dict:
    """How far the merged model is from the 4-bit model the adapter trained on: reported, never gated.

    The gate compares with the unquantised base + adapter (what a merge can reproduce exactly); this gap is
    what quantisation itself costs, which no merge removes.
    """
    if quantised is None:
        return {"measured": False, "why": "training used an unquantised base: there is no gap to measure"}
    if isinstance(quantised, str):
        return {"measured": False, "why": quantised}
    gap = parity.compare(
        "merged vs the quantised model training saw",
        merged,
        quantised,
        tolerance,
        reference=f"base model quantised as in training ({recipe.model.quantization}) + adapter",
    )
    return {"measured": True, "gated": False, **gap.to_json()}


def check(options: MergeOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """Nothing beyond the recipe's own checks."""
    return []


def machine_problems(options: MergeOptions) -> list[str]:
    """Nothing: memory for the merge is planned when it runs (`merging.plan_memory`)."""
    return []
