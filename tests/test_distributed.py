"""Scaling out without GPUs: the distributed section, pre-flight rules (one test each), the memory estimate,
the DeepSpeed config round trip, the launch command and the SLURM template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_recipe

from finetune.checks.preflight import Hardware, check
from finetune.config_io import CONFIGS_DIR
from finetune.distributed import config as ds
from finetune.distributed import launch as launching
from finetune.distributed.memory import GIB, Shape, estimate
from finetune.errors import ConfigError, WenmaiError
from finetune.pipeline import load_recipe
from finetune.recipe import DistributedSection

ROOT = Path(__file__).resolve().parent.parent
GPU_NODE = Hardware(cuda=True, gpus=8, gpu_name="H100", gpu_memory=80 * GIB, bf16=True, host_available=1000 * GIB)
VERSIONS = {"deepspeed": "0.19.8", "bitsandbytes": "0.48.0"}
LLAMA_1B = Shape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256, tied=True)


@pytest.fixture
def recipe_with(write_recipe, tiny_model, chat_file, tmp_path):
    """A tiny SFT recipe with extra YAML appended and `--set` overrides; returns the loaded recipe."""

    def make(extra: str = "", *overrides: str, **sft):
        text = tiny_recipe(tiny_model, chat_file, tmp_path / "runs", **sft) + textwrap.dedent(extra)
        return load_recipe(write_recipe(text), list(overrides)).recipe

    return make


def findings(recipe, world_size=1, hardware=GPU_NODE, versions=VERSIONS, **kwargs) -> dict[str, list[str]]:
    """rule -> messages (path: message) of a pre-flight check."""
    report = check(recipe, world_size, hardware=hardware, versions=versions, **kwargs)
    out: dict[str, list[str]] = {}
    for f in report.findings:
        out.setdefault(f.rule, []).append(str(f))
    return out


# --- the section ------------------------------------------------------------------------------


def problems_of(write_recipe, tiny_model, chat_file, tmp_path, distributed: str) -> list[str]:
    text = tiny_recipe(tiny_model, chat_file, tmp_path / "runs") + f"distributed: {distributed}\n"
    with pytest.raises(ConfigError) as info:
        load_recipe(write_recipe(text))
    return [str(p) for p in info.value.problems]


def test_weight_offload_below_zero3_is_refused_with_file_line(write_recipe, tiny_model, chat_file, tmp_path):
    [problem] = problems_of(
        write_recipe, tiny_model, chat_file, tmp_path, "{strategy: deepspeed, zero_stage: 2, offload_params: cpu}"
    )
    assert problem.startswith("distributed.offload_params: DeepSpeed offloads weights only with ZeRO-3")
    assert "recipe.yaml:9" in problem


def test_zero_stage_without_deepspeed_names_the_strategy(write_recipe, tiny_model, chat_file, tmp_path):
    [problem] = problems_of(write_recipe, tiny_model, chat_file, tmp_path, "{strategy: ddp, zero_stage: 3}")
    assert problem.startswith("distributed.zero_stage: applies to strategy deepspeed, and strategy is ddp")


def test_nvme_offload_needs_a_path(write_recipe, tiny_model, chat_file, tmp_path):
    problems = problems_of(
        write_recipe, tiny_model, chat_file, tmp_path, "{strategy: deepspeed, zero_stage: 3, offload_optimizer: nvme}"
    )
    assert any(p.startswith("distributed.nvme_path: nvme offload needs nvme_path") for p in problems), problems


def test_own_deepspeed_json_and_zero_keys_are_not_mixed(write_recipe, tiny_model, chat_file, tmp_path):
    [problem] = problems_of(
        write_recipe, tiny_model, chat_file, tmp_path, "{strategy: deepspeed, deepspeed_config: zero3, zero_stage: 2}"
    )
    assert problem.startswith("distributed.deepspeed_config: set either your own DeepSpeed JSON or zero_stage")


@pytest.mark.parametrize("fragment", sorted((CONFIGS_DIR / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_strategy_fragments_pass_preflight_on_a_gpu_node(
    fragment, write_recipe, tiny_model, chat_file, tmp_path
):
    text = f"include: [{fragment}]\n" + tiny_recipe(tiny_model, chat_file, tmp_path / "runs")
    report = check(load_recipe(write_recipe(text)).recipe, 8, hardware=GPU_NODE, versions=VERSIONS)
    assert not report.blocking(), report.findings


# --- pre-flight: one test per rule ------------------------------------------------------------


def test_several_processes_without_a_strategy(recipe_with):
    assert (
        "distributed.strategy: is none, but the run has 8 processes; set ddp"
        in findings(recipe_with(), 8)["strategy-none"][0]
    )


def test_world_size_that_does_not_divide_the_global_batch(recipe_with):
    recipe = recipe_with("distributed: {strategy: ddp, global_batch_size: 32}\n", batch_size=4)
    [message] = findings(recipe, 3)["batch-world"]
    assert "32 does not divide over stage 'sft': batch_size 4 x 3 processes = 12" in message
    assert "set global_batch_size to 24 or 36" in message
    assert "batch-world" not in findings(recipe, 8)  # 32 = 4 x 8 x 1


def test_global_batch_derives_accumulation_and_conflicts_are_named(recipe_with):
    section = DistributedSection(strategy="ddp", global_batch_size=64)
    assert ds.gradient_accumulation(4, 1, section, 8) == 2
    assert ds.gradient_accumulation(4, 1, section, 1) == 16
    with pytest.raises(WenmaiError, match="not a multiple of batch_size 4 x 3 processes"):
        ds.gradient_accumulation(4, 1, section, 3)
    recipe = recipe_with("distributed: {strategy: ddp, global_batch_size: 64}\n", batch_size=4, gradient_accumulation=4)
    [message] = findings(recipe, 8)["batch-accumulation"]
    assert (
        message.startswith("stages[0].sft.gradient_accumulation: is 4, but global_batch_size 64")
        and "needs 2" in message
    )


def test_fixed_batch_in_own_deepspeed_json_must_match(recipe_with, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}),
        encoding="utf-8",
    )
    recipe = recipe_with(f"distributed: {{strategy: deepspeed, deepspeed_config: {own}}}\n", batch_size=4)
    [message] = findings(recipe, 2)["deepspeed-json-batch"]
    assert "train_micro_batch_size_per_gpu is 8 in the JSON, but stage 'sft' on 2 processes needs 4" in message
    assert 'set it to "auto"' in message


def test_zero3_json_that_would_save_an_empty_adapter(recipe_with, tmp_path):
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    [message] = findings(recipe_with(f"distributed: {{strategy: deepspeed, deepspeed_config: {own}}}\n"))[
        "zero3-gather"
    ]
    assert "stage3_gather_16bit_weights_on_model_save" in message and "empty adapter" in message


def test_missing_deepspeed_json_is_named(recipe_with, tmp_path):
    recipe = recipe_with(f"distributed: {{strategy: deepspeed, deepspeed_config: {tmp_path / 'nope.json'}}}\n")
    [message] = findings(recipe)["deepspeed-json"]
    assert "nope.json not found" in message and "zero2, zero3, zero3_offload" in message


def test_nf4_zero3_storage_dtype_must_match_training_dtype(recipe_with):
    recipe = recipe_with(
        "distributed: {strategy: deepspeed, zero_stage: 3}\n", "model.quantization=nf4", "model.dtype=float32"
    )
    [message] = findings(recipe)["nf4-storage"]
    assert message.startswith("model.dtype: nf4 with ZeRO-3 needs bnb_4bit_quant_storage equal to")
    assert "stored as float32" in message and "trains in bf16; set model.dtype: bfloat16" in message
    # what model.quantization_config sets (storage = compute dtype) passes once the dtypes agree
    fixed = recipe_with(
        "distributed: {strategy: deepspeed, zero_stage: 3}\n", "model.quantization=nf4", "model.dtype=bfloat16"
    )
    assert "nf4-storage" not in findings(fixed)
    # a GPU without bf16: auto picks fp32 weights but fp16 training
    auto = recipe_with("distributed: {strategy: fsdp}\n", "model.quantization=nf4")
    old_gpu = Hardware(cuda=True, gpus=8, gpu_name="V100", gpu_memory=32 * GIB, bf16=False, host_available=500 * GIB)
    assert "set model.dtype: float16" in findings(auto, 8, hardware=old_gpu)["nf4-storage"][0]


def test_int8_cannot_be_sharded(recipe_with):
    recipe = recipe_with("distributed: {strategy: deepspeed, zero_stage: 3}\n", "model.quantization=int8")
    assert "int8 weights cannot be sharded by ZeRO-3" in findings(recipe)["int8-sharded"][0]


def test_zero3_with_a_stage_holding_two_adapters(recipe_with):
    from finetune.recipe import SftOptions, StageEntry

    class ReferenceAsSecondAdapter(SftOptions):  # as a DPO stage whose reference is a frozen adapter copy
        def adapters_on_base(self) -> int:
            return 2

    recipe = recipe_with("distributed: {strategy: deepspeed, zero_stage: 3}\n")
    stage = ReferenceAsSecondAdapter(dataset="d", name="pref")
    recipe = recipe.model_copy(update={"stages": [*recipe.stages, StageEntry.model_construct(sft=stage)]})
    [message] = findings(recipe)["sharded-multi-adapter"]
    assert message.startswith("stages[1].sft: stage 'pref' keeps 2 adapters on one base model")
    recipe.distributed.zero_stage = 2
    assert "sharded-multi-adapter" not in findings(recipe)


def test_offloaded_optimizer_is_adamw(recipe_with):
    recipe = recipe_with("distributed: {strategy: deepspeed, zero_stage: 3, offload_optimizer: cpu}\n", optimizer="sgd")
    assert findings(recipe)["offload-optimizer"][0].startswith(
        "stages[0].sft.optimizer: is sgd, but an offloaded optimiser"
    )


def test_missing_cuda_blocks_a_gpu_launch_but_only_warns_a_plan(recipe_with):
    recipe = recipe_with("distributed: {strategy: ddp}\n")
    report = check(
        recipe, 2, gpus_per_node=2, hardware=Hardware(host_available=8 * GIB), versions=VERSIONS, launch_on_gpus=True
    )
    [finding] = [f for f in report.findings if f.rule == "cuda-missing"]
    assert (
        "2 processes per node need 2 GPUs and this node has no CUDA GPU" in finding.message
        and "--cpu" in finding.message
    )
    assert finding in report.blocking() and finding not in report.blocking(planning=True)
    fsdp = check(
        recipe_with("distributed: {strategy: fsdp}\n"), 1, hardware=Hardware(host_available=8 * GIB), versions=VERSIONS
    )
    assert "fsdp shards only on CUDA GPUs" in str(fsdp.blocking()[0])
    two = Hardware(cuda=True, gpus=2, gpu_name="L4", gpu_memory=24 * GIB, host_available=64 * GIB)
    assert (
        "this node has 2 GPUs"
        in findings(recipe, 4, hardware=two, gpus_per_node=4, launch_on_gpus=True)["cuda-missing"][0]
    )


def test_deepspeed_not_installed_or_too_old(recipe_with):
    recipe = recipe_with("distributed: {strategy: deepspeed}\n")
    assert (
        "deepspeed is not installed; pip install 'wenmai[gpu]'"
        in findings(recipe, versions={"deepspeed": None})["deepspeed-missing"][0]
    )
    assert "0.14.0 is older than 0.16" in findings(recipe, versions={"deepspeed": "0.14.0"})["deepspeed-version"][0]


def test_bitsandbytes_too_old_for_sharded_nf4(recipe_with):
    recipe = recipe_with(
        "distributed: {strategy: deepspeed, zero_stage: 3}\n", "model.quantization=nf4", "model.dtype=bfloat16"
    )
    old = {"deepspeed": "0.19.8", "bitsandbytes": "0.42.0"}
    assert "from bitsandbytes 0.43.3; 0.42.0 is installed" in findings(recipe, versions=old)["bitsandbytes-version"][0]


def test_offload_without_enough_host_memory(recipe_with):
    recipe = recipe_with(
        "distributed: {strategy: deepspeed, zero_stage: 3, offload_optimizer: cpu, offload_params: cpu}\n"
    )
    small_host = Hardware(cuda=True, gpus=8, gpu_name="H100", gpu_memory=80 * GIB, host_available=4 * GIB)
    [message] = findings(recipe, 8, hardware=small_host, gpus_per_node=8)["host-memory"]
    assert message.startswith("distributed.offload_params: offload for stage 'sft' needs about")
    assert "(8 processes) and 4.00 GiB is free" in message
    assert "host-memory" not in findings(recipe, 8, gpus_per_node=8)  # 1000 GiB free


def test_memory_estimate_against_the_gpu(recipe_with):
    recipe = recipe_with("", batch_size=64, seq_len=512)
    tiny_gpu = Hardware(cuda=True, gpus=1, gpu_name="T", gpu_memory=int(0.3 * GIB), host_available=8 * GIB)
    [message] = findings(recipe, hardware=tiny_gpu)["gpu-memory"]
    assert message.startswith("distributed: stage 'sft' needs about") and "T has 0.30 GiB" in message
    report = check(recipe, hardware=tiny_gpu, versions=VERSIONS)
    assert report.blocking() and report.blocking()[0].rule == "gpu-memory"
    assert "gpu-memory" not in findings(recipe)  # 80 GiB
    just = Hardware(cuda=True, gpus=1, gpu_name="T", gpu_memory=int(report.estimates[0].total), host_available=8 * GIB)
    near = check(
        recipe, hardware=just, versions=VERSIONS
    )  # the estimate is rough: at 100% it warns, refuses above 115%
    assert [f.severity for f in near.findings if f.rule == "gpu-memory"] == ["warning"] and not near.blocking()


# --- the memory estimate ------------------------------------------------------------------------


def estimate_1b(recipe_with, distributed: str = "", world: int = 1, *overrides: str, **sft):
    recipe = recipe_with(distributed, *overrides, **{"batch_size": 4, "seq_len": 2048, **sft})
    return estimate(recipe, recipe.stage_configs()[0], world, min(world, 8), LLAMA_1B)


def test_estimate_counts_weights_from_the_shapes(recipe_with):
    plain = estimate_1b(recipe_with, "", 1, "model.dtype=bfloat16")
    assert plain.parts["weights"] == pytest.approx(1_235_814_400 * 2)  # Llama-3.2-1B in bf16
    qlora = estimate_1b(recipe_with, "", 1, "model.dtype=bfloat16", "model.quantization=nf4")
    # projections at ~4 bits; embeddings upcast to fp32 by kbit preparation (a fifth of this model's weights)
    assert 0.5 * plain.parts["weights"] < qlora.parts["weights"] < 0.65 * plain.parts["weights"]
    sharded = estimate_1b(
        recipe_with, "distributed: {strategy: fsdp}\n", 1, "model.dtype=bfloat16", "model.quantization=nf4"
    )
    assert sharded.parts["weights"] < 0.45 * plain.parts["weights"]  # no upcast when sharded: embeddings stay bf16


def test_estimate_counts_the_probabilities_an_output_adversary_reads(recipe_with):
    from finetune.recipe import DebiasOptions

    recipe = recipe_with()
    output, hidden = (
        DebiasOptions(dataset="d", attribute_terms={"a": ["他"], "b": ["她"]}, batch_size=4, seq_len=2048, reads=r)
        for r in ("output", "hidden")
    )
    logits = {c.reads: estimate(recipe, c, 1, 1, LLAMA_1B).parts["logits"] for c in (output, hidden)}
    assert logits["output"] - logits["hidden"] == 4 * 2048 * LLAMA_1B.vocab * 8  # fp32 and its gradient


def test_estimate_shards_and_offloads(recipe_with):
    z3 = "distributed: {strategy: deepspeed, zero_stage: 3}\n"
    one, eight = estimate_1b(recipe_with, z3, 1), estimate_1b(recipe_with, z3, 8)
    assert eight.parts["weights"] < one.parts["weights"] / 4
    assert eight.parts["optimizer"] == pytest.approx(one.parts["optimizer"] / 8)
    offload = estimate_1b(
        recipe_with,
        "distributed: {strategy: deepspeed, zero_stage: 3, offload_optimizer: cpu, offload_params: cpu}\n",
        8,
    )
    assert offload.parts["optimizer"] == 0 and offload.host_per_node > 0
    assert offload.parts["weights"] < eight.parts["weights"]


def test_estimate_activations_follow_checkpointing_batch_and_length(recipe_with):
    on = estimate_1b(recipe_with, gradient_checkpointing=True)
    off = estimate_1b(recipe_with, gradient_checkpointing=False)
    assert off.parts["activations"] > 5 * on.parts["activations"]
    longer = estimate_1b(recipe_with, gradient_checkpointing=True, seq_len=4096)
    assert longer.parts["activations"] == pytest.approx(2 * on.parts["activations"])
    # TRL's SFTTrainer projects the LM head in tiles of 4096 tokens: past one tile, only the hidden states grow
    assert on.parts["logits"] < longer.parts["logits"] < 1.2 * on.parts["logits"]


def test_nf4_zero3_estimate_counts_the_whole_model_while_loading(recipe_with):
    est = estimate_1b(
        recipe_with,
        "distributed: {strategy: deepspeed, zero_stage: 3}\n",
        8,
        "model.quantization=nf4",
        "model.dtype=bfloat16",
    )
    assert est.load_peak > 4 * est.parts["weights"] and any("#5660" in n for n in est.notes)


# --- the DeepSpeed config ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ds.SHIPPED))
def test_shipped_deepspeed_json_is_what_the_keys_generate(name):
    from_keys = ds.template(DistributedSection(strategy="deepspeed", **ds.SHIPPED[name]))
    shipped = json.loads((CONFIGS_DIR / "deepspeed" / f"{name}.json").read_text(encoding="utf-8"))
    assert from_keys == shipped
    assert ds.template(DistributedSection(strategy="deepspeed", deepspeed_config=name)) == shipped


def test_generated_deepspeed_config_round_trips_through_a_file(recipe_with, tmp_path):
    keys = DistributedSection(
        strategy="deepspeed", zero_stage=3, offload_optimizer="nvme", offload_params="cpu", nvme_path=str(tmp_path)
    )
    generated = ds.template(keys)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(generated), encoding="utf-8")
    recipe = recipe_with(f"distributed: {{strategy: deepspeed, deepspeed_config: {path}}}\n")
    assert ds.template(recipe.distributed) == generated
    zero = ds.describe(ds.template(recipe.distributed))
    assert (zero.stage, zero.offload_optimizer, zero.offload_params, zero.gathers_on_save) == (3, "nvme", "cpu", True)


def test_transformers_fills_the_auto_values_from_the_stage(recipe_with):
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    recipe = recipe_with(
        "distributed: {strategy: deepspeed, zero_stage: 3, gradient_clipping: 0.3}\n",
        batch_size=3,
        gradient_accumulation=5,
        max_grad_norm=2.0,
    )
    stage = recipe.stage_configs()[0]
    config = ds.trainer_args(recipe.distributed)["deepspeed"]
    hf = HfTrainerDeepSpeedConfig(config)

    class Args:  # the fields trainer_config_process reads, as build_training_args sets them
        world_size, per_device_train_batch_size, gradient_accumulation_steps = (
            2,
            stage.batch_size,
            stage.gradient_accumulation,
        )
        max_grad_norm, learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = (
            0.3,
            1e-4,
            0.9,
            0.999,
            1e-8,
            0.0,
        )
        fp16, bf16, fp16_full_eval, bf16_full_eval, save_on_each_node = False, True, False, False, False

    hf.trainer_config_process(Args())
    filled = hf.config
    assert (
        filled["train_micro_batch_size_per_gpu"],
        filled["gradient_accumulation_steps"],
        filled["train_batch_size"],
    ) == (3, 5, 30)
    assert filled["gradient_clipping"] == 0.3 and filled["bf16"]["enabled"] is True
    assert ds.template(recipe.distributed)["train_batch_size"] == "auto"  # each stage gets a fresh copy


def test_build_training_args_applies_distributed_overrides(recipe_with, tmp_path):
    from transformers import TrainingArguments

    from finetune.training import build_training_args

    recipe = recipe_with(
        "distributed: {strategy: ddp, gradient_clipping: 0.25, mixed_precision: fp32, global_batch_size: 12}\n",
        batch_size=4,
        max_grad_norm=1.0,
        precision="bf16",
    )
    args = build_training_args(TrainingArguments, recipe.stage_configs()[0], recipe, tmp_path, "r", has_eval=False)
    assert (args.max_grad_norm, args.bf16, args.gradient_accumulation_steps) == (0.25, False, 3)
    assert args.ddp_find_unused_parameters is False


def test_fsdp_strategy_becomes_fsdp2_training_arguments():
    args = ds.trainer_args(DistributedSection(strategy="fsdp", offload_params="cpu"))
    assert args["fsdp"] is True
    assert args["fsdp_config"]["version"] == 2 and args["fsdp_config"]["cpu_offload"] is True
    assert args["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"


def test_an_empty_saved_adapter_is_an_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    from finetune.adapters import check_adapter_weights

    save_file({"base_model.model.q.lora_A.weight": torch.zeros(0)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(WenmaiError, match="stage3_gather_16bit_weights_on_model_save: true"):
        check_adapter_weights(tmp_path)
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "adapter_model.safetensors"))
    assert check_adapter_weights(tmp_path) == 32


# --- the launch command ---------------------------------------------------------------------------


def test_single_node_launch_command(recipe_with, tmp_path):
    recipe = recipe_with("distributed: {strategy: deepspeed, zero_stage: 3}\n")
    plan = launching.plan(Path("r.yaml"), recipe, gpus=8, overrides=("stages.sft.max_steps=5",))
    cmd = plan.command
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "8" and plan.world_size == 8
    run = cmd[cmd.index("finetune.cli") + 1 :]
    assert run[:2] == ["run", "r.yaml"] and run[-2:] == ["--set", "stages.sft.max_steps=5"]
    run_dir = Path(run[run.index("--run-dir") + 1])
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tiny-") and not run_dir.exists()


def test_multi_node_launch_command(recipe_with, tmp_path):
    recipe = recipe_with("distributed: {strategy: ddp}\n")
    plan = launching.plan(
        Path("r.yaml"),
        recipe,
        gpus=8,
        nodes=4,
        node_rank=3,
        master_addr="node-a",
        master_port=29600,
        run_dir=tmp_path / "shared",
    )
    cmd = plan.command
    for flag, value in (
        ("--nnodes", "4"),
        ("--node-rank", "3"),
        ("--master-addr", "node-a"),
        ("--master-port", "29600"),
        ("--nproc-per-node", "8"),
        ("--run-dir", str(tmp_path / "shared")),
    ):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "--standalone" not in cmd and plan.world_size == 32
    with pytest.raises(WenmaiError, match="needs --run-dir on a filesystem every node sees"):
        launching.plan(Path("r.yaml"), recipe, gpus=8, nodes=2, master_addr="node-a")
    with pytest.raises(WenmaiError, match="needs --master-addr"):
        launching.plan(Path("r.yaml"), recipe, gpus=8, nodes=2, run_dir=tmp_path)
    with pytest.raises(WenmaiError, match="node ranks go from 0 to 1"):
        launching.plan(Path("r.yaml"), recipe, gpus=8, nodes=2, node_rank=2, master_addr="a", run_dir=tmp_path)


def test_resume_and_cpu_launch(recipe_with, tmp_path):
    recipe = recipe_with("distributed: {strategy: ddp}\n")
    plan = launching.plan(None, recipe, gpus=2, resume=tmp_path / "old", cpu=True)
    assert plan.command[-3:] == ["run", "--resume", str(tmp_path / "old")]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": ""} and plan.shell().startswith("CUDA_VISIBLE_DEVICES='' ")


def test_dry_run_prints_the_command_on_a_machine_without_cuda(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(
        tiny_recipe(tiny_model, chat_file, tmp_path / "runs") + "distributed: {strategy: deepspeed, zero_stage: 3}\n"
    )
    code, out, err = cli(
        "launch",
        recipe,
        "--gpus",
        "8",
        "--nodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--run-dir",
        tmp_path / "shared",
        "--dry-run",
    )
    assert code == 0, err
    assert "torch.distributed.run --nnodes 2 --node-rank 1 --master-addr 10.0.0.1" in " ".join(out.split())
    assert "warning: --gpus: 8 processes per node need 8 GPUs and this node has no CUDA GPU" in " ".join(err.split())
    assert "Memory per GPU" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "shared").exists()


def test_dry_run_refuses_a_recipe_error(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(
        tiny_recipe(tiny_model, chat_file, tmp_path / "runs", batch_size=4)
        + "distributed: {strategy: ddp, global_batch_size: 10}\n"
    )
    code, out, err = cli("launch", recipe, "--gpus", "2", "--dry-run")
    assert code == 2 and "distributed.global_batch_size: 10 does not divide" in " ".join(err.split())
    assert "torch.distributed.run" not in out


def test_validate_shows_findings_for_a_planned_world_size(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"))
    code, _, err = cli("validate", recipe, "--gpus", "4")
    assert code == 2 and "distributed.strategy: is none, but the run has 4 processes" in " ".join(err.split())
    code, out, err = cli("validate", recipe, "--gpus", "4", "--set", "distributed.strategy=ddp")
    assert code == 0 and "Memory per GPU (estimate; 4 processes" in out


# --- SLURM ----------------------------------------------------------------------------------------


def test_slurm_template_starts_one_launcher_per_node(tmp_path, write_recipe, tiny_model, chat_file):
    """The batch script under a stand-in srun (two nodes) and scontrol: each node gets its rank, all the same folder."""
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs") + "distributed: {strategy: ddp}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text(
        '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'  # drop srun's own options
        'for node in 0 1; do SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit $?; done\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_GPUS_ON_NODE": "4",
        "RECIPE": str(recipe),
        "WENMAI_LAUNCH_ARGS": "--dry-run",
        "RUN_ROOT": str(tmp_path / "runs"),
        "WENMAI": f"{sys.executable} -m finetune.cli",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm" / "wenmai.sbatch")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line for line in result.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(commands) == 2, result.stdout
    for rank, line in enumerate(commands):
        assert f"--nnodes 2 --node-rank {rank} --master-addr gpu-a --master-port 29500 --nproc-per-node 4" in line
        assert f"--run-dir {tmp_path / 'runs' / 'recipe-job4242'}" in line


def test_deepspeed_without_a_launcher_says_to_use_wenmai_launch(
    cli, write_recipe, tiny_model, chat_file, tmp_path, monkeypatch
):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    recipe = write_recipe(
        tiny_recipe(tiny_model, chat_file, tmp_path / "runs") + "distributed: {strategy: deepspeed}\n"
    )
    code, _, err = cli("run", recipe)
    assert (
        code == 2
        and "runs under a launcher, even on one GPU: start it with `wenmai launch RECIPE --gpus N`"
        in " ".join(err.split())
    )
    assert not (tmp_path / "runs").exists()


def test_deepspeed_on_cpu_does_not_build_its_shared_memory_op(recipe_with, monkeypatch):
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce at its first init; a build killed half-way
    leaves torch's lock file behind and every later run waits on it for ever. Wenmai turns the op off on CPU."""
    pytest.importorskip("deepspeed")
    import importlib

    import deepspeed.ops

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch itself

    from finetune.distributed import ranks

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    monkeypatch.setattr(ranks, "current", lambda: ranks.Ranks(launched=True))
    recipe = recipe_with("distributed: {strategy: deepspeed, zero_stage: 3}\n")
    ranks.connect(recipe.distributed)
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert ds_torch.build_shm_op() is None  # nothing compiled, no lock taken: gloo does the all-reduce
