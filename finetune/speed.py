"""Speed paths for trainer stages: the `speed:` options, what `auto` picks on this machine, and the changes
they make to model loading and the trainer's arguments.

The sft and reward stages have a `speed:` section (`finetune.recipe.SpeedOptions`; its contradictions are
checked with the recipe). `plan` resolves it for one stage on one machine; it is a pure function of the
recipe and a `Machine`, so tests pass a fake one. `changes` turns a plan into what the stage passes on:
training arguments (Liger kernels, activation checkpointing, torch.compile, padding-free batches, the
micro-batch split), the adapter's QLoRA preparation, and an attention implementation.
`machine_problems` (this machine, the pre-flight) is the check that needs the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from finetune.autotune import MODES, choose, fill_tokens, footprint, tokens_per_example
from finetune.distributed.config import shards_weights
from finetune.distributed.hardware import detect
from finetune.distributed.memory import Shape, model_shape
from finetune.model import model_config_dict
from finetune.recipe import Recipe, SpeedOptions
from finetune.recipe.options import checkpointing_mode
from finetune.training import checkpointing_args
from finetune.varlen import ATTENTION, varlen_kernel

# Liger's layer kernels; its fused linear cross-entropy is off because TRL's SFTTrainer already projects the LM
# head in tiles (trl.trainer.utils.add_fused_lm_head) and refuses Liger's, and a reward model has no LM head.
LIGER_KERNELS = {
    "rope": True,
    "swiglu": True,
    "rms_norm": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}
GIB = 1024**3
HEADS = {"sft": "fused", "reward": "none"}  # how each stage's trainer scores tokens (memory of its head, autotune)


@dataclass(frozen=True)
class Machine:
    """What the auto choices depend on."""

    cuda: bool = False
    bf16: bool = False
    gpu_memory: int = 0  # bytes
    gpu_name: str | None = None
    liger_models: frozenset[str] | None = None  # model types liger-kernel patches; None: not usable here
    liger_missing: str = "liger-kernel is not installed"  # why it is not usable
    varlen: bool = False  # PyTorch's varlen flash attention (torch.nn.attention.varlen) on this GPU


def detect_machine() -> Machine:
    """This machine: CUDA, bf16, GPU memory, liger-kernel, PyTorch varlen attention."""
    hardware = detect()
    liger_models, missing = None, "liger-kernel is not installed"
    if importlib.util.find_spec("liger_kernel") is not None:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

            liger_models = frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)
        except Exception as err:  # noqa: BLE001 (Triton missing, CUDA mismatch: any import failure means unusable)
            missing = f"liger-kernel does not import ({type(err).__name__}: {err})"

    return Machine(
        cuda=hardware.cuda,
        bf16=hardware.bf16 if hardware.cuda else False,
        gpu_memory=hardware.gpu_memory,
        gpu_name=hardware.gpu_name,
        liger_models=liger_models,
        liger_missing=missing,
        varlen=hardware.cuda and varlen_kernel() is not None,
    )


@dataclass(frozen=True)
class SpeedPlan:
    """What one stage does on one machine, and why (`reasons`: option -> short explanation)."""

    liger: bool
    padding_free: bool
    attention: str | None  # attention implementation to switch the model to; None keeps the recipe's
    checkpointing: str  # off | full | selective | offload
    checkpoint_every: int
    compile: bool
    batch_size: int
    gradient_accumulation: int
    qlora_upcast: bool
    estimate: float | None = None  # estimated peak GPU bytes of the chosen configuration
    reasons: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: each choice and why."""
        mode = f"selective every {self.checkpoint_every}" if self.checkpointing == "selective" else self.checkpointing
        parts = [
            ("liger", "on" if self.liger else "off"),
            ("padding_free", "on" if self.padding_free else "off"),
            ("checkpointing", mode),
            ("compile", "on" if self.compile else "off"),
            ("batch", f"{self.batch_size} x {self.gradient_accumulation}"),
        ]
        text = " · ".join(
            f"{name} {value}" + (f" ({self.reasons[name]})" if name in self.reasons else "") for name, value in parts
        )
        return text + (f" · estimate {self.estimate / GIB:.1f} GiB" if self.estimate else "")

    def summary(self) -> dict[str, Any]:
        """The plan for a stage's status.json."""
        return {
            "liger": self.liger,
            "padding_free": self.padding_free,
            "attention": self.attention,
            "checkpointing": self.checkpointing,
            "checkpoint_every": self.checkpoint_every,
            "compile": self.compile,
            "batch_size": self.batch_size,
            "gradient_accumulation": self.gradient_accumulation,
            "estimate_gib": round(self.estimate / GIB, 2) if self.estimate else None,
        }


