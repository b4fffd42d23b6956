"""Stage `export`: a shippable folder, checked before it appears.

`model/` holds a from_pretrained folder (safetensors, sharded when large), the trained tokenizer and chat
template, `generation_config.json` stopping at every stop id of the template contract, `template.json`,
GGUF files when asked, `README.md` (model card) and `wenmai_provenance.json`. It is built in a temporary
folder, reloaded from disk with plain transformers and compared with the model it came from; GGUF files are
loaded back and compared with the HF export. Only when every check passes is it renamed into place.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar, Literal

from pydantic import Field

from finetune.parity import Tolerance
from finetune.stages.base import StageConfig, StageContext, StageResult, dataset_field, input_field

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]


class Config(StageConfig):
    """Export a merged model: HF safetensors (+ GGUF), training chat template, model card, provenance label."""

    kind: ClassVar[str] = "export"
    produces: ClassVar[tuple[str, ...]] = ("model",)

    model: str | None = input_field("model", "Stage whose model is exported (default: the latest earlier stage producing one).")
    formats: list[Literal["hf", "gguf"]] = Field(
        default_factory=lambda: ["hf"], min_length=1, description="hf: safetensors folder (always written); gguf: also GGUF files."
    )
    gguf_types: list[GGUFType] = Field(
        default_factory=lambda: ["f16", "q8_0"], min_length=1, description="GGUF files to write: f32, f16, bf16, q8_0."
    )
    gguf_required: bool = Field(
        True, description="false: skip GGUF (noted in the summary) when the `gguf` package is not installed, instead of failing."
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard (transformers' max_shard_size).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the parity probes run; auto is CUDA when there is a GPU.")
    probe_dataset: str | None = dataset_field(
        ("chat", "instruction", "text"), "Dataset the probe prompts come from (default: the first training stage's).", required=False
    )
    probes: int = Field(6, ge=0, le=200, description="Prompts taken from `probe_dataset`; four built-in bilingual ones are always added.")
    max_new_tokens: int = Field(16, ge=1, le=512, description="Greedy tokens generated per probe and compared step by step.")
    tolerances: dict[Literal["hf", "f32", "f16", "bf16", "q8_0"], Tolerance] = Field(
        default_factory=dict, description="Allowed drift per format (hf, or a GGUF type); default per dtype and GGUF type."
    )
    producer: str | None = Field(None, description="Organisation (or service filing number) named as producer in the provenance label.")
    intended_use: str | None = Field(None, description="Intended-use text for the model card (a sound default is written otherwise).")
    license: str | None = Field(None, description="Licence id for the model card's metadata (e.g. apache-2.0); check the base model's.")

    def check(self) -> list[tuple[str, str]]:
        if "gguf" in self.formats and self.gguf_required and importlib.util.find_spec("gguf") is None:
            return [("formats", "gguf needs the gguf package: pip install 'wenmai[gguf]' (or set gguf_required: false)")]
        return []


def run(ctx: StageContext) -> StageResult:
    """Write the export in a temporary folder, verify it from disk, and rename it into place."""
    import json
    import os
    import shutil
    import sys
    import time
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import gguf_export, model_card, parity
    from finetune.data.template import verify_contract, write_contract
    from finetune.errors import WenmaiError
    from finetune.merging import (
        apply_contract,
        choose_device,
        finished_outputs,
        merge_section,
        plan_memory,
        trained_tokenizer,
    )
    from finetune.model import resolve_source
    from finetune.recipe import wiring
    from finetune.run_dir import atomic_dir, atomic_write_json, utc_now

    config: Config = ctx.config
    recipe, run_dir = ctx.recipe, ctx.run_dir
    started = time.perf_counter()
    produced = ctx.inputs["model"]
    model_dir = Path(produced["model"])
    trained = trained_tokenizer(run_dir.root, finished_outputs(run_dir, recipe), produced, f"stage {config.stage_name}")
    tokenizer, contract = trained.tokenizer, trained.contract

    gguf_types, skipped = list(dict.fromkeys(config.gguf_types)) if "gguf" in config.formats else [], None
    if gguf_types and importlib.util.find_spec("gguf") is None:
        if config.gguf_required:
            raise WenmaiError("formats: gguf needs the gguf package: pip install 'wenmai[gguf]' (or set gguf_required: false)")
        gguf_types, skipped = [], "the gguf package is not installed (pip install 'wenmai[gguf]')"
    if gguf_types:  # refuse an unsupported model before any work
        gguf_export.check_supported(json.loads((model_dir / "config.json").read_text(encoding="utf-8")), model_dir / "tokenizer.json")

    section = merge_section(recipe.model)
    dtype = getattr(torch, section.dtype)
    device = choose_device(config.device)
    probe_section = section.model_copy(update={"dtype": "float32"}) if gguf_types else section
    memory = plan_memory(probe_section, str(model_dir), device)
    print(f"export: {memory.describe()}", file=sys.stderr, flush=True)

    model_stage = wiring(recipe)[0][config.stage_name]["model"]
    source = resolve_source(recipe.model, convert=False)
    probes = parity.build_probes(recipe, tokenizer, parity.probe_dataset(recipe, config.probe_dataset), config.probes)
    stops = contract["stop_token_ids"]
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    traces = parity.trace(reference, probes, stops, config.max_new_tokens)
    comparisons, gguf_files = [], []
    final = ctx.stage_dir / "model"
    with atomic_dir(final) as tmp:
        apply_contract(reference, contract).save_pretrained(tmp, max_shard_size=config.max_shard_size)
        tokenizer.save_pretrained(tmp)
        write_contract(contract, tmp)
        del reference

        hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp))  # (c): the folder as a user loads it
        verify_contract(hf_tokenizer, contract, "the HF export")
        exported = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=dtype).to(device).eval()
        _check_stop_ids(exported.generation_config.eos_token_id, stops)
        hf_tol = config.tolerances.get("hf") or parity.default_tolerance(section.dtype)
        comparisons.append(parity.compare("HF export", exported, traces, hf_tol, reference=f"stage '{model_stage}' model"))
        if gguf_types:
            traces = parity.trace(exported, probes, stops, config.max_new_tokens)
        del exported

        created = utc_now()
        prov = model_card.provenance(run_dir.name, recipe, _lineage(run_dir), config.producer, created, {}, _adapter_stage(run_dir, model_stage))
        pre, _ = gguf_export.pre_tokenizer_name(tmp, source.gguf_path) if gguf_types else ("", True)
        for gguf_type in gguf_types:
            file = tmp / gguf_export.gguf_file_name(recipe.name, gguf_type)
            info = gguf_export.write_gguf(tmp, file, gguf_type, contract, recipe.name, pre,
                                          {"wenmai.provenance": json.dumps(prov, ensure_ascii=False)})
            loaded = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=file.name, dtype=torch.float32).to(device).eval()
            tol = config.tolerances.get(gguf_type) or parity.default_tolerance(f"gguf-{gguf_type}", section.dtype)
            comparison = parity.compare(f"GGUF {gguf_type.upper()}", loaded, traces, tol, reference="HF export")
            if not gguf_files:  # every file carries the same vocabulary: check the tokenizer once
                comparison.tokenizer_agreement = parity.tokenizer_agreement(
                    AutoTokenizer.from_pretrained(str(tmp), gguf_file=file.name), probes)
            comparisons.append(comparison)
            gguf_files.append(info)
            del loaded

        report = {"stage": config.stage_name, "model_stage": model_stage, "probes": parity.probes_json(traces, tokenizer),
                  "comparisons": {c.name: c.to_json() for c in comparisons}, "gguf": gguf_files, "gguf_skipped": skipped,
                  "passed": all(c.passed for c in comparisons)}
        atomic_write_json(ctx.stage_dir / "parity.json", report)
        if not report["passed"]:
            raise WenmaiError(
                f"export refused: the exported model drifted from the one it came from; nothing was written to {final} "
                f"(details in {ctx.stage_dir / 'parity.json'})\n  - " + "\n  - ".join(c.line() for c in comparisons)
            )
        shutil.copy2(ctx.stage_dir / "parity.json", tmp / "parity.json")
        prov["files_sha256"] = {p.name: model_card.sha256_file(p) for p in sorted(tmp.iterdir())
                                if p.suffix in (".safetensors", ".gguf")}
        atomic_write_json(tmp / model_card.PROVENANCE_FILE, prov)
        cards = _copy_data_cards(run_dir.root, [c.stage_name for c in recipe.stage_configs()], tmp)
        (tmp / "README.md").write_text(model_card.render_card(
            title=f"{recipe.name} (Wenmai)", provenance_block=prov, recipe=recipe, lineage=_lineage(run_dir),
            stages=_stage_rows(run_dir, recipe), parity_rows=_parity_rows(run_dir, recipe, comparisons),
            gguf_files=gguf_files, cards=cards, intended_use=config.intended_use, license_name=config.license,
            contract=contract,
        ), encoding="utf-8")
        os.chmod(tmp, 0o755)

    outputs = {"model": "model", "tokenizer": "model", "template": "model/template.json", "parity": "parity.json",
               "model_card": "model/README.md", "provenance": f"model/{model_card.PROVENANCE_FILE}"}
    outputs.update({f"gguf_{g['type']}": f"model/{g['file']}" for g in gguf_files})
    summary = {"formats": ["hf"] + (["gguf"] if gguf_files else []), "parity_passed": True}
    for c in comparisons:
        key = c.name.lower().replace(" ", "_").replace("_export", "")
        summary[f"{key}_max_abs_logit_diff"] = float(f"{c.max_abs_logit_diff:.3g}")
        summary[f"{key}_greedy_agreement"] = c.greedy_agreement
    if skipped:
        summary["gguf_skipped"] = skipped
    summary["export_s"] = round(time.perf_counter() - started, 2)
    return StageResult(outputs=outputs, summary=summary)


def _check_stop_ids(eos: int | list[int] | None, stops: list[int]) -> None:
    from finetune.errors import WenmaiError

    found = sorted({eos} if isinstance(eos, int) else set(eos or []))
    if found != sorted(stops):
        raise WenmaiError(f"template contract broken at the HF export: generation_config.json stops at {found}, "
                          f"training's template ends turns with {stops}")


def _lineage(run_dir) -> dict:
    import json

    return json.loads(run_dir.lineage_path.read_text(encoding="utf-8")) if run_dir.lineage_path.is_file() else {}


def _adapter_stage(run_dir, model_stage: str) -> str | None:
    status = run_dir.status(model_stage)
    return (status.inputs.get("adapter") if status else None) or model_stage


def _stage_rows(run_dir, recipe) -> list[dict]:
    rows = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if status is not None and status.state == "done":
            rows.append({"name": config.stage_name, "kind": config.kind, "summary": status.summary})
    return rows


def _parity_rows(run_dir, recipe, comparisons) -> list[dict]:
    """Every parity comparison of the run: the merge stages' (from their parity.json) and this export's."""
    import json

    rows = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if config.kind != "merge" or status is None or status.state != "done":
            continue
        report = json.loads((run_dir.root / config.stage_name / "parity.json").read_text(encoding="utf-8"))
        for name, c in report["comparisons"].items():
            rows.append({"name": f"{config.stage_name}: {name}", **c})
    rows += [{"name": c.name, **c.to_json()} for c in comparisons]
    return rows


def _copy_data_cards(run_root, stage_names: list[str], target) -> list[tuple[str, str, list[str]]]:
    import shutil

    from finetune.model_card import data_cards

    copied = []
    for stage, path, notes in data_cards(run_root, stage_names):
        (target / "data_cards").mkdir(exist_ok=True)
        name = f"{stage}-{path.name}"
        shutil.copy2(path, target / "data_cards" / name)
        copied.append((stage, f"data_cards/{name}", notes))
    return copied
