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
import os
import sys
import time
from pathlib import Path
from typing import Any

from finetune import gguf_export, model_card, model_facts, ollama, parity
from finetune.data.card import CARD_JSON, DataCard, render_markdown
from finetune.data.template import trained_tokenizer, verify_contract, write_contract
from finetune.errors import WenmaiError
from finetune.merging import apply_contract, choose_device, merge_section, plan_memory
from finetune.model import resolve_source
from finetune.model_card import PROVENANCE_FILE
from finetune.recipe import ExportOptions, Recipe
from finetune.run_dir import (
    StageContext,
    StageResult,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    sha256_file,
    utc_now,
)


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
        print(f"{config.stage_name}: warning: no GGUF files written: {skipped}", file=sys.stderr, flush=True)
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
        write_hf(reference, tokenizer, contract, tmp, config.max_shard_size)
        del reference
        exported = reload_hf(tmp, contract, dtype, device)  # the folder as a user loads it
        hf_tolerance = config.tolerances.get("hf") or parity.default_tolerance(section.dtype)
        comparisons = [
            parity.compare("HF export", exported, traces, hf_tolerance, reference=f"stage '{model_stage}' model")
        ]
        if gguf_types and comparisons[0].max_abs_logit_diff > 0:  # GGUF is compared with the HF export itself
            traces = parity.trace(exported, probes, stops, config.max_new_tokens)
        del exported

        provenance = provenance_block(run_dir, recipe, model_stage, config.producer)
        if skipped:
            provenance["gguf_skipped"] = f"GGUF asked for but not written: {skipped}"
        pre_tokenizer = gguf_export.pre_tokenizer_name(tmp, resolve_source(recipe.model, convert=False).gguf_path)[0]
        gguf_files = []
        for gguf_type in gguf_types:
            tolerance = config.tolerances.get(gguf_type) or parity.default_tolerance(f"gguf-{gguf_type}", section.dtype)
            info, comparison = write_and_check_gguf(
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
        if gguf_files:  # Ollama runs the first GGUF file (edit FROM for another)
            system = ollama.default_system(config.modelfile_system, config.modelfile_aigc_label)
            atomic_write_text(
                tmp / ollama.MODELFILE, ollama.modelfile(gguf_files[0]["file"], contract, tokenizer, system)
            )
        write_card(tmp, run_dir, recipe, provenance, comparisons, gguf_files, contract, config)

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
    if gguf_files:
        outputs["modelfile"] = "model/Modelfile"
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


# --- the pieces of the export, in the order `run` calls them ----------------------------------


def write_hf(model: Any, tokenizer: Any, contract: dict, folder: Path, max_shard_size: str) -> None:
    """The from_pretrained folder: weights, tokenizer and chat template, stop ids, and the template contract."""
    apply_contract(model, contract).save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    write_contract(contract, folder)


def reload_hf(folder: Path, contract: dict, dtype: Any, device: str) -> Any:
    """Load the HF export with plain transformers, checking its tokenizer and stop ids against the contract."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_contract(AutoTokenizer.from_pretrained(str(folder)), contract, "the HF export")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    eos = model.generation_config.eos_token_id
    found = sorted({eos} if isinstance(eos, int) else set(eos or []))
    if found != sorted(contract["stop_token_ids"]):
        raise WenmaiError(
            f"template contract broken at the HF export: generation_config.json stops at {found}, "
            f"training's template ends turns with {contract['stop_token_ids']}"
        )
    return model


def write_and_check_gguf(
    folder: Path,
    gguf_type: str,
    contract: dict,
    name: str,
    pre_tokenizer: str,
    provenance: dict,
    traces: list,
    tolerance: Any,
    device: str,
    probes: list | None,
) -> tuple[dict, Any]:
    """Write one GGUF file next to the HF export, load it back with transformers, and compare it on the probes.

    transformers reads no rope scaling from a Llama GGUF (it would run the file unscaled): for such a model the
    weights are loaded with the export's config.json, and llama.cpp's own reading of the scaling is what
    tests/test_gguf_llama_cpp.py checks. The tokenizer is checked once: the template and stop ids the file
    carries, and the probe prompts encoded by llama.cpp when llama-cpp-python is installed, else by the
    tokenizer transformers rebuilds from the file (for byte-level BPE files, which it rebuilds exactly)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    file = folder / gguf_export.gguf_file_name(name, gguf_type)
    info = gguf_export.write_gguf(
        folder,
        file,
        gguf_type,
        contract,
        name,
        pre_tokenizer,
        {"wenmai.provenance": json.dumps(provenance, ensure_ascii=False)},
    )
    config = AutoConfig.from_pretrained(str(folder))
    rope_type = gguf_export.rope_parameters(config.to_dict()).get("rope_type") or "default"
    scaled = {"config": config} if rope_type != "default" else {}
    loaded = (
        AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file.name, dtype=torch.float32, **scaled)
        .to(device)
        .eval()
    )
    reference = "HF export" + (f" (rope {rope_type} from config.json)" if scaled else "")
    comparison = parity.compare(f"GGUF {gguf_type.upper()}", loaded, traces, tolerance, reference=reference)
    if probes is not None:
        texts, expected = [p.text for p in probes], [p.input_ids for p in probes]
        comparison.tokenizer_agreement = gguf_export.tokenizer_agreement(
            file, contract, texts, expected, parity.MAX_PROMPT_TOKENS
        )
    return info, comparison


