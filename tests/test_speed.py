"""Speed options: what `auto` picks on a CPU and on a (fake) GPU, the micro-batch tuning, the translation into
trainer arguments, the checks that name the culprit, and the varlen attention's glue."""

from __future__ import annotations

import functools
import textwrap

import pytest
from conftest import tiny_recipe

from finetune import autotune, speed
from finetune.distributed.memory import GIB, Shape
from finetune.pipeline import load_recipe

LLAMA_8B = Shape(
    hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, tied=False
)
H100 = speed.Machine(
    cuda=True,
    bf16=True,
    gpu_memory=80 * GIB,
    gpu_name="NVIDIA H100 80GB HBM3",
    liger_models=frozenset({"llama", "qwen2"}),
    varlen=True,
)


def load(write_recipe, tiny_model, chat_file, tmp_path, overrides=(), **sft):
    path = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", **sft))
    return load_recipe(path, list(overrides)).recipe


def eight_b(write_recipe, chat_file, tmp_path, sft: str = "", model: str = "", distributed: str = ""):
    """A recipe for an 8B Llama (its weights need not exist: the plan only reads shapes, given here)."""
    path = write_recipe(
        textwrap.dedent(f"""\
        name: big
        model: {{path: meta-llama/Meta-Llama-3-8B{model}}}
        lora: {{r: 16, alpha: 32, dropout: 0.0, targets: all-linear}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - sft: {{dataset: d, seq_len: 2048, batch_size: 4{sft}}}
        {distributed}
        """)
    )
    return load_recipe(path).recipe


def test_auto_on_cpu_is_padding_free_and_leaves_the_rest_as_written(write_recipe, tiny_model, chat_file, tmp_path):
    recipe = load(write_recipe, tiny_model, chat_file, tmp_path)
    plan = speed.plan_for(recipe.stage_configs()[0], recipe, speed.Machine())
    assert (plan.liger, plan.padding_free, plan.attention, plan.checkpointing, plan.compile) == (
        False,
        True,
        None,
        "off",
        False,
    )
    assert (plan.batch_size, plan.gradient_accumulation) == (4, 1)
    assert "no CUDA GPU" in plan.describe()


def test_auto_on_a_gpu_turns_on_liger_and_varlen_and_fits_the_budget(write_recipe, chat_file, tmp_path):
    recipe = eight_b(write_recipe, chat_file, tmp_path)
    plan = speed.plan(recipe.stage_configs()[0], recipe, H100, LLAMA_8B, "llama")
    assert plan.liger and plan.padding_free and plan.attention == "wenmai_varlen"
    assert plan.batch_size * plan.gradient_accumulation == 4
    assert plan.estimate <= 0.85 * 80 * GIB
    # 80 GB hold an 8B LoRA step at micro-batch 4 with a few layers recomputed: the cost model (its fill constant
    # measured on an H200) rates that above micro-batch 2 without recomputation, and far above micro-batch 1
    assert (plan.batch_size, plan.checkpointing) == (4, "selective") and plan.checkpoint_every >= 4


def test_a_tight_budget_buys_memory_with_checkpointing_and_smaller_micro_batches(write_recipe, chat_file, tmp_path):
    tight = eight_b(write_recipe, chat_file, tmp_path, sft=", speed: {memory_budget: 21}")
    plan = speed.plan(tight.stage_configs()[0], tight, H100, LLAMA_8B, "llama")
    roomy = eight_b(write_recipe, chat_file, tmp_path)
    default = speed.plan(roomy.stage_configs()[0], roomy, H100, LLAMA_8B, "llama")
    assert plan.estimate <= 21 * GIB < default.estimate
    assert plan.batch_size * plan.gradient_accumulation == 4
    recomputed = [
        autotune.recompute_cost(LLAMA_8B.layers, p.checkpointing, p.checkpoint_every) for p in (plan, default)
    ]
    assert recomputed[0] > recomputed[1]


