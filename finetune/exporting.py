"""The pieces of an export: the HF folder and its checks, GGUF files checked against it, the card and label.

The `export` stage (finetune/stages/export.py) calls these in order inside one temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from finetune import gguf_export, model_card, parity
from finetune.data.template import verify_contract, write_contract
from finetune.errors import WenmaiError
from finetune.merging import apply_contract
from finetune.model_card import data_cards, provenance
from finetune.run_dir import atomic_write_json, sha256_file, utc_now


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
    """Write one GGUF file next to the HF export, load it back with transformers, and compare it on the probes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    loaded = (
        AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file.name, dtype=torch.float32).to(device).eval()
    )
    comparison = parity.compare(f"GGUF {gguf_type.upper()}", loaded, traces, tolerance, reference="HF export")
    if probes is not None:
        rebuilt = AutoTokenizer.from_pretrained(str(folder), gguf_file=file.name)
        comparison.tokenizer_agreement = parity.tokenizer_agreement(rebuilt, probes)
    return info, comparison


def provenance_block(run_dir: Any, recipe: Any, model_stage: str, producer: str | None) -> dict:
    """The provenance block for this export (file hashes are added once the files are final)."""

    status = run_dir.status(model_stage)
    adapter_stage = (status.inputs.get("adapter") if status else None) or model_stage
    return provenance(run_dir.name, recipe, _lineage(run_dir), producer, utc_now(), {}, adapter_stage)


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
    cards = _copy_data_cards(run_dir.root, [c.stage_name for c in recipe.stage_configs()], folder)
    card = model_card.render_card(
        title=f"{recipe.name} (Wenmai)",
        provenance_block=provenance,
        recipe=recipe,
        lineage=_lineage(run_dir),
        stages=_stage_rows(run_dir, recipe),
        parity_rows=_parity_rows(run_dir, recipe, comparisons),
        gguf_files=gguf_files,
        cards=cards,
        intended_use=config.intended_use,
        license_name=config.license,
        contract=contract,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    _make_readable(folder)


# --- helpers -------------------------------------------------------------------------------------


def _lineage(run_dir: Any) -> dict:
    return json.loads(run_dir.lineage_path.read_text(encoding="utf-8")) if run_dir.lineage_path.is_file() else {}


def _stage_rows(run_dir: Any, recipe: Any) -> list[dict]:
    rows = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if status is not None and status.state == "done":
            rows.append({"name": config.stage_name, "kind": config.kind, "summary": status.summary})
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


def _copy_data_cards(run_root: Path, stage_names: list[str], target: Path) -> list[tuple[str, str, list[str]]]:

    copied = []
    for stage, path, notes in data_cards(run_root, stage_names):
        (target / "data_cards").mkdir(exist_ok=True)
        name = f"{stage}-{path.name}"
        shutil.copy2(path, target / "data_cards" / name)
        copied.append((stage, f"data_cards/{name}", notes))
    return copied


def _make_readable(folder: Path) -> None:
    """Temporary folders and files are private; an export is meant to be shared (the umask still applies)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