def provenance_block(run_dir: Any, recipe: Any, model_stage: str, producer: str | None) -> dict:
    """The provenance block for this export (file hashes are added once the files are final)."""

    status = run_dir.status(model_stage)
    adapter_stage = (status.inputs.get("adapter") if status else None) or model_stage
    return model_card.provenance(run_dir.name, recipe, _lineage(run_dir), producer, utc_now(), {}, adapter_stage)


def write_card(
    folder: Path,
    run_dir: Any,
    recipe: Any,
    provenance: dict,
    comparisons: list,
    gguf_files: list[dict],
    contract: dict,
    config: Any,
) -> None:
    """wenmai_provenance.json (with file hashes), data cards, README.md; then make the folder readable to all."""

    provenance["files_sha256"] = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".gguf")
    }
    atomic_write_json(folder / model_card.PROVENANCE_FILE, provenance)
    data_cards = _copy_data_cards(run_dir.root, [c.stage_name for c in recipe.stage_configs()], folder)
    cards = model_card.card_files(
        recipe.output.language,
        title=f"{recipe.name} (Wenmai)",
        provenance_block=provenance,
        recipe=recipe,
        lineage=_lineage(run_dir),
        stages=_stage_rows(run_dir, recipe),
        parity_rows=_parity_rows(run_dir, recipe, comparisons),
        gguf_files=gguf_files,
        cards=data_cards,
        intended_use=config.intended_use,
        license_name=config.license,
        contract=contract,
    )
    for name, text in cards.items():  # README.md in output.language, the other language beside it
        (folder / name).write_text(text, encoding="utf-8")
    _make_readable(folder)


# --- helpers -------------------------------------------------------------------------------------


def _lineage(run_dir: Any) -> dict:
    return json.loads(run_dir.lineage_path.read_text(encoding="utf-8")) if run_dir.lineage_path.is_file() else {}


def _stage_rows(run_dir: Any, recipe: Any) -> list[dict]:
    rows = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if status is not None and status.state == "done":
            row = {"name": config.stage_name, "kind": config.kind, "summary": status.summary}
            row.update(started=status.started, finished=status.finished)
            evaluation = run_dir.root / config.stage_name / "evaluation.json"
            if evaluation.is_file():
                row["evaluation"] = json.loads(evaluation.read_text(encoding="utf-8"))
            rows.append(row)
    return rows


def _parity_rows(run_dir: Any, recipe: Any, comparisons: list) -> list[dict]:
    """Every parity comparison of the run: the merge stages' (from their parity.json) and this export's."""
    rows = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if config.kind != "merge" or status is None or status.state != "done":
            continue
        report = json.loads((run_dir.root / config.stage_name / "parity.json").read_text(encoding="utf-8"))
        rows += [{"name": f"{config.stage_name}: {name}", **c} for name, c in report["comparisons"].items()]
    return rows + [{"name": c.name, **c.to_json()} for c in comparisons]


def _copy_data_cards(run_root: Path, stage_names: list[str], target: Path) -> list[tuple[str, str, list[dict]]]:

    copied = []
    for stage, path, notes in model_facts.data_cards(run_root, stage_names):
        (target / "data_cards").mkdir(exist_ok=True)
        name = f"{stage}-{path.name}"
        atomic_write_text(target / "data_cards" / name, _shipped_data_card(path))
        copied.append((stage, f"data_cards/{name}", notes))
    return copied


def _shipped_data_card(path: Path) -> str:
    """A stage's data card (`path`: its .json or .md) as shipped: each dataset named without this machine's folders.

    A card the data layer did not write (another shape, or no .json beside the .md) is shipped as it is."""
    try:
        card = DataCard.model_validate_json((path.parent / CARD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return path.read_text(encoding="utf-8")
    card.datasets = [d.model_copy(update={"path": model_card.shipped_name(d.path)}) for d in card.datasets]
    return card.model_dump_json(indent=2) if path.name == CARD_JSON else render_markdown(card)


def _make_readable(folder: Path) -> None:
    """Temporary folders and files are private; an export is meant to be shared (the umask still applies)."""
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
