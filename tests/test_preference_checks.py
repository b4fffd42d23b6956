"""Bad input to the dpo, kto, orpo and rlhf stages is caught by `wenmai validate`, naming the key and the fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from tiny_models import write_jsonl

from finetune.errors import ConfigError
from finetune.pipeline import load_recipe

PAIRS = [
    {"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"A bad answer {i}."} for i in range(8)
]
REWARD = "reward:\n  dimensions:\n    - {name: accuracy}\n    - {name: safety, weight: 2}\n"


@pytest.fixture
def recipe_with(write_recipe, tiny_model, chat_file, tmp_path):
    """A recipe with the given stages (YAML list items) over a chat dataset `c` and a pairs dataset `p`."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)

    def make(stages: str, extra: str = REWARD) -> Path:
        head = textwrap.dedent(f"""\
            name: t
            model: {{path: {tiny_model}}}
            data:
              c: {{path: {chat_file}, format: chat}}
              p: {{path: {pairs}, format: pairs}}
            stages:
            """)
        return write_recipe(head + textwrap.indent(textwrap.dedent(stages), "  ") + extra)

    return make


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    return [str(p) for p in info.value.problems]


def test_dpo_without_an_earlier_adapter_names_policy_and_base(recipe_with):
    [problem] = problems_of(recipe_with("- dpo: {dataset: p}\n"))
    assert problem.startswith(
        "stages[0].dpo.policy: needs an earlier stage that produces an adapter, and there is none"
    )
    assert "set `policy: base`" in problem


def test_dpo_from_the_base_model_validates(recipe_with):
    recipe = load_recipe(recipe_with("- dpo: {dataset: p, policy: base}\n")).recipe
    assert recipe.stage("dpo").adapters_on_base() == 1  # a fresh adapter: the reference is the adapter-disabled base


def test_dpo_on_an_sft_adapter_keeps_two_adapters_on_the_base(recipe_with):
    recipe = load_recipe(recipe_with("- sft: {dataset: c}\n- dpo: {dataset: p}\n- orpo: {dataset: p}\n")).recipe
    assert recipe.stage("dpo").adapters_on_base() == 2  # the policy and its frozen copy (the reference)
    assert recipe.stage("orpo").adapters_on_base() == 1  # ORPO has no reference


