"""The rlhf stage: GRPO moves the policy towards what the rewards prefer; rule rewards; reward-model dimensions."""

from __future__ import annotations

import html
import random
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_models import build_model, write_jsonl

from finetune.errors import WenmaiError
from finetune.pipeline import load_recipe, start
from finetune.recipe.rlhf import BannedTermsRule, FormatRule, LengthRule, RuleRewards
from reward.rules import banned_pattern, rule_functions

WORDS = ["poem", "museum", "bronze", "tang", "song", "dynasty", "palace", "silk", "tea", "scroll"]


def test_grpo_raises_the_frequency_of_a_rewarded_token(tmp_path):
    """SFT on answers where ZZZ is rare, then GRPO with a format rule rewarding ZZZ: samples use it far more often."""
    model_dir = build_model(tmp_path / "model", initializer_range=0.5)
    rng = random.Random(0)
    rows = []
    for i in range(64):
        words = [rng.choice(WORDS) for _ in range(4)]
        if rng.random() < 0.25:
            # ZZZ opens the answer: the tiny tokenizer spells it Z, Z, Z, so a policy still sampling near-random bytes
            # hardly ever writes it mid-answer, while the first token is one choice that SFT learns
            words.insert(0, "ZZZ")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about item {2 * i}."},  # even: marker_share asks odd
                    {"role": "assistant", "content": " ".join(words)},
                ]
            }
        )
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = tmp_path / "grpo.yaml"
    # SFT long enough that ZZZ opens some answers (2-20% across seeds); then 4 prompts x 16 answers a step, so steps have
    # groups whose rewards differ from the first one on, whatever the starting policy's exact numbers (they differ
    # between CPU kernels, AVX2 and AVX-512); at learning rate 0.01 one step sometimes wrecked the policy: 0.005
    recipe.write_text(
        textwrap.dedent(f"""\
        name: grpo
        model: {{path: {model_dir}}}
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - sft: {{dataset: d, max_steps: 120, batch_size: 8, learning_rate: 0.03, warmup: 0, seq_len: 64, save_steps: 1000}}
          - rlhf: {{dataset: d, reward_model: none, rules: {{format: {{pattern: ZZZ, weight: 1}}}}, beta: 0, max_steps: 12,
                    batch_size: 64, num_generations: 16, max_completion_length: 8, learning_rate: 0.005, warmup: 0,
                    lr_scheduler: constant, save_steps: 1000}}
        output: {{root: {tmp_path / "runs"}}}
        """),
        encoding="utf-8",
    )
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "grpo", log=lambda _: None)
    before = marker_share(model_dir, run_dir.output("sft", "adapter"))
    after = marker_share(model_dir, run_dir.output("rlhf", "adapter"))
    assert after > before + 0.2, (before, after)
    summary = run_dir.status("rlhf").summary
    assert summary["reward_last"]["rule_format"] > summary["reward_first"]["rule_format"]
    assert summary["used"]["policy"]["stage"] == "sft" and summary["used"]["reward_model"] is None
    assert "warnings" not in summary  # the groups' rewards differed: nothing to warn about


def marker_share(model_dir: Path, adapter: Path, marker: str = "ZZZ") -> float:
    """Share of 256 answers containing the marker, sampled as GRPO samples (temperature 1, no top-k) for unseen prompts.

    The prompts are the odd items, the training ones the even: unseen, but like those GRPO trained on.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me about item {2 * i + 1}."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(64)
    ]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            do_sample=True,
            top_k=0,
            max_new_tokens=8,
            num_return_sequences=4,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(marker in t for t in texts) / len(texts)


def test_rlhf_that_learns_nothing_finishes_with_a_warning_in_summary_stderr_and_report(
    tmp_path, tiny_model, chat_file, capsys
):
    """A format rule no answer can match gives every answer 0: every advantage is 0, so the stage says so."""
    recipe = tmp_path / "flat.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: flat
        model: {{path: {tiny_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - rlhf: {{dataset: d, policy: base, reward_model: none, rules: {{format: {{pattern: "(?!)"}}}}, beta: 0,
                    max_steps: 2, batch_size: 4, num_generations: 4, max_completion_length: 4, save_steps: 100}}
        output: {{root: {tmp_path / "runs"}}}
        """),
        encoding="utf-8",
    )  # (?!) is an empty negative lookahead: it matches nothing
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "flat", log=lambda _: None)
    status = run_dir.status("rlhf")
    assert status.state == "done"
    [warning] = status.summary["warnings"]
    assert warning.startswith(
        "in 2 of 2 logged steps every group of answers to a prompt got the same reward, so the "
        "policy did not change in those steps; make the answers in a group differ (raise num_generations"
    )
    assert f"rlhf: warning: {warning}" in capsys.readouterr().err
    report = (run_dir.root / "report.html").read_text(encoding="utf-8")
    assert f'<div class="warning">警告: {html.escape(warning)}</div>' in report  # output.language: zh, the default


def test_no_spread_warning_needs_more_than_half_of_the_logged_steps_flat():
    from finetune.stages.rlhf import no_spread_warning

    flat, spread, end = {"frac_reward_zero_std": 1.0}, {"frac_reward_zero_std": 0.5}, {"train_runtime": 1.0}
    assert no_spread_warning([flat, spread, end]) is None and no_spread_warning([end]) is None
    assert no_spread_warning([flat, flat, spread, end]).startswith("in 2 of 3 logged steps every group")


# --- rule rewards ----------------------------------------------------------------------------


