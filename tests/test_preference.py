"""The preference stages on a tiny model: DPO moves the margin the right way against a frozen SFT reference."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
from tiny_models import build_model, write_jsonl

from finetune.pipeline import load_recipe, start
from finetune.run_dir import RunDir, read_metrics

WORDS = ["poem", "museum", "bronze", "tang", "song", "dynasty", "palace", "silk", "tea", "scroll"]
REWARD = "reward:\n  dimensions:\n    - {name: accuracy}\n    - {name: safety, weight: 3}\n"


def pair_rows(n: int = 48, seed: int = 0) -> list[dict]:
    """Chosen answers carry the marker ZZZ, rejected ones QQQ: a preference a tiny model can learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(3)]
        rows.append(
            {
                "prompt": f"Tell me about item {i}.",
                "chosen": " ".join([*words, "ZZZ"]),
                "rejected": " ".join([*words, "QQQ"]),
            }
        )
    return rows


def chat_rows(pairs: list[dict]) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"][:-4]}]}
        for p in pairs
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-wide"), initializer_range=0.5)  # wide logits: a LoRA can move them


def recipe_text(model: Path, work: Path, stages: str, extra: str = "") -> str:
    pairs = pair_rows()
    pairs_file = write_jsonl(work / "pairs.jsonl", pairs)
    chat_file = write_jsonl(work / "chat.jsonl", chat_rows(pairs))
    head = textwrap.dedent(f"""\
        name: pref
        model: {{path: {model}}}
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
        data:
          chat: {{path: {chat_file}, format: chat}}
          pairs: {{path: {pairs_file}, format: pairs}}
        output: {{root: {work / "runs"}}}
        stages:
        """)
    return head + textwrap.indent(textwrap.dedent(stages), "  ") + extra


def run(work: Path, text: str, name: str = "run") -> RunDir:
    path = work / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return start(load_recipe(path), work / "runs" / name, log=lambda _: None)


SFT = "- sft: {dataset: chat, max_steps: 20, batch_size: 8, learning_rate: 0.02, warmup: 0, seq_len: 64, save_steps: 100}\n"


@pytest.fixture(scope="module")
def chain(model_dir, tmp_path_factory) -> RunDir:
    """sft -> reward -> dpo -> rlhf, once for the tests below."""
    work = tmp_path_factory.mktemp("chain")
    stages = SFT + textwrap.dedent("""\
        - reward: {dataset: pairs, max_steps: 4, batch_size: 8, seq_len: 64, eval_fraction: 0, save_steps: 100}
        - dpo: {dataset: pairs, max_steps: 12, batch_size: 8, learning_rate: 0.01, warmup: 0, seq_len: 64, beta: 0.1,
                eval_fraction: 0.25, eval_steps: 12, logging_steps: 2, save_steps: 100}
        - rlhf: {dataset: pairs, max_steps: 2, batch_size: 4, num_generations: 2, max_completion_length: 6,
                 weights: {safety: 1, accuracy: 1}, rules: {length: {max_chars: 40}}, save_steps: 100}
        """)
    return run(work, recipe_text(model_dir, work, stages, REWARD))


def test_dpo_steps_raise_the_chosen_over_rejected_margin(chain, model_dir):
    pairs = pair_rows()
    before = margins(model_dir, chain.output("sft", "adapter"), pairs)
    after = margins(model_dir, chain.output("dpo", "adapter"), pairs)
    assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (before[:4], after[:4])
    assert sum(a > b for a, b in zip(after, before, strict=True)) > 0.9 * len(pairs)


def test_dpo_logs_reward_margins_and_accuracy_held_out(chain):
    summary = chain.status("dpo").summary
    assert summary["eval_reward_margin"] > 0 and summary["eval_reward_accuracy"] > 0.9, summary
    assert summary["train_data"]["pairs"] == {"total": 48} and summary["eval_examples"] == 12
    assert summary["left_out_prompt_fills_seq_len"] == 0
    assert (
        summary["loss_type"] == ["sigmoid"] and summary["precompute_ref_log_probs"] is True
    )  # 12 steps x 8 cover 36 pairs
    rows = read_metrics(chain.metrics_path("dpo"))
    assert any("rewards/margins" in r and "rewards/accuracies" in r for r in rows)
    assert any("eval_rewards/margins" in r for r in rows)