def plan(
    config: Any,
    recipe: Recipe,
    machine: Machine,
    shape: Shape | None = None,
    model_type: str | None = None,
    world_size: int = 1,
) -> SpeedPlan:
    """Resolve a trainer stage's `speed` options (and `gradient_checkpointing`) for `machine`."""
    options: SpeedOptions = config.speed_options()
    reasons: dict[str, str] = {}
    liger, reasons["liger"] = _liger(options, machine, model_type)
    padding_free, attention, reasons["padding_free"] = _padding_free(config, recipe, machine)
    modes, why_mode = _checkpointing_modes(config, machine)
    per_device = _per_device_batch(config, recipe, world_size)
    tuning = machine.cuda and shape is not None
    batch, accumulation = config.batch_size, config.gradient_accumulation
    every = options.checkpoint_every or 2
    estimate = None
    if tuning:
        sizes = None if options.batch == "auto" and per_device else [config.batch_size]
        needs = footprint(
            recipe,
            config,
            shape,
            world_size,
            machine.bf16,
            head=HEADS.get(config.kind, "full"),
            liger=liger,
            qlora_upcast=options.qlora_upcast,
        )
        choice = choose(
            needs,
            tokens_per_example(config),
            per_device or config.batch_size * config.gradient_accumulation,
            budget(options, machine),
            modes,
            sizes,
            options.checkpoint_every,
            fill_tokens(shape.hidden),
        )
        mode, every, estimate = choice.checkpointing, choice.every, choice.bytes
        if sizes is None:
            batch, accumulation = choice.batch_size, choice.accumulation
            reasons["batch"] = "fastest split within the memory budget"
        reasons["checkpointing"] = why_mode or "fastest choice within the memory budget"
        if not choice.fits:
            reasons["checkpointing"] += f"; nothing fits {budget(options, machine) / GIB:.1f} GiB by estimate"
    else:
        mode = modes[0] if len(modes) == 1 else "full"  # auto on a GPU without the model's shapes: the safe choice
        if mode == "offload" and not machine.cuda:
            mode, why_mode = "full", "offload on CPU is full: the activations are in host memory already"
        reasons["checkpointing"] = why_mode or ("no CUDA GPU" if not machine.cuda else "model shapes unknown")
        if options.batch == "auto":
            reasons["batch"] = "as written: auto needs a GPU and the model's shapes"
    return SpeedPlan(
        liger=liger,
        padding_free=padding_free,
        attention=attention,
        checkpointing=mode,
        checkpoint_every=every if mode == "selective" else 1,
        compile=options.compile,
        batch_size=batch,
        gradient_accumulation=accumulation,
        qlora_upcast=options.qlora_upcast,
        estimate=estimate,
        reasons=reasons,
    )


def plan_for(config: Any, recipe: Recipe, machine: Machine | None = None, world_size: int = 1) -> SpeedPlan:
    """`plan` on this machine, with the model's shapes read from its config (no weights are loaded)."""
    model_config = model_config_dict(recipe.model) or {}
    return plan(
        config,
        recipe,
        machine or detect_machine(),
        model_shape(model_config),
        model_config.get("model_type"),
        world_size,
    )


@dataclass(frozen=True)
class SpeedChanges:
    """What a stage passes on: option updates, training arguments, adapter arguments, an attention implementation."""

    options: dict[str, Any]  # updates to the stage's options before `build_training_args`
    trainer: dict[str, Any]  # extra keyword arguments for `build_training_args`, activation checkpointing included
    adapter: dict[str, Any]  # keyword arguments for `finetune.model.attach_new_adapter`
    attention: str | None  # switch the loaded model to this attention implementation (`finetune.varlen`)


def changes(speed_plan: SpeedPlan, config: Any, config_cls: type, recipe: Recipe) -> SpeedChanges:
    """The one translation of a plan into model-loading and trainer-argument changes."""
    on = speed_plan.checkpointing != "off"
    kwargs: dict[str, Any] | None = None
    if on:
        # reentrant checkpointing is what ZeRO-3 / FSDP need with PEFT (TRL #2514); torch.compile cannot trace it
        kwargs = {"use_reentrant": shards_weights(recipe.distributed) or not speed_plan.compile}
        if speed_plan.checkpointing == "selective":
            kwargs["every_n_layers"] = speed_plan.checkpoint_every
        if speed_plan.checkpointing == "offload":
            kwargs["offload"] = True
    trainer = checkpointing_args(config_cls, on, kwargs)
    trainer["use_liger_kernel"] = speed_plan.liger
    if speed_plan.liger:
        trainer["liger_kernel_config"] = dict(LIGER_KERNELS)
    trainer["torch_compile"] = speed_plan.compile
    if type(config).supports_padding_free:
        trainer["padding_free"] = speed_plan.padding_free
    options = {
        "batch_size": speed_plan.batch_size,
        "gradient_accumulation": speed_plan.gradient_accumulation,
        "gradient_checkpointing": on,
    }
    return SpeedChanges(options, trainer, {"kbit_upcast": speed_plan.qlora_upcast}, speed_plan.attention)