def test_unknown_loss_type_is_checked_against_installed_trl_with_a_suggestion(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- dpo: {dataset: p, loss_type: [sigmoid, ipoo]}\n"))
    assert problem.startswith("stages[1].dpo.loss_type: unknown DPO loss 'ipoo'; did you mean ipo?")
    assert "the installed TRL 1.16" in problem and "hinge" in problem and "robust" in problem


def test_loss_weights_must_match_the_losses(recipe_with):
    [problem] = problems_of(
        recipe_with("- sft: {dataset: c}\n- dpo: {dataset: p, loss_type: [sigmoid, sft], loss_weights: [1]}\n")
    )
    assert problem.startswith("stages[1].dpo.loss_weights: 1 weights for 2 losses in loss_type")


def test_exo_pair_needs_label_smoothing(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- dpo: {dataset: p, loss_type: exo_pair}\n"))
    assert problem.startswith("stages[1].dpo.label_smoothing: exo_pair needs label_smoothing > 0")


def test_dpo_reads_preference_data_only(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- dpo: {dataset: c}\n"))
    assert problem.startswith(
        "stages[1].dpo.dataset: dataset 'c' has format 'chat'; a dpo stage reads pairs or ratings or tiers"
    )


def test_pairs_on_an_unknown_dimension_is_named(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- dpo: {dataset: p, pairs_on: safty}\n"))
    assert problem.startswith("stages[1].dpo.pairs_on: unknown reward dimension 'safty'; did you mean safety?")


def test_kto_loss_is_checked_against_installed_trl(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- kto: {dataset: p, loss_type: ktoo}\n"))
    assert problem.startswith("stages[1].kto.loss_type: unknown KTO loss 'ktoo'; did you mean kto?")


def test_kto_needs_two_answers_per_micro_batch(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- kto: {dataset: p, batch_size: 1}\n"))
    assert problem.startswith("stages[1].kto.batch_size: Input should be greater than or equal to 2")


def test_rlhf_without_a_reward_model_names_the_option(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- rlhf: {dataset: c}\n"))
    assert problem.startswith("stages[1].rlhf.reward_model: needs an earlier stage that produces a reward_model")
    assert "set `reward_model: none`" in problem


def test_rlhf_with_no_reward_at_all_names_rules(recipe_with):
    [problem] = problems_of(recipe_with("- sft: {dataset: c}\n- rlhf: {dataset: c, reward_model: none}\n"))
    assert problem.startswith("stages[1].rlhf.rules: reward_model is none and no rule is set")


def test_rlhf_weights_naming_an_undeclared_dimension(recipe_with):
    stages = "- sft: {dataset: c}\n- reward: {dataset: p}\n- rlhf: {dataset: c, weights: {safty: 1}}\n"
    [problem] = problems_of(recipe_with(stages))
    assert problem.startswith("stages[2].rlhf.weights: unknown reward dimension 'safty'; did you mean safety?")


def test_rlhf_groups_must_fill_the_batch(recipe_with):
    [problem] = problems_of(
        recipe_with(
            "- sft: {dataset: c}\n- rlhf: {dataset: c, reward_model: none, batch_size: 6, "
            "num_generations: 4, rules: {length: {max_chars: 100}}}\n"
        )
    )
    assert problem.startswith(
        "stages[1].rlhf.num_generations: batch_size x gradient_accumulation = 6 answers per step "
        "is not a multiple of num_generations (4)"
    )


def test_rlhf_global_batch_must_hold_whole_groups(recipe_with):
    stages = "- sft: {dataset: c}\n- rlhf: {dataset: c, reward_model: none, rules: {length: {max_chars: 100}}}\n"
    [problem] = problems_of(recipe_with(stages, REWARD + "distributed: {global_batch_size: 10}\n"))
    assert problem.startswith("stages[1].rlhf.num_generations: distributed.global_batch_size (10) is not a multiple")


def test_rlhf_banned_terms_file_must_exist(recipe_with):
    stages = (
        "- sft: {dataset: c}\n- rlhf: {dataset: c, reward_model: none, rules: {banned_terms: {path: nowhere.txt}}}\n"
    )
    [problem] = problems_of(recipe_with(stages))
    assert problem.startswith("stages[1].rlhf.rules.banned_terms.path: cannot read") and "nowhere.txt" in problem


def test_rlhf_format_rule_must_be_a_regular_expression(recipe_with):
    stages = "- sft: {dataset: c}\n- rlhf: {dataset: c, reward_model: none, rules: {format: {pattern: '(unclosed'}}}\n"
    [problem] = problems_of(recipe_with(stages))
    assert problem.startswith("stages[1].rlhf.rules.format.pattern: not a valid regular expression")


def test_shipped_banned_terms_example_reads():
    from reward.rules import read_banned_terms

    terms = read_banned_terms(Path(__file__).resolve().parent.parent / "recipes" / "data" / "banned_terms.example.txt")
    assert "primitive" in terms and "蛮夷" in terms and not any(t.startswith("#") for t in terms)


def test_liger_on_a_machine_without_it_is_a_preflight_problem(recipe_with):
    from finetune.pipeline import preflight

    recipe = load_recipe(recipe_with("- sft: {dataset: c}\n- dpo: {dataset: p, liger_kernel: true}\n")).recipe
    problems = [p for p in preflight(recipe, distributed=False) if "liger_kernel" in p]
    assert problems and problems[0].startswith("stage 'dpo': liger_kernel needs")  # no liger-kernel, or no CUDA, here


def test_loss_names_read_from_trl_source_match_the_imported_config():
    from finetune.checks.trl_choices import _choices, _metadata_from_import, loss_types

    assert loss_types("dpo") == list(
        _choices(_metadata_from_import("trl.trainer.dpo_config", "DPOConfig", "loss_type"))
    )
    assert {"sigmoid", "ipo", "hinge", "robust"} <= set(loss_types("dpo"))
    assert loss_types("kto") == ["kto", "apo_zero_unpaired"]


def test_precompute_auto_is_on_only_when_training_sees_every_pair():
    from finetune.recipe import DpoOptions as Config

    assert Config(dataset="p").precompute(train_examples=400, examples_per_step=4)  # max_steps -1: whole epochs
    assert not Config(dataset="p", max_steps=5).precompute(train_examples=400, examples_per_step=4)
    assert Config(dataset="p", max_steps=100).precompute(train_examples=400, examples_per_step=4)
    assert not Config(dataset="p", precompute_ref_log_probs=False).precompute(train_examples=4, examples_per_step=4)


def test_rlhf_memory_estimate_counts_the_reward_model_as_a_second_base(recipe_with):
    from finetune.distributed.memory import Shape, estimate

    stages = (
        "- sft: {dataset: c}\n- reward: {dataset: p}\n- rlhf: {dataset: c}\n"
        "- rlhf: {dataset: c, name: rules_only, reward_model: none, rules: {length: {max_chars: 90}}}\n"
    )
    recipe = load_recipe(recipe_with(stages)).recipe
    shape = Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=600, tied=True)
    with_reward_model = estimate(recipe, recipe.stage("rlhf"), 1, 1, shape)
    rules_only = estimate(recipe, recipe.stage("rules_only"), 1, 1, shape)
    assert with_reward_model.parts["weights"] == 2 * rules_only.parts["weights"]
    assert any("2 copies of the base model" in note for note in with_reward_model.notes)


def test_a_speed_section_on_a_stage_that_does_not_run_it_is_refused(recipe_with):
    path = recipe_with("- dpo: {dataset: p, policy: base, speed: {liger: true}}\n")
    [problem] = [p for p in problems_of(path) if ".speed" in p]
    assert "stages[0].dpo.speed" in problem and "precompute_ref_log_probs" in problem