def test_rlhf_logs_each_reward_dimension_of_the_trained_reward_model(chain):
    rows = read_metrics(chain.metrics_path("rlhf"))
    for name in ("accuracy", "safety", "rule_length"):
        assert all(f"rewards/{name}/mean" in r for r in rows if "reward" in r), name
    assert any("kl" in r and "completions/mean_length" in r for r in rows)
    summary = chain.status("rlhf").summary
    assert summary["reward_functions"] == {"accuracy": 0.5, "safety": 0.5, "rule_length": 0.5}  # weights normalised
    assert set(summary["reward_last"]) == {"accuracy", "safety", "rule_length"}


def test_lineage_records_the_adapter_and_reward_model_each_stage_used(chain):
    from finetune.adapters import adapter_digest

    stages = {s["name"]: s for s in json.loads(chain.lineage_path.read_text())["stages"]}
    assert stages["dpo"]["inputs"] == {"policy": "sft"}
    assert stages["dpo"]["used"]["policy"] == {
        "stage": "sft",
        "adapter": "sft/adapter",
        "sha256": adapter_digest(chain.output("sft", "adapter")),
    }
    assert stages["rlhf"]["inputs"] == {"policy": "dpo", "reward_model": "reward"}
    assert stages["rlhf"]["used"]["policy"]["sha256"] == adapter_digest(chain.output("dpo", "adapter"))
    assert stages["rlhf"]["used"]["reward_model"] == {
        "stage": "reward",
        "reward_model": "reward/reward_model",
        "dimensions": ["accuracy", "safety"],
    }


def test_each_policy_stage_saves_one_complete_adapter_that_merge_folds(chain, cli):
    for stage in ("dpo", "rlhf"):
        folder = chain.output(stage, "adapter")
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "ref").exists(), stage
    code, out, err = cli("merge", chain.root, "--adapter", "dpo", "--name", "merge_dpo")
    assert code == 0, out + err
    assert chain.status("merge_dpo").summary["parity_passed"] is True


# --- the reference --------------------------------------------------------------------------


def test_reference_is_the_frozen_sft_adapter(model_dir, tmp_path, monkeypatch):
    """Reference log-probs equal the SFT adapter's (not the base's) before training and stay unchanged after it."""
    from trl import DPOConfig, DPOTrainer

    import finetune.stages.preference as preference

    seen: dict = {}

    class Recording(DPOTrainer):
        def train(self, *args, **kwargs):
            batch = self.data_collator([self.train_dataset[i] for i in range(8)])
            seen["ref_before"] = reference_logps(self.model, batch)
            seen["policy_before"] = completion_logps(self.model, batch)
            with self.model.disable_adapter():
                seen["base"] = completion_logps(self.model, batch)
            result = super().train(*args, **kwargs)
            seen["ref_after"] = reference_logps(self.model, batch)
            seen["policy_after"] = completion_logps(self.model, batch)
            seen["batch"] = batch
            return result

    monkeypatch.setattr(preference, "trl_classes", lambda method: (DPOConfig, Recording))
    stages = (
        SFT
        + "- dpo: {dataset: pairs, max_steps: 6, batch_size: 8, learning_rate: 0.01, seq_len: 64, eval_fraction: 0}\n"
    )
    run_dir = run(tmp_path, recipe_text(model_dir, tmp_path, stages))
    sft = completion_logps(load_adapted(model_dir, run_dir.output("sft", "adapter")), seen["batch"])

    assert close(seen["ref_before"], sft) and close(seen["policy_before"], sft)  # the reference is the SFT policy ...
    assert not close(seen["base"], sft)  # ... not the base without it
    assert close(seen["ref_after"], seen["ref_before"])  # frozen through training
    assert not close(seen["policy_after"], seen["policy_before"])  # while the policy moved