def test_offload_on_cpu_runs_as_full_checkpointing(write_recipe, tiny_model, chat_file, tmp_path):
    recipe = load(write_recipe, tiny_model, chat_file, tmp_path, overrides=["stages.sft.speed.checkpointing=offload"])
    plan = speed.plan_for(recipe.stage_configs()[0], recipe, speed.Machine())
    assert plan.checkpointing == "full" and "host memory already" in plan.reasons["checkpointing"]


def test_batch_fixed_keeps_the_split_as_written(write_recipe, chat_file, tmp_path):
    recipe = eight_b(
        write_recipe, chat_file, tmp_path, sft=", gradient_accumulation: 2, speed: {batch: fixed, memory_budget: 21}"
    )
    plan = speed.plan(recipe.stage_configs()[0], recipe, H100, LLAMA_8B, "llama")
    assert (plan.batch_size, plan.gradient_accumulation) == (4, 2)


def test_gradient_checkpointing_true_means_full_checkpointing(write_recipe, chat_file, tmp_path):
    recipe = eight_b(write_recipe, chat_file, tmp_path, sft=", gradient_checkpointing: true")
    assert speed.plan(recipe.stage_configs()[0], recipe, H100, LLAMA_8B, "llama").checkpointing == "full"


def test_quantized_lean_qlora_needs_less_memory_than_the_fp32_upcast(write_recipe, chat_file, tmp_path):
    lean = eight_b(write_recipe, chat_file, tmp_path, model=", quantization: nf4")
    upcast = eight_b(
        write_recipe, chat_file, tmp_path, model=", quantization: nf4", sft=", speed: {qlora_upcast: true}"
    )
    fixed = [
        autotune.footprint(
            r, r.stage_configs()[0], LLAMA_8B, qlora_upcast=r.stage_configs()[0].speed.qlora_upcast
        ).fixed
        for r in (lean, upcast)
    ]
    assert fixed[1] - fixed[0] == pytest.approx(LLAMA_8B.other_params * 2)


def test_choose_keeps_the_global_batch_and_fits_a_fake_device():
    footprint = autotune.Footprint(
        fixed=10 * GIB,
        layer_per_token=0.5 * 1024**2,
        boundary_per_token=16 * 1024,
        head_per_token=1024,
        head_tokens_cap=None,
        layers=16,
    )
    for memory in (12, 16, 24, 96):
        choice = autotune.choose(footprint, tokens_per_example=1024, global_batch=8, budget=memory * GIB)
        assert choice.batch_size * choice.accumulation == 8
        assert choice.fits and choice.bytes <= memory * GIB
    big = autotune.choose(footprint, 1024, 8, 96 * GIB)
    small = autotune.choose(footprint, 1024, 8, 12 * GIB)
    assert (big.checkpointing, big.batch_size) == ("off", 8)  # room: no recomputation, one micro-batch
    assert small.cost > big.cost and small.bytes < big.bytes


def test_the_fill_constant_prefers_full_micro_batches_on_a_small_model():
    """The H200 measurement behind FILL_TOKENS: on the 1B shape, micro-batch 4 with full checkpointing ran at twice
    the speed of micro-batch 1 without it; the cost model must rank them so, and rank a wider model's less so."""
    one_b, eight_b_fill = autotune.fill_tokens(2048), autotune.fill_tokens(4096)
    cost = {
        (batch, mode): autotune.recompute_cost(16, mode) * (1 + one_b / (batch * 2048))
        for batch, mode in ((1, "off"), (4, "full"))
    }
    assert cost[(1, "off")] / cost[(4, "full")] == pytest.approx(30.3 / 15.6, rel=0.05)
    assert eight_b_fill == pytest.approx(one_b / 4)


