"""Stage `export`: a shippable folder, checked before it appears.

`model/` holds a from_pretrained folder (safetensors, sharded when large), the trained tokenizer and chat
template, `generation_config.json` stopping at every stop id of the template contract, `template.json`,
GGUF files when asked, `README.md` (model card) and `wenmai_provenance.json`. It is built in a temporary
folder, reloaded from disk with plain transformers and compared with the model it came from; GGUF files are
loaded back and compared with the HF export. Only when every check passes is it renamed into place.
The options are `finetune.recipe.ExportOptions`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from finetune import exporting, gguf_export, parity
from finetune.data.template import trained_tokenizer
from finetune.errors import WenmaiError
from finetune.merging import choose_device, merge_section, plan_memory
from finetune.model import resolve_source
from finetune.model_card import PROVENANCE_FILE
from finetune.recipe import ExportOptions, Recipe
from finetune.run_dir import StageContext, StageResult, atomic_dir, atomic_write_json


def run(ctx: StageContext) -> StageResult:
    """Write the export in a temporary folder, verify it from disk, and rename it into place."""
    import torch
    from transformers import AutoModelForCausalLM

    config: ExportOptions = ctx.config
    recipe, run_dir = ctx.recipe, ctx.run_dir
    started = time.perf_counter()
    produced = ctx.inputs["model"]
    model_dir = Path(produced["model"])
    model_stage = ctx.input_stages["model"]
    trained = trained_tokenizer(run_dir, recipe, produced, f"stage {config.stage_name}")
    tokenizer, contract = trained.tokenizer, trained.contract

    gguf_types, skipped = list(dict.fromkeys(config.gguf_types)) if "gguf" in config.formats else [], None
    if gguf_types and importlib.util.find_spec("gguf") is None:
        if config.gguf_required:
            raise WenmaiError(
                "formats: gguf needs the gguf package: pip install 'wenmai[gguf]' (or set gguf_required: false)"
            )
        gguf_types, skipped = [], "the gguf package is not installed (pip install 'wenmai[gguf]')"
    if gguf_types:  # refuse an unsupported model before any work
        gguf_export.check_supported(
            json.loads((model_dir / "config.json").read_text(encoding="utf-8")), model_dir / "tokenizer.json"
        )

    section = merge_section(recipe.model)
    dtype = getattr(torch, section.dtype)
    device = choose_device(config.device)
    memory = plan_memory(
        section.model_copy(update={"dtype": "float32"}) if gguf_types else section, str(model_dir), device
    )
    print(f"export: {memory.describe()}", file=sys.stderr, flush=True)

    probes = parity.build_probes(recipe, tokenizer, parity.probe_dataset(recipe, config.probe_dataset), config.probes)
    stops = contract["stop_token_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    traces = parity.trace(reference, probes, stops, config.max_new_tokens)
    final = ctx.stage_dir / "model"
    with atomic_dir(final) as tmp:
        exporting.write_hf(reference, tokenizer, contract, tmp, config.max_shard_size)
        del reference
        exported = exporting.reload_hf(tmp, contract, dtype, device)  # the folder as a user loads it
        hf_tolerance = config.tolerances.get("hf") or parity.default_tolerance(section.dtype)
        comparisons = [
            parity.compare("HF export", exported, traces, hf_tolerance, reference=f"stage '{model_stage}' model")
        ]
        if gguf_types and comparisons[0].max_abs_logit_diff > 0:  # GGUF is compared with the HF export itself
            traces = parity.trace(exported, probes, stops, config.max_new_tokens)
        del exported

        provenance = exporting.provenance_block(run_dir, recipe, model_stage, config.producer)
        pre_tokenizer = gguf_export.pre_tokenizer_name(tmp, resolve_source(recipe.model, convert=False).gguf_path)[0]
        gguf_files = []
        for gguf_type in gguf_types:
            tolerance = config.tolerances.get(gguf_type) or parity.default_tolerance(f"gguf-{gguf_type}", section.dtype)
            info, comparison = exporting.write_and_check_gguf(
                tmp,
                gguf_type,
                contract,
                recipe.name,
                pre_tokenizer,
                provenance,
                traces,
                tolerance,
                device,
                probes if not gguf_files else None,  # every file has the same vocabulary: check the tokenizer once
            )
            gguf_files.append(info)
            comparisons.append(comparison)

        report = {
            "stage": config.stage_name,
            "model_stage": model_stage,
            "probes": parity.probes_json(traces, tokenizer),
            "comparisons": {c.name: c.to_json() for c in comparisons},
            "gguf": gguf_files,
            "gguf_skipped": skipped,
            "passed": all(c.passed for c in comparisons),
        }
        atomic_write_json(ctx.stage_dir / "parity.json", report)
        if not report["passed"]:
            raise WenmaiError(
                f"export refused: the exported model drifted from the one it came from; nothing was written to {final} "
                f"(details in {ctx.stage_dir / 'parity.json'})\n  - " + "\n  - ".join(c.line() for c in comparisons)
            )
        atomic_write_json(tmp / "parity.json", report)
        exporting.write_card(tmp, run_dir, recipe, provenance, comparisons, gguf_files, contract, config)

    return StageResult(outputs=_outputs(gguf_files), summary=_summary(comparisons, gguf_files, skipped, started))


def check(options: ExportOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """GGUF files need the gguf package (unless the export may skip them)."""
    if "gguf" in options.formats and options.gguf_required and importlib.util.find_spec("gguf") is None:
        return [("formats", "gguf needs the gguf package: pip install 'wenmai[gguf]' (or set gguf_required: false)")]
    return []


def machine_problems(options: ExportOptions) -> list[str]:
    """Nothing: memory for the export is planned when it runs (`merging.plan_memory`)."""
    return []


def _outputs(gguf_files: list[dict]) -> dict[str, str]:
    outputs = {
        "model": "model",
        "tokenizer": "model",
        "template": "model/template.json",
        "parity": "parity.json",
        "model_card": "model/README.md",
        "provenance": f"model/{PROVENANCE_FILE}",
    }
    outputs.update({f"gguf_{g['type']}": f"model/{g['file']}" for g in gguf_files})
    return outputs


def _summary(comparisons: list, gguf_files: list[dict], skipped: str | None, started: float) -> dict:
    summary = {"formats": ["hf"] + (["gguf"] if gguf_files else []), "parity_passed": True}
    for c in comparisons:
        key = c.name.lower().replace(" ", "_").replace("_export", "")
        summary[f"{key}_max_abs_logit_diff"] = float(f"{c.max_abs_logit_diff:.3g}")
        summary[f"{key}_greedy_agreement"] = c.greedy_agreement
    if skipped:
        summary["gguf_skipped"] = skipped
    summary["export_s"] = round(time.perf_counter() - started, 2)
    return summary
