"""Pre-flight for scaling out: the recipe x the installed versions x this machine, each problem with its fix.

Findings about the recipe (its settings contradict each other for this world size) always stop a run.
Findings about the machine (no CUDA, a package missing, memory short) stop a run on the machine that
runs it, and are warnings where the run is only planned (`wenmai validate`, `wenmai launch --dry-run`).
Every rule is a small function; `check` runs them all.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune.distributed import config as ds
from finetune.distributed.hardware import Hardware, detect
from finetune.distributed.memory import GIB, Estimate, estimate, gib, model_shape
from finetune.distributed.ranks import current
from finetune.errors import WenmaiError
from finetune.model import model_config_dict, quantization_config
from finetune.recipe import Recipe, TrainingOptions

MIN_VERSIONS = {
    "deepspeed": "0.16",
    "bitsandbytes": "0.43.3",
}  # bitsandbytes: quant_storage for sharded QLoRA (PEFT guide)
GPU_MEMORY_WARNING = 0.9  # estimate / GPU memory above which pre-flight warns
GPU_MEMORY_ERROR = 1.15  # ... and refuses: the estimate is rough, a run it wrongly refused would be lost time


@dataclass(frozen=True)
class Finding:
    """One problem, named by the recipe key it concerns, with what to do about it."""

    rule: str
    path: str
    message: str
    severity: Literal["error", "warning"] = "error"
    machine: bool = False  # about this machine rather than the recipe

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Report:
    """Every finding, and the memory estimate of each trainer stage."""

    world_size: int
    gpus_per_node: int
    hardware: Hardware
    findings: list[Finding] = field(default_factory=list)
    estimates: list[Estimate] = field(default_factory=list)

    def blocking(self, planning: bool = False) -> list[Finding]:
        """Errors that stop a run; while planning, machine findings are only warnings."""
        return [f for f in self.findings if f.severity == "error" and not (planning and f.machine)]


def check(
    recipe: Recipe,
    world_size: int = 1,
    gpus_per_node: int | None = None,
    hardware: Hardware | None = None,
    versions: dict[str, str | None] | None = None,
    launch_on_gpus: bool = False,
    with_estimates: bool | None = None,
) -> Report:
    """Run every rule for `recipe` on `world_size` processes (`gpus_per_node` per node) on this machine.

    `launch_on_gpus`: the processes are to be started on this node's GPUs (`wenmai launch` without --cpu).
    `with_estimates`: compute the memory estimates (default: where they can stop a run: on a GPU, or offloading).
    """
    gpus_per_node = gpus_per_node or current().local_world_size or world_size
    hardware = hardware or detect()
    versions = versions if versions is not None else installed_versions()
    report = Report(world_size, gpus_per_node, hardware)
    try:
        ds.template(recipe.distributed)
    except WenmaiError as err:  # the user's DeepSpeed JSON cannot be read: nothing else about it can be checked
        report.findings.append(Finding("deepspeed-json", "distributed.deepspeed_config", str(err).split(": ", 1)[-1]))
        return report
    offload = "cpu" in (recipe.distributed.offload_params, recipe.distributed.offload_optimizer)
    if with_estimates or (with_estimates is None and (hardware.cuda or offload)):
        report.estimates = estimates(recipe, world_size, gpus_per_node, hardware)
    for rule in (
        strategy_rules,
        batch_rules,
        deepspeed_json_rules,
        quantized_sharding_rules,
        multi_adapter_rules,
        optimizer_rules,
    ):
        report.findings += rule(recipe, world_size, hardware)
    report.findings += cuda_rules(recipe, world_size, gpus_per_node, hardware, launch_on_gpus)
    report.findings += package_rules(recipe, versions)
    report.findings += memory_rules(recipe, report.estimates, hardware, gpus_per_node)
    return report


def installed_versions() -> dict[str, str | None]:
    """Versions of the optional packages the rules look at (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in MIN_VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def trainer_stages(recipe: Recipe) -> list[tuple[int, Any]]:
    """(index, config) of every stage that trains (has the shared training options)."""
    return [(i, c) for i, c in enumerate(recipe.stage_configs()) if isinstance(c, TrainingOptions)]


def estimates(recipe: Recipe, world_size: int, gpus_per_node: int, hardware: Hardware) -> list[Estimate]:
    """The memory estimate of each trainer stage (none when the model's shapes are not on this machine)."""
    shape = model_shape(model_config_dict(recipe.model))
    if shape is None:
        return []
    return [estimate(recipe, c, world_size, gpus_per_node, shape, hardware.bf16) for _, c in trainer_stages(recipe)]


# --- rules about the recipe -------------------------------------------------------------------


def strategy_rules(recipe: Recipe, world_size: int, hardware: Hardware) -> list[Finding]:
    """Several processes need a strategy that shares the work."""
    if world_size > 1 and recipe.distributed.strategy == "none":
        return [
            Finding(
                "strategy-none",
                "distributed.strategy",
                f"is none, but the run has {world_size} processes; set ddp (every GPU holds the whole model), "
                "deepspeed (ZeRO sharding and offload) or fsdp",
            )
        ]
    return []


def batch_rules(recipe: Recipe, world_size: int, hardware: Hardware) -> list[Finding]:
    """The global batch: `global_batch_size` must split evenly over batch_size x processes, and agree with
    a stage that sets its own gradient accumulation."""
    section = recipe.distributed
    if section.global_batch_size is None:
        return []
    findings = []
    for i, stage in trainer_stages(recipe):
        unit = stage.batch_size * world_size
        if section.global_batch_size % unit:
            findings.append(
                Finding(
                    "batch-world",
                    "distributed.global_batch_size",
                    f"{section.global_batch_size} does not divide over stage {stage.stage_name!r}: batch_size {stage.batch_size} x "
                    f"{world_size} processes = {unit} sequences per micro-step; "
                    + ds.batch_fix(section.global_batch_size, stage.batch_size, world_size),
                )
            )
            continue
        derived = section.global_batch_size // unit
        if "gradient_accumulation" in stage.model_fields_set and stage.gradient_accumulation != derived:
            findings.append(
                Finding(
                    "batch-accumulation",
                    f"stages[{i}].{stage.kind}.gradient_accumulation",
                    f"is {stage.gradient_accumulation}, but global_batch_size {section.global_batch_size} over {unit} sequences "
                    f"per micro-step needs {derived}; remove gradient_accumulation (it is derived) or global_batch_size",
                )
            )
    return findings


def deepspeed_json_rules(recipe: Recipe, world_size: int, hardware: Hardware) -> list[Finding]:
    """A user's DeepSpeed JSON: ZeRO-3 must gather weights on save; fixed values must agree with the recipe."""
    section = recipe.distributed
    if section.strategy != "deepspeed" or not section.deepspeed_config:
        return []
    config = ds.template(section)
    zero = ds.describe(config)
    path = "distributed.deepspeed_config"
    findings = []
    if zero.stage == 3 and not zero.gathers_on_save:
        findings.append(
            Finding(
                "zero3-gather",
                path,
                "ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save: "
                "true saves an empty adapter (DeepSpeed #7900); set it to true",
            )
        )
    for _, stage in trainer_stages(recipe):
        try:
            accumulation = ds.gradient_accumulation(stage.batch_size, stage.gradient_accumulation, section, world_size)
        except WenmaiError:
            continue  # reported by batch_rules
        clipping = stage.max_grad_norm if section.gradient_clipping == "auto" else section.gradient_clipping
        wanted = {
            "train_micro_batch_size_per_gpu": stage.batch_size,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": stage.batch_size * accumulation * world_size,
            "gradient_clipping": clipping,
        }
        for key, value in wanted.items():
            given = config.get(key, "auto")
            if given != "auto" and given != value:
                findings.append(
                    Finding(
                        "deepspeed-json-batch",
                        path,
                        f"{key} is {given} in the JSON, but stage {stage.stage_name!r} on {world_size} processes needs {value}; "
                        f'set it to "auto" (Wenmai fills it for every stage)',
                    )
                )
    return findings


def quantized_sharding_rules(recipe: Recipe, world_size: int, hardware: Hardware) -> list[Finding]:
    """QLoRA with sharded weights (ZeRO-3, FSDP): nf4 only, stored in the dtype the shards are trained in."""
    section, model = recipe.distributed, recipe.model
    if model.quantization == "none" or not ds.shards_weights(section):
        return []
    how = "FSDP" if section.strategy == "fsdp" else "ZeRO-3"
    if model.quantization == "int8":
        return [
            Finding(
                "int8-sharded",
                "model.quantization",
                f"int8 weights cannot be sharded by {how}; use nf4 (QLoRA) or distributed.zero_stage: 2",
            )
        ]
    import torch

    findings = []
    model_dtype = (
        getattr(torch, model.dtype) if model.dtype != "auto" else (torch.bfloat16 if hardware.bf16 else torch.float32)
    )
    storage = quantization_config(model, dtype=model_dtype).bnb_4bit_quant_storage
    for _, stage in trainer_stages(recipe):
        precision = stage.precision if section.mixed_precision == "auto" else section.mixed_precision
        if precision == "auto":  # as `finetune.training.precision_flags` decides it
            precision = ("bf16" if hardware.bf16 else "fp16") if hardware.cuda else "fp32"
        trained = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        if storage != trained:
            fix = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[trained]
            findings.append(
                Finding(
                    "nf4-storage",
                    "model.dtype",
                    f"nf4 with {how} needs bnb_4bit_quant_storage equal to the dtype the shards train in; the weights are stored "
                    f"as {str(storage).removeprefix('torch.')} (model.dtype {model.dtype}) but stage {stage.stage_name!r} trains in "
                    f"{precision}; set model.dtype: {fix}",
                )
            )
            break
    return findings


def multi_adapter_rules(recipe: Recipe, world_size: int, hardware: Hardware) -> list[Finding]:
    """ZeRO-3 / FSDP shard the weights once; a stage that keeps several adapters on one base cannot switch them."""
    if not ds.shards_weights(recipe.distributed):
        return []
    return [
        Finding(
            "sharded-multi-adapter",
            f"stages[{i}].{c.kind}",
            f"stage {c.stage_name!r} keeps {c.adapters_on_base()} adapters on one base model, which ZeRO-3 / FSDP "
            "cannot shard; use distributed.zero_stage: 2 (or ddp), or a reference without a second adapter",
        )
        for i, c in enumerate(recipe.stage_configs())
        if c.adapters_on_base() > 1
    ]


def optimizer_rules(recipe: Recipe, world_size: int, hardware: Hardware) -> list[Finding]:
    """An offloaded optimiser is DeepSpeed's CPU AdamW; a stage asking for another would be silently ignored."""
    zero = ds.zero_settings(recipe.distributed)
    if zero is None or zero.offload_optimizer == "none":
        return []
    return [
        Finding(
            "offload-optimizer",
            f"stages[{i}].{c.kind}.optimizer",
            f"is {c.optimizer}, but an offloaded optimiser is DeepSpeed's CPU AdamW; use optimizer: adamw_torch "
            "or distributed.offload_optimizer: none",
        )
        for i, c in trainer_stages(recipe)
        if not c.optimizer.startswith("adamw")
    ]


# --- rules about this machine -----------------------------------------------------------------


def cuda_rules(
    recipe: Recipe, world_size: int, gpus_per_node: int, hardware: Hardware, launch_on_gpus: bool
) -> list[Finding]:
    """Missing CUDA, or fewer GPUs than processes to start on this node."""
    section = recipe.distributed
    if launch_on_gpus and hardware.gpus < gpus_per_node:
        have = "no CUDA GPU" if not hardware.cuda else f"{hardware.gpus} GPU{'s' if hardware.gpus != 1 else ''}"
        return [
            Finding(
                "cuda-missing",
                "--gpus",
                f"{gpus_per_node} processes per node need {gpus_per_node} GPUs and this node "
                f"has {have}; lower --gpus, or add --cpu to test the multi-process run on CPU (gloo)",
                machine=True,
            )
        ]
    if not hardware.cuda and section.strategy == "fsdp":
        return [
            Finding(
                "cuda-missing",
                "distributed.strategy",
                "fsdp shards only on CUDA GPUs and this machine has none (on CPU accelerate would quietly run "
                "plain data parallel); run on GPUs, or use ddp or deepspeed to test on CPU",
                machine=True,
            )
        ]
    findings = []
    if not hardware.cuda and recipe.model.quantization != "none":
        findings.append(
            Finding(
                "quantised-on-cpu",
                "model.quantization",
                f"{recipe.model.quantization} on a machine without CUDA: bitsandbytes runs the quantised layers on "
                "the CPU, fine for tests, slow for training",
                severity="warning",
                machine=True,
            )
        )
    if not hardware.cuda and section.strategy == "deepspeed":
        findings.append(
            Finding(
                "cuda-missing",
                "distributed.strategy",
                "deepspeed on a machine without CUDA runs on CPU with the gloo backend: fine for tests, "
                "far too slow for training",
                severity="warning",
                machine=True,
            )
        )
    return findings


def package_rules(recipe: Recipe, versions: dict[str, str | None]) -> list[Finding]:
    """DeepSpeed installed (and recent enough) for strategy deepspeed; bitsandbytes recent enough for sharded nf4."""
    from packaging.version import Version

    findings = []
    if recipe.distributed.strategy == "deepspeed":
        have = versions.get("deepspeed")
        if have is None:
            findings.append(
                Finding(
                    "deepspeed-missing",
                    "distributed.strategy",
                    "deepspeed is not installed; pip install 'wenmai[gpu]'",
                    machine=True,
                )
            )
        elif Version(have) < Version(MIN_VERSIONS["deepspeed"]):
            findings.append(
                Finding(
                    "deepspeed-version",
                    "distributed.strategy",
                    f"deepspeed {have} is older than {MIN_VERSIONS['deepspeed']}; pip install -U 'wenmai[gpu]'",
                    machine=True,
                )
            )
    have = versions.get("bitsandbytes")
    if (
        recipe.model.quantization == "nf4"
        and ds.shards_weights(recipe.distributed)
        and have is not None
        and Version(have) < Version(MIN_VERSIONS["bitsandbytes"])
    ):
        findings.append(
            Finding(
                "bitsandbytes-version",
                "model.quantization",
                f"sharded nf4 needs bnb_4bit_quant_storage, from bitsandbytes {MIN_VERSIONS['bitsandbytes']}; "
                f"{have} is installed: pip install -U 'wenmai[gpu]'",
                machine=True,
            )
        )
    return findings


def memory_rules(recipe: Recipe, estimates: list[Estimate], hardware: Hardware, gpus_per_node: int) -> list[Finding]:
    """Each stage's estimate against the GPU's memory; offloaded states against free host memory."""
    findings = []
    for est in estimates:
        if hardware.cuda and hardware.gpu_memory:
            share = est.total / hardware.gpu_memory
            if share > GPU_MEMORY_WARNING:
                findings.append(
                    Finding(
                        "gpu-memory",
                        "distributed",
                        f"stage {est.stage!r} needs about {gib(est.total)} per GPU ({_largest(est)}) and {hardware.gpu_name} has "
                        f"{gib(hardware.gpu_memory)}; lower batch_size or seq_len, turn on gradient_checkpointing, "
                        "use nf4, ZeRO-3 / FSDP, or offload",
                        severity="error" if share > GPU_MEMORY_ERROR else "warning",
                        machine=True,
                    )
                )
        if est.host_per_node and est.host_per_node > hardware.host_available:
            findings.append(
                Finding(
                    "host-memory",
                    "distributed.offload_params"
                    if recipe.distributed.offload_params != "none"
                    else "distributed.offload_optimizer",
                    f"offload for stage {est.stage!r} needs about {gib(est.host_per_node)} of host memory per node "
                    f"({gpus_per_node} processes) and {gib(hardware.host_available)} is free; offload less, use nvme, or more nodes",
                    machine=True,
                )
            )
    return findings


def _largest(est: Estimate) -> str:
    parts = sorted(((v, k) for k, v in est.parts.items() if v >= 0.05 * GIB), reverse=True)[:3]
    return ", ".join(f"{k} {gib(v)}" for v, k in parts) or "small parts"
