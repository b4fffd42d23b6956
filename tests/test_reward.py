"""The reward stage on a tiny model: it learns, heads stay separate, and the saved folder scores like memory."""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path

import pytest
from tiny_models import write_jsonl

from finetune.pipeline import load_recipe, start
from finetune.run_dir import RunDir, read_metrics

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "poem",
    "museum",
    "bronze",
    "tang",
    "song",
    "dynasty",
    "palace",
    "silk",
    "tea",
    "scroll",
    "wall",
    "garden",
    "lantern",
    "opera",
]
DIMENSIONS = ["accuracy", "cultural_value", "safety", "fluency"]


def reward_recipe(model: Path, data: Path, root: Path, fmt: str, reward_section: str = "", **options) -> str:
    settings = {
        "dataset": "d",
        "max_steps": 30,
        "batch_size": 8,
        "learning_rate": 0.01,
        "warmup": 0,
        "lr_scheduler": "constant",
        "logging_steps": 5,
        "eval_steps": 100,
        "seq_len": 96,
        "eval_fraction": 0.25,
    }
    settings.update(options)
    body = ", ".join(f"{k}: {v}" for k, v in settings.items())
    return (
        textwrap.dedent(f"""\
        name: rm
        model: {{path: {model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {data}, format: {fmt}}}
        stages:
          - reward: {{{body}}}
        output: {{root: {root}}}
        """)
        + reward_section
    )


def run_recipe(tmp_path: Path, text: str, name: str = "run") -> RunDir:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text, encoding="utf-8")
    return start(load_recipe(recipe), tmp_path / "runs" / name, log=lambda _: None)


def sentence(rng: random.Random, n: int = 5) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def test_marker_in_chosen_is_learned_to_held_out_accuracy_above_095(tmp_path, tiny_model):
    rng = random.Random(0)
    rows = []
    for i in range(120):
        chosen = sentence(rng)
        chosen.insert(rng.randrange(len(chosen) + 1), "ZZZ")  # the learnable marker, anywhere in the answer
        rows.append(
            {
                "prompt": f"Tell me about {' '.join(sentence(rng, 3))} ({i}).",
                "chosen": " ".join(chosen),
                "rejected": " ".join(sentence(rng)),
            }
        )
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run_dir = run_recipe(tmp_path, reward_recipe(tiny_model, data, tmp_path / "runs", "pairs"))
    summary = run_dir.status("reward").summary
    assert summary["eval_pairs"] == {"overall": 30}
    assert summary["eval_accuracy_before"]["overall"] < 0.8, summary  # not right by luck at random init
    assert summary["eval_accuracy_after"]["overall"] > 0.95, summary
    assert summary["eval_accuracy"] == summary["eval_accuracy_after"]["overall"]
    assert (run_dir.output("reward", "reward_model") / "adapter" / "adapter_model.safetensors").is_file()


def test_each_dimension_head_learns_its_own_opposite_signal(tmp_path, tiny_model):
    """ZZZ answers are safer, QQQ answers more fluent: one scalar cannot fit both, separate heads can."""
    rng = random.Random(1)
    rows = []
    for i in range(100):
        prompt = f"Question {i}: {' '.join(sentence(rng, 3))}?"
        rows.append(
            {"prompt": prompt, "response": " ".join([*sentence(rng), "ZZZ"]), "scores": {"safety": 5, "fluency": 1}}
        )
        rows.append(
            {"prompt": prompt, "response": " ".join([*sentence(rng), "QQQ"]), "scores": {"safety": 1, "fluency": 5}}
        )
    data = write_jsonl(tmp_path / "ratings.jsonl", rows)
    section = "reward:\n  dimensions:\n    - {name: safety, weight: 2}\n    - {name: fluency}\n"
    run_dir = run_recipe(tmp_path, reward_recipe(tiny_model, data, tmp_path / "runs", "ratings", section, max_steps=20))
    summary = run_dir.status("reward").summary
    assert summary["train_data"]["pairs"] == {"safety": 100, "fluency": 100}
    after = summary["eval_accuracy_after"]
    assert after["safety"] > 0.9 and after["fluency"] > 0.9, summary
    metrics = read_metrics(run_dir.metrics_path("reward"))
    assert any("eval_accuracy_safety" in row and "eval_accuracy_fluency" in row for row in metrics)


# --- the loss through the trainer ------------------------------------------------------------------


