"""Folding an adapter into its base, QLoRA-correct, and what merge and export share: memory and the contract.

PEFT merging into a bitsandbytes 4-bit base dequantises, adds the delta and quantises again (peft
`tuners/lora/bnb.py`), which loses or changes the fine-tune. So the base is always reloaded unquantised,
in the dtype training computed in, and PEFT's `merge_and_unload` (LoRA, DoRA and rsLoRA alike) folds the
adapter into those weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import WenmaiError
from finetune.model import compute_dtype
from finetune.recipe import ModelSection

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COPIES = 2.5  # weights, their saved or reloaded copy, activations (SmolLM2: 1.6 GB peak RSS for 0.54 GB of weights)
BASELINE = 2**29  # the Python process with torch and transformers loaded


def merge_section(section: ModelSection) -> ModelSection:
    """The model section to merge into: same model, unquantised, in the compute dtype training used (sdpa attention)."""

    dtype = str(compute_dtype(section)).removeprefix("torch.")
    return section.model_copy(update={"quantization": "none", "dtype": dtype, "attention": "sdpa"})


@dataclass
class MemoryPlan:
    """What a merge or export needs on its device, and what the device has."""

    device: str
    dtype: str
    parameters: int
    needed_bytes: int
    available_bytes: int | None

    def describe(self) -> str:
        have = "unknown" if self.available_bytes is None else f"{_gib(self.available_bytes)} available"
        return (
            f"needs ≈{_gib(self.needed_bytes)} on {self.device} ({self.parameters / 1e6:,.1f}M parameters in "
            f"{self.dtype}, plus working memory); {have}"
        )

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "parameters": self.parameters,
            "needed_gib": round(self.needed_bytes / 2**30, 2),
            "available_gib": None if self.available_bytes is None else round(self.available_bytes / 2**30, 2),
        }


def plan_memory(section: ModelSection, location: str, device: str) -> MemoryPlan:
    """Estimate the memory a merge or export of the model in `section.dtype` needs on `device`; refuse if it won't fit."""
    params = parameter_count(location)
    if params is None:
        raise WenmaiError(f"cannot tell the size of the model at {location} (no safetensors and no config.json)")
    needed = int(params * DTYPE_BYTES.get(section.dtype, 4) * COPIES + BASELINE)
    plan = MemoryPlan(device, section.dtype, params, needed, available_memory(device))
    if plan.available_bytes is not None and needed > plan.available_bytes:
        hint = (
            "free memory or run on a machine with more RAM"
            if device == "cpu"
            else "use `device: cpu` for this stage, or a GPU with more memory"
        )
        raise WenmaiError(f"not enough memory to merge: the model {plan.describe()}; {hint}. Nothing was written.")
    return plan


def choose_device(wanted: str) -> str:
    """`cpu`, `cuda`, or for `auto` CUDA when there is a GPU and CPU otherwise."""
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise WenmaiError("device: cuda, but this machine has no CUDA GPU; use `device: cpu` or `auto`")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def available_memory(device: str) -> int | None:
    """Free bytes on the device: MemAvailable for the CPU (Linux), free memory for a CUDA GPU; None if unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parameter_count(location: str) -> int | None:
    """Parameters of a local model folder, from its safetensors headers (no weights read), else its config."""
    folder = Path(location)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        from safetensors import safe_open

        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    total += _numel(f.get_slice(name).get_shape())
        return total
    config = folder / "config.json"
    if config.is_file():
        return _config_parameters(json.loads(config.read_text(encoding="utf-8")))
    return None


def adapter_settings(adapter_dir: str | Path) -> dict:
    """The variant, rank and alpha an adapter was saved with (its adapter_config.json)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    variant = "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"
    return {"variant": variant, "r": config.get("r"), "alpha": config.get("lora_alpha")}


def fold(peft_model: Any) -> Any:
    """Merge the adapter into the base weights (PEFT, with its NaN check) and return the plain model."""
    return peft_model.merge_and_unload(safe_merge=True)


def apply_contract(model: Any, contract: dict) -> Any:
    """Make config.json and generation_config.json stop where training taught the model to stop."""
    stops = contract["stop_token_ids"]
    model.config.eos_token_id = contract["eos_token_id"]
    model.config.pad_token_id = contract["pad_token_id"]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = contract["pad_token_id"]
    return model


# --- the template contract across a run ---------------------------------------------------------

# --- helpers -------------------------------------------------------------------------------------


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _config_parameters(config: dict) -> int | None:
    try:
        hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        inter = config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
    except (KeyError, TypeError):
        return None
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + 3 * hidden * inter + 2 * hidden) + embeddings + hidden


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