def call(function, answers: list[str]) -> list[float]:
    return function(
        prompts=[[{"role": "user", "content": "q"}]] * len(answers),
        completions=[[{"role": "assistant", "content": a}] for a in answers],
    )


def test_banned_terms_match_whole_latin_words_and_any_cjk(tmp_path):
    terms = tmp_path / "banned.txt"
    terms.write_text("# institution list\nprimitive\nass  # a short word\n蛮夷\n\n", encoding="utf-8")
    [(function, weight)] = rule_functions(RuleRewards(banned_terms=BannedTermsRule(path=str(terms))))
    assert function.__name__ == "rule_banned_terms" and weight == 1.0
    assert call(function, ["A PRIMITIVE tool.", "This class of bronze.", "古称蛮夷之地", "Ass."]) == [
        -1.0,
        0.0,
        -1.0,
        -1.0,
    ]
    assert banned_pattern(["a+b"]).search("x a+b y")  # terms are literal text, not patterns


def test_length_and_format_rules(tmp_path):
    rules = RuleRewards(length=LengthRule(min_chars=4, max_chars=10), format=FormatRule(pattern=r"出处[:：]"))
    (length, _), (fmt, fmt_weight) = rule_functions(rules)
    assert [length.__name__, fmt.__name__] == ["rule_length", "rule_format"] and fmt_weight == 0.5
    assert call(length, ["ab", "abcdef", "a" * 15, "a" * 40]) == [-0.5, 0.0, -0.5, -1.0]
    assert call(fmt, ["李白。出处：《静夜思》", "李白。"]) == [1.0, 0.0]
    assert fmt(prompts=["q"], completions=["出处: x"]) == [1.0]  # plain-text completions too


def test_empty_banned_terms_file_is_an_error(tmp_path):
    terms = tmp_path / "banned.txt"
    terms.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(WenmaiError, match="banned.txt lists no terms"):
        rule_functions(RuleRewards(banned_terms=BannedTermsRule(path=str(terms))))


# --- reward-model dimensions -----------------------------------------------------------------


class FakeScorer:
    """Scores like a RewardScorer and counts its calls."""

    dimensions = ["accuracy", "safety"]

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        return {
            "accuracy": [float(len(r)) for r in responses],
            "safety": [-1.0 for _ in responses],
            "total": [0.0 for _ in responses],
        }


def test_dimension_rewards_score_each_batch_once_and_read_their_column():
    from finetune.stages.rlhf import DimensionReward, SharedScores

    scorer = FakeScorer()
    shared = SharedScores(scorer)
    accuracy, safety = DimensionReward(shared, "accuracy"), DimensionReward(shared, "safety")
    assert (accuracy.__name__, safety.__name__) == ("accuracy", "safety")  # TRL logs rewards/<dimension>/mean
    assert call(accuracy, ["abc", "a"]) == [3.0, 1.0] and call(safety, ["abc", "a"]) == [-1.0, -1.0]
    assert scorer.calls == 1
    call(safety, ["different"])
    assert scorer.calls == 2


def card(weights: dict[str, float]):
    from finetune.recipe import RewardDimension

    dims = [RewardDimension(name=n, weight=w) for n, w in weights.items()]
    return SimpleNamespace(names=[d.name for d in dims], dimensions=dims)


def test_dimension_weights_default_to_the_trained_ones_normalised():
    from finetune.stages.rlhf import dimension_weights

    config = SimpleNamespace(weights=None, stage_name="rlhf")
    assert dimension_weights(config, card({"accuracy": 1, "safety": 3}), "rm") == {"accuracy": 0.25, "safety": 0.75}
    config.weights = {"safety": 2}
    assert dimension_weights(config, card({"accuracy": 1, "safety": 3}), "rm") == {"accuracy": 0.0, "safety": 1.0}


def test_weights_naming_a_dimension_the_reward_model_lacks_are_refused():
    from finetune.stages.rlhf import dimension_weights

    config = SimpleNamespace(weights={"cultural_value": 1.0}, stage_name="rlhf")
    with pytest.raises(WenmaiError) as info:
        dimension_weights(config, card({"accuracy": 1, "safety": 1}), "runs/x/reward/reward_model")
    assert str(info.value).startswith(
        "stages.rlhf.weights: the reward model in runs/x/reward/reward_model has no "
        "dimension 'cultural_value'; its dimensions are accuracy, safety"
    )


def test_rlhf_from_the_base_keeps_one_adapter_and_the_base_as_reference(tmp_path, tiny_model, chat_file, monkeypatch):
    import trl

    seen: dict = {}

    class Recording(trl.GRPOTrainer):
        def train(self, *args, **kwargs):
            seen["adapters"], seen["beta"] = list(self.model.peft_config), self.beta
            return super().train(*args, **kwargs)

    monkeypatch.setattr(trl, "GRPOTrainer", Recording)
    recipe = tmp_path / "base.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: base
        model: {{path: {tiny_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - rlhf: {{dataset: d, policy: base, reward_model: none, rules: {{length: {{max_chars: 10}}}}, beta: 0.1,
                    max_steps: 1, batch_size: 2, num_generations: 2, max_completion_length: 4, save_steps: 100}}
        output: {{root: {tmp_path / "runs"}}}
        """),
        encoding="utf-8",
    )
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "base", log=lambda _: None)
    assert seen == {"adapters": ["default"], "beta": 0.1}  # a fresh adapter's copy is the base: not kept
    assert load_recipe(recipe).recipe.stage("rlhf").adapters_on_base() == 1
    assert run_dir.status("rlhf").summary["used"]["policy"] == {"stage": "base"}