def test_loss_type_and_fast_path_reach_trl(model_dir, tmp_path, monkeypatch):
    from trl import DPOConfig, DPOTrainer

    import finetune.stages.preference as preference

    seen: dict = {}

    class Recording(DPOTrainer):
        def train(self, *args, **kwargs):
            seen["trainer"], seen["adapters"] = self, list(self.model.peft_config)
            return super().train(*args, **kwargs)

    monkeypatch.setattr(preference, "trl_classes", lambda method: (DPOConfig, Recording))
    stages = (
        "- dpo: {dataset: pairs, policy: base, loss_type: [ipo, sft], loss_weights: [1.0, 0.5], beta: 0.3, "
        "precompute_ref_log_probs: true, max_steps: 2, batch_size: 4, seq_len: 64, eval_fraction: 0}\n"
    )
    run_dir = run(tmp_path, recipe_text(model_dir, tmp_path, stages))
    trainer = seen["trainer"]
    assert trainer.args.loss_type == ["ipo", "sft"] and trainer.loss_types == ["ipo", "sft"]
    assert trainer.args.loss_weights == [1.0, 0.5] and trainer.beta == 0.3
    assert trainer.args.precompute_ref_log_probs and "ref_chosen_logps" in trainer.train_dataset.column_names
    assert seen["adapters"] == ["default"]  # policy: base: one new adapter; the reference is the base (adapter off)
    assert run_dir.status("dpo").summary["loss_type"] == ["ipo", "sft"]


def test_kto_and_orpo_train_towards_the_desirable_answers_and_save_their_adapters(model_dir, tmp_path):
    """Each stage moves its policy: log p(chosen) - log p(rejected) rises over the policy it started from
    (KTO: the SFT adapter; ORPO with `policy: base`: the base model), and ORPO's logged log-odds ratio rises."""
    stages = SFT + textwrap.dedent("""\
        - kto: {dataset: pairs, max_steps: 8, batch_size: 8, learning_rate: 0.01, warmup: 0, seq_len: 64,
                eval_fraction: 0, logging_steps: 1}
        - orpo: {dataset: pairs, policy: base, max_steps: 8, batch_size: 8, learning_rate: 0.01, warmup: 0,
                 seq_len: 64, eval_fraction: 0, logging_steps: 1}
        """)
    run_dir = run(tmp_path, recipe_text(model_dir, tmp_path, stages))
    assert run_dir.status("kto").summary["train_labels"] == {"desirable": 48, "undesirable": 48, "mixed_left_out": 0}
    for stage in ("kto", "orpo"):
        assert (run_dir.output(stage, "adapter") / "adapter_model.safetensors").is_file()
    pairs = pair_rows()
    for stage, origin in (("kto", run_dir.output("sft", "adapter")), ("orpo", None)):
        before, after = margins(model_dir, origin, pairs), margins(model_dir, run_dir.output(stage, "adapter"), pairs)
        assert sum(after) / len(after) > sum(before) / len(before) + 1.0, (stage, before[:4], after[:4])
        assert sum(a > b for a, b in zip(after, before, strict=True)) > 0.9 * len(pairs), stage
    ratios = [r["log_odds_ratio"] for r in read_metrics(run_dir.metrics_path("orpo")) if "log_odds_ratio" in r]
    assert len(ratios) == 8 and ratios[-1] > ratios[0], ratios