@contextlib.contextmanager
def kernel_scope(speed_plan: SpeedPlan, model: Any) -> Iterator[None]:
    """Undo Liger's module-level patches after training: it swaps functions and classes in the model's
    `modeling_*` module, which would reach every later model of that type in this process (e.g. a CPU merge)."""
    if not speed_plan.liger:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(base).__module__]
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def budget(options: SpeedOptions, machine: Machine) -> float:
    """The memory budget in bytes: a share of the GPU (at most 1) or GiB."""
    if options.memory_budget <= 1:
        return options.memory_budget * machine.gpu_memory
    return options.memory_budget * GIB


def machine_problems(recipe: Recipe, machine: Machine, model_type: str | None = None) -> list[str]:
    """Speed options this machine cannot run (the pre-flight: errors for `wenmai run`, warnings for validate)."""
    found = []
    for i, config in enumerate(recipe.stage_configs()):
        options = config.speed_options()
        if options is None or options.liger is not True:
            continue
        path = f"stages[{i}].{config.kind}.speed.liger"
        if not machine.cuda:
            found.append(
                f"{path}: true needs a CUDA GPU (Liger's kernels are Triton) and this machine has none; "
                "set liger: auto (on wherever it can run) or false"
            )
        elif machine.liger_models is None:
            found.append(
                f"{path}: true, but {machine.liger_missing}: pip install 'wenmai[gpu]' (or pip install liger-kernel)"
            )
        elif model_type is not None and model_type not in machine.liger_models:
            found.append(
                f"{path}: true, but liger-kernel has no kernels for model type {model_type!r}; set liger: auto or false"
            )
    return found


def machine_problems_here(recipe: Recipe) -> list[str]:
    """`machine_problems` on this machine (detected only when a stage asks for something this machine may lack)."""
    if not any(c.speed_options() is not None and c.speed_options().liger is True for c in recipe.stage_configs()):
        return []
    return machine_problems(recipe, detect_machine(), (model_config_dict(recipe.model) or {}).get("model_type"))


def plan_lines(recipe: Recipe, machine: Machine | None = None) -> list[str]:
    """One line per trainer stage: what its speed options resolve to on this machine (`wenmai validate`)."""
    machine = machine or detect_machine()
    return [
        f"{c.stage_name}: {plan_for(c, recipe, machine).describe()}"
        for c in recipe.stage_configs()
        if c.speed_options() is not None
    ]


# --- resolving each option ----------------------------------------------------------------------


def _liger(options: SpeedOptions, machine: Machine, model_type: str | None) -> tuple[bool, str]:
    if options.liger != "auto":
        return options.liger, "as set"
    if not machine.cuda:
        return False, "no CUDA GPU"
    if machine.liger_models is None:
        return False, machine.liger_missing
    if model_type not in machine.liger_models:
        return False, f"no Liger kernels for model type {model_type!r}"
    return True, "CUDA GPU with liger-kernel"


def _padding_free(config: Any, recipe: Recipe, machine: Machine) -> tuple[bool, str | None, str]:
    """(padding-free, attention implementation to switch to, why)."""
    options, attention = config.speed_options(), recipe.model.attention
    if not type(config).supports_padding_free:
        return False, None, f"the {config.kind} stage has no padding-free path"
    if options.padding_free is False:
        return False, None, "as set"
    varlen = machine.cuda and attention == "sdpa" and machine.varlen and _half_precision(config, recipe, machine)
    switch = ATTENTION if varlen else None
    if config.packs():
        return True, switch, "packing is padding-free"
    if options.padding_free is True:
        return True, switch, "as set"
    if not machine.cuda:
        return True, None, "SDPA masks each sequence by position_ids"
    if attention == "flash_attention_2" or varlen:
        return True, switch, "varlen flash attention"
    return False, None, "no varlen attention here: SDPA would attend over the whole flattened batch"


def _checkpointing_modes(config: Any, machine: Machine) -> tuple[tuple[str, ...], str]:
    """The checkpointing modes the stage allows, and why (empty: the auto choice)."""
    options = config.speed_options()
    if options.checkpointing != "auto":
        return (checkpointing_mode(options.checkpointing),), "as set"
    if "gradient_checkpointing" in config.model_fields_set and config.gradient_checkpointing != "auto":
        return (
            (("full",), "gradient_checkpointing: true")
            if config.gradient_checkpointing
            else (("off",), "gradient_checkpointing: false")
        )
    if not machine.cuda:
        return ("off",), ""
    return MODES, ""


def _per_device_batch(config: Any, recipe: Recipe, world_size: int) -> int | None:
    """Examples per optimiser step on one device, or None when the global batch does not split evenly."""
    total = recipe.distributed.global_batch_size
    if total is None:
        return config.batch_size * config.gradient_accumulation
    return total // world_size if total % world_size == 0 else None


def _half_precision(config: Any, recipe: Recipe, machine: Machine) -> bool:
    """Whether attention runs in bf16/fp16 (flash kernels need it)."""
    precision = config.precision if recipe.distributed.mixed_precision == "auto" else recipe.distributed.mixed_precision
    dtype = recipe.model.dtype
    return (
        precision in ("bf16", "fp16")
        or dtype in ("bfloat16", "float16")
        or (machine.cuda and "auto" in (precision, dtype))
    )