def test_choose_reports_when_nothing_fits():
    footprint = autotune.Footprint(
        fixed=10 * GIB,
        layer_per_token=1024**2,
        boundary_per_token=1024,
        head_per_token=0,
        head_tokens_cap=None,
        layers=4,
    )
    choice = autotune.choose(footprint, 1024, 4, budget=5 * GIB)
    assert not choice.fits and choice.batch_size == 1 and choice.checkpointing in ("full", "offload")


def test_changes_turn_the_plan_into_trainer_and_adapter_arguments(write_recipe, tiny_model, chat_file, tmp_path):
    from trl import SFTConfig

    recipe = load(write_recipe, tiny_model, chat_file, tmp_path)
    config = recipe.stage_configs()[0]
    plan = speed.SpeedPlan(
        liger=True,
        padding_free=True,
        attention=None,
        checkpointing="selective",
        checkpoint_every=2,
        compile=True,
        batch_size=2,
        gradient_accumulation=2,
        qlora_upcast=False,
    )
    change = speed.changes(plan, config, SFTConfig, recipe)
    assert change.trainer["activation_checkpointing"] is True
    assert change.trainer["activation_checkpointing_kwargs"] == {"use_reentrant": False, "every_n_layers": 2}
    assert (
        change.trainer["use_liger_kernel"] and not change.trainer["liger_kernel_config"]["fused_linear_cross_entropy"]
    )
    assert change.trainer["torch_compile"] and change.trainer["padding_free"]
    assert change.options == {"batch_size": 2, "gradient_accumulation": 2, "gradient_checkpointing": True}
    assert change.adapter == {"kbit_upcast": False}
    args = SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], **change.trainer)
    assert args.activation_checkpointing_kwargs["every_n_layers"] == 2


@pytest.mark.parametrize(
    ("sft", "key", "words"),
    [
        (
            "gradient_checkpointing: false, speed: {checkpointing: selective}",
            "speed.checkpointing",
            "gradient_checkpointing is false",
        ),
        (
            "gradient_checkpointing: true, speed: {checkpointing: false}",
            "speed.checkpointing",
            "gradient_checkpointing is true",
        ),
        (
            "speed: {checkpointing: full, checkpoint_every: 3}",
            "speed.checkpoint_every",
            "only used with checkpointing: selective",
        ),
        ("packing: true, speed: {padding_free: false}", "packing", "needs padding-free"),
        ("speed: {compile: true, checkpointing: offload}", "speed.compile", "pytorch#148222"),
    ],
)
def test_contradicting_speed_options_name_the_key(write_recipe, tiny_model, chat_file, tmp_path, cli, sft, key, words):
    body = tiny_recipe(tiny_model, chat_file, tmp_path / "runs").replace("save_steps: 2}", f"save_steps: 2, {sft}}}")
    code, out, err = cli("validate", write_recipe(body))
    assert code == 2
    assert f"stages[0].sft.{key}" in out + err and words in out + err


def test_padding_free_on_a_stage_without_it_is_refused(write_recipe, tiny_model, tmp_path, cli):
    from tiny_models import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    recipe = write_recipe(f"""\
        name: r
        model: {{path: {tiny_model}}}
        data:
          p: {{path: {pairs}, format: pairs}}
        stages:
          - reward: {{dataset: p, speed: {{padding_free: true}}}}
        """)
    code, out, err = cli("validate", recipe)
    assert code == 2 and "stages[0].reward.speed.padding_free" in out + err and "no padding-free path" in out + err


def test_liger_on_a_machine_without_cuda_is_a_preflight_error_with_the_fix(
    write_recipe, tiny_model, chat_file, tmp_path, cli
):
    path = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"))
    code, out, err = cli("validate", path, "--set", "stages.sft.speed.liger=true")
    assert code == 0 and "stages[0].sft.speed.liger: true needs a CUDA GPU" in out + err  # planning: a warning
    code, out, err = cli("run", path, "--set", "stages.sft.speed.liger=true")
    assert code == 2 and "stages[0].sft.speed.liger" in out + err