def test_an_interrupted_dpo_stage_resumes_from_its_checkpoint_to_the_same_adapter(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from finetune.pipeline import resume
    from finetune.run_dir import StageStatus, utc_now

    stages = SFT + (
        "- dpo: {dataset: pairs, max_steps: 4, batch_size: 4, learning_rate: 0.01, warmup: 0, seq_len: 64, "
        "eval_fraction: 0, save_steps: 2, logging_steps: 1}\n"
    )
    whole = run(tmp_path, recipe_text(model_dir, tmp_path, stages), name="whole")
    cut = tmp_path / "runs" / "cut"
    shutil.copytree(whole.root, cut)
    folder = RunDir.open(cut)
    shutil.rmtree(cut / "dpo" / "checkpoints" / "checkpoint-4")
    folder.write_status(
        StageStatus(name="dpo", kind="dpo", state="running", started=utc_now(), inputs={"policy": "sft"})
    )
    logged: list[str] = []
    resumed = resume(cut, log=logged.append)
    assert "[2/2] dpo: resuming from checkpoint-2" in logged
    assert [r["step"] for r in read_metrics(resumed.metrics_path("dpo")) if "loss" in r] == [1, 2, 3, 4]
    want = load_file(str(whole.output("dpo", "adapter") / "adapter_model.safetensors"))
    got = load_file(str(resumed.output("dpo", "adapter") / "adapter_model.safetensors"))
    assert set(got) == set(want) and all(got[k].allclose(want[k], atol=1e-6) for k in want)


# --- data ------------------------------------------------------------------------------------


def test_kto_labels_from_tiers_leave_the_middle_tier_out():
    from finetune.data.pairs import tiers_to_pairs
    from finetune.stages.preference import unpaired_rows

    record = {
        "prompt": "Describe the bronze ding.",
        "responses": [
            {"response": "good", "tier": "good"},
            {"response": "fine", "tier": "acceptable"},
            {"response": "bad", "tier": "harmful"},
        ],
    }
    rows, counts = unpaired_rows(tiers_to_pairs([record], ["good", "acceptable", "harmful"]), seed=0)
    labels = {r["completion"][0]["content"]: r["label"] for r in rows}
    assert labels == {"good": True, "bad": False} and counts == {"desirable": 1, "undesirable": 1, "mixed_left_out": 1}


def test_kto_refuses_data_with_only_one_label():
    from finetune.data.pairs import PreferencePair
    from finetune.errors import DataError
    from finetune.stages.preference import unpaired_rows

    prompt = [{"role": "user", "content": "q"}]
    pairs = [PreferencePair(prompt=prompt, chosen=a, rejected=b) for a, b in (("a", "b"), ("b", "c"), ("c", "b"))]
    with pytest.raises(
        DataError,
        match="KTO needs desirable and undesirable answers; the data gives 1 desirable and 0 "
        r"undesirable \(2 mixed, left out\)",
    ):
        unpaired_rows(pairs, seed=0)


def test_ratings_become_pairs_on_the_weighted_total_and_contradictions_drop():
    from finetune.data.pairs import PreferencePair, deduplicate, ratings_to_pairs
    from finetune.recipe import RewardDimension

    dims = [RewardDimension(name="accuracy"), RewardDimension(name="safety", weight=3)]
    records = [
        {"prompt": "q", "response": "a", "scores": {"accuracy": 5, "safety": 1}},
        {"prompt": "q", "response": "b", "scores": {"accuracy": 1, "safety": 3}},
    ]
    [pair] = ratings_to_pairs(records, dims, on="total")
    assert (pair.chosen, pair.rejected, pair.dimension) == ("b", "a", None)  # 2.5 beats 2.0 on the weighted total
    prompt = [{"role": "user", "content": "q"}]
    both = [
        PreferencePair(prompt=prompt, chosen="a", rejected="b", dimension="accuracy"),
        PreferencePair(prompt=prompt, chosen="b", rejected="a", dimension="safety"),
        PreferencePair(prompt=prompt, chosen="a", rejected="c"),
        PreferencePair(prompt=prompt, chosen="a", rejected="c"),
    ]
    kept, counts = deduplicate(both)
    assert [(p.chosen, p.rejected) for p in kept] == [("a", "c")]
    assert counts == {"duplicate_pairs": 1, "contradictory_pairs": 2}


# --- helpers ---------------------------------------------------------------------------------


def load_adapted(model_dir: Path, adapter: Path | None):
    """The base model with `adapter` on it (None: the base alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return (base if adapter is None else PeftModel.from_pretrained(base, str(adapter))).eval()


def completion_logps(model, batch) -> list[float]:
    """Summed log-probs of the completion tokens of a TRL preference batch (chosen rows, then rejected rows)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1).tolist()


def reference_logps(model, batch) -> list[float]:
    from trl.trainer.utils import use_adapter

    with use_adapter(model, adapter_name="ref"):
        return completion_logps(model, batch)


def margins(model_dir: Path, adapter: Path | None, pairs: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under base + adapter, through the chat template."""
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = []
    for p in pairs:
        prompt = [{"role": "user", "content": p["prompt"]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = {
            k: tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": p[k]}], tokenize=True, return_dict=False
            )[len(prompt_ids) :]
            for k in ("chosen", "rejected")
        }
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"]})
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    logps = completion_logps(load_adapted(model_dir, adapter), batch)
    return [c - r for c, r in zip(logps[: len(pairs)], logps[len(pairs) :], strict=True)]


def close(a: list[float], b: list[float], tolerance: float = 1e-3) -> bool:
    return all(abs(x - y) <= tolerance * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))