def make_trainer(tiny_model: Path, tmp_path: Path, examples: list[dict], weights: list[float], **config):
    from datasets import Dataset
    from trl import RewardConfig

    from finetune.data.chat import end_of_turn_ids
    from finetune.model import attach_new_adapter, load_model, load_tokenizer, resolve_source
    from finetune.recipe import LoraSection, ModelSection
    from finetune.stages.reward import tokenize_examples
    from reward.data import slot_names
    from reward.model import choose_pad_token
    from reward.trainer import DimensionRewardTrainer, PreferenceCollator

    section = ModelSection(path=str(tiny_model))
    source = resolve_source(section)
    tokenizer = load_tokenizer(section, source)
    choose_pad_token(tokenizer, end_of_turn_ids(tokenizer))
    names = DIMENSIONS[: len(weights)]
    slots = slot_names(names)
    rows, _ = tokenize_examples(tokenizer, examples, 64, config.pop("margin_scale", 0.0), len(slots))
    model = load_model(
        section, source, task="sequence-classification", num_labels=len(names), pad_token_id=tokenizer.pad_token_id
    )
    model = attach_new_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0), task_type="SEQ_CLS")
    args = RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], max_length=None, use_cpu=True, **config)
    trainer = DimensionRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        slots=slots,
        weights=weights,
    )
    return trainer, trainer.data_collator(rows)


def head_gradient(trainer, batch):
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    head = trainer.model.base_model.model.score.modules_to_save["default"]
    return head.weight.grad


def examples_for(dimension: str | None, n: int = 6) -> list[dict]:
    from reward.data import PreferencePair, training_examples

    pairs = [
        PreferencePair(
            prompt=[{"role": "user", "content": f"q{i}"}],
            chosen=f"good answer {i}",
            rejected=f"bad {i}",
            dimension=dimension,
            margin=1.0,
        )
        for i in range(n)
    ]
    return training_examples(pairs, DIMENSIONS)


@pytest.mark.parametrize("center", [None, 0.01])
def test_pair_labelled_only_for_safety_changes_no_other_head(tmp_path, tiny_model, center):
    trainer, batch = make_trainer(
        tiny_model, tmp_path, examples_for("safety"), [1, 1, 1, 1], center_rewards_coefficient=center, margin_scale=0.5
    )
    grad = head_gradient(trainer, batch)
    safety = DIMENSIONS.index("safety")
    assert grad[safety].abs().sum() > 0
    for row in range(len(DIMENSIONS)):
        if row != safety:
            assert grad[row].abs().max() == 0, f"head {DIMENSIONS[row]} moved"


def test_pair_judging_the_total_moves_every_weighted_head(tmp_path, tiny_model):
    trainer, batch = make_trainer(tiny_model, tmp_path, examples_for(None), [0.5, 0.0, 0.3, 0.2])
    grad = head_gradient(trainer, batch)
    norms = grad.abs().sum(dim=1)
    assert norms[1] == 0 and (norms[[0, 2, 3]] > 0).all()  # cultural_value has weight 0 in the total
    assert norms[0] / norms[3] == pytest.approx(0.5 / 0.2, rel=1e-4)  # each head moves by its weight


def test_one_dimension_uses_trls_loss_and_ours_agrees_with_it(tmp_path, tiny_model):
    import torch

    from reward.loss import preference_loss

    examples = examples_for(None)
    trainer, batch = make_trainer(
        tiny_model, tmp_path, examples, [1.0], center_rewards_coefficient=0.01, margin_scale=0.5
    )
    assert "preference" not in batch and batch["margin"].shape == (6,)  # the plain TRL path
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    a, b = rewards.chunk(2)
    ours = preference_loss(a, b, torch.ones_like(a), batch["margin"].unsqueeze(-1), torch.ones(1), 0.01)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-6)


def test_reward_is_read_at_the_end_of_turn_token_even_when_pad_equals_eos(tmp_path, tiny_model):
    import torch

    trainer, batch = make_trainer(tiny_model, tmp_path, examples_for("safety"), [1, 1, 1, 1])
    tokenizer, model = trainer.processing_class, trainer.model
    assert (
        tokenizer.eos_token_id == 2 and tokenizer.pad_token_id != tokenizer.eos_token_id
    )  # the tiny model has pad == eos
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        lengths = batch["attention_mask"].sum(dim=1)
        last = out.hidden_states[-1][torch.arange(len(lengths)), lengths - 1]
        head = model.base_model.model.score.modules_to_save["default"]
    assert (batch["input_ids"][torch.arange(len(lengths)), lengths - 1] == tokenizer.eos_token_id).all()
    torch.testing.assert_close(out.logits, head(last))