def test_liger_missing_or_unsupported_names_the_pip_command(write_recipe, tiny_model, chat_file, tmp_path):
    recipe = load(write_recipe, tiny_model, chat_file, tmp_path, overrides=["stages.sft.speed.liger=true"])
    missing = speed.machine_problems(recipe, speed.Machine(cuda=True, bf16=True, gpu_memory=80 * GIB), "llama")
    assert missing == [
        "stages[0].sft.speed.liger: true, but liger-kernel is not installed: pip install 'wenmai[gpu]' "
        "(or pip install liger-kernel)"
    ]
    unsupported = speed.machine_problems(recipe, H100, "gpt_bigcode")
    assert "no kernels for model type 'gpt_bigcode'" in unsupported[0]
    assert speed.machine_problems(recipe, H100, "llama") == []


def test_validate_shows_what_auto_picks(write_recipe, tiny_model, chat_file, tmp_path, cli):
    code, out, _ = cli("validate", write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs")))
    assert code == 0 and "speed on this machine" in out and "padding_free on" in out


def test_lean_qlora_keeps_norms_in_the_compute_dtype(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model import attach_new_adapter
    from finetune.recipe import LoraSection

    dtypes = {}
    for upcast in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
        model.is_loaded_in_4bit = True  # what bitsandbytes sets; the preparation only looks at the flag and the dtypes
        model = attach_new_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0), kbit_upcast=upcast)
        dtypes[upcast] = model.get_base_model().model.norm.weight.dtype
    assert dtypes == {True: torch.float32, False: torch.bfloat16}


def test_kernel_scope_undoes_module_patches(tiny_model):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    original = modeling_llama.apply_rotary_pos_emb
    plan = speed.SpeedPlan(
        liger=True,
        padding_free=False,
        attention=None,
        checkpointing="off",
        checkpoint_every=1,
        compile=False,
        batch_size=1,
        gradient_accumulation=1,
        qlora_upcast=False,
    )
    with speed.kernel_scope(plan, model):
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None  # what Liger's rope patch does
    assert modeling_llama.apply_rotary_pos_emb is original


def segment_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """A reference varlen kernel (PyTorch >= 2.12 signature): SDPA on each sequence; CPU, any dtype."""
    import torch
    import torch.nn.functional as F

    outs = []
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=tuple(window_size) == (-1, 0),
            scale=scale,
            enable_gqa=enable_gqa,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def test_varlen_attention_gives_the_padded_batch_loss(tiny_model, monkeypatch):
    """The glue around PyTorch's varlen kernel (layouts, GQA, causality, boundaries) against plain SDPA on a padded batch."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune import varlen

    calls = []

    @functools.wraps(segment_attention)  # run_kernel reads the signature
    def kernel(*args, **kwargs):
        calls.append(kwargs)
        return segment_attention(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_kernel", lambda: kernel)
    examples = [{"input_ids": list(range(5, 5 + n))} for n in (7, 12, 4)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        plain = model(**padded).loss
        varlen.use(model)
        fast = model(**flat).loss
    assert torch.allclose(plain, fast, atol=1e-5), (plain, fast)
    assert len(calls) == 2 and calls[0]["enable_gqa"] and calls[0]["window_size"] == (-1, 0)  # each layer, causal, GQA


def test_run_kernel_speaks_both_pytorch_signatures():
    import torch

    from finetune import varlen

    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    new = varlen.run_kernel(segment_attention, q, k, v, cu, cu, 5, 5, None, True)

    def older(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):  # no window_size, no enable_gqa
        return segment_attention(
            q,
            k.repeat_interleave(2, 1),
            v.repeat_interleave(2, 1),
            cu_q,
            cu_k,
            max_q,
            max_k,
            scale=scale,
            window_size=(-1, 0) if is_causal else (-1, -1),
        )

    assert torch.allclose(new, varlen.run_kernel(older, q, k, v, cu, cu, 5, 5, None, True), atol=1e-6)