# --- the saved folder -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def culture_run(tmp_path_factory, tiny_model):
    """A 4-dimension reward run on the shipped ratings, with the trained model kept from memory."""
    import finetune.stages.reward as reward_train

    tmp_path = tmp_path_factory.mktemp("culture")
    text = reward_recipe(
        tiny_model,
        ROOT / "recipes" / "data" / "culture_ratings.jsonl",
        tmp_path / "runs",
        "ratings",
        max_steps=4,
        eval_steps=2,
        seq_len=160,
        margin_scale=0.1,
        center_rewards_coefficient=0.01,
    )
    text = text.replace("name: rm\n", "name: rm\ninclude: [reward/culture]\n")
    captured = {}

    def keep(ctx):
        captured["trained"] = original(ctx)
        return captured["trained"]

    original = reward_train.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reward_train, "train", keep)
        run_dir = run_recipe(tmp_path, text)
    return run_dir, captured["trained"]


PROMPTS = [
    "《静夜思》是谁写的？",
    [{"role": "system", "content": "You are a museum guide."}, {"role": "user", "content": "Can I use flash?"}],
    "What is Tang sancai?",
]
ANSWERS = [
    "李白，唐代诗人。",
    "No: flash fades pigments.",
    "Tang dynasty lead-glazed earthenware, often made as grave goods " * 3,
]


def test_reload_from_the_folder_alone_scores_like_memory(culture_run, tmp_path):
    from reward.score import RewardScorer

    run_dir, trained = culture_run
    in_memory = RewardScorer(trained.trainer.model, trained.tokenizer, trained.card).score(
        PROMPTS, ANSWERS, batch_size=1
    )
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir.output("reward", "reward_model"), moved)
    reloaded = RewardScorer.from_stage(moved)
    assert reloaded.dimensions == DIMENSIONS
    for batch_size in (1, 3):  # padding in a batch changes nothing
        scores = reloaded.score(PROMPTS, ANSWERS, batch_size=batch_size)
        assert set(scores) == {*DIMENSIONS, "total"}
        for name in scores:
            assert scores[name] == pytest.approx(in_memory[name], abs=1e-5), name
    weights = {d.name: d.weight for d in trained.card.dimensions}
    expected_total = sum(weights[n] * in_memory[n][0] for n in DIMENSIONS) / sum(weights.values())
    assert in_memory["total"][0] == pytest.approx(expected_total, abs=1e-6)


def test_stage_reports_pairs_agreement_and_accuracy_per_dimension(culture_run):
    run_dir, _ = culture_run
    status = run_dir.status("reward")
    assert status.outputs["reward_model"] == "reward_model"
    summary = status.summary
    assert set(summary["train_data"]["pairs"]) == set(DIMENSIONS)
    assert set(summary["rater_agreement"]) == set(DIMENSIONS)
    assert 0 < summary["rater_agreement"]["fluency"]["exact"] < 1
    assert set(summary["eval_accuracy_after"]) == set(DIMENSIONS) and 0 <= summary["eval_accuracy"] <= 1
    evals = [row for row in read_metrics(run_dir.metrics_path("reward")) if "eval_accuracy_safety" in row]
    assert [row["step"] for row in evals] == [0, 2, 4]


def test_cli_scores_a_file_per_dimension(culture_run, cli, tmp_path):
    from reward.score import RewardScorer

    run_dir, _ = culture_run
    inputs = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": PROMPTS[0], "response": ANSWERS[0]},
            {"id": "b", "messages": [*PROMPTS[1], {"role": "assistant", "content": ANSWERS[1]}]},
        ],
    )
    code, out, err = cli("reward", "score", run_dir.root, "--input", inputs)
    assert code == 0, err
    assert "accuracy" in out and "cultural_value" in out and "total" in out and "mean" in out
    code, out, err = cli("reward", "score", run_dir.root, "--input", inputs, "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == ["a", "b"]
    direct = RewardScorer.from_stage(run_dir.root / "reward").score(PROMPTS[:2], ANSWERS[:2])
    assert scored[1]["scores"]["safety"] == pytest.approx(direct["safety"][1], abs=1e-4)


def test_cli_names_bad_input_lines_and_missing_reward_stage(culture_run, cli, tmp_path, tiny_model, chat_file):
    run_dir, _ = culture_run
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q"}])
    code, _, err = cli("reward", "score", run_dir.root, "--input", bad)
    assert code == 2 and f"{bad}:2: give `prompt` and `response`" in err
    from conftest import tiny_recipe

    sft_only = run_recipe(tmp_path, tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1), "sft")
    code, _, err = cli("reward", "score", sft_only.root, "--input", bad)
    assert code == 2 and "has no reward stage" in err
