"""Stage `rlhf`: online RL of the policy adapter with TRL's GRPOTrainer against the trained reward model.

Prompts come from a dataset; the policy (the adapter named by `policy:`) samples `num_generations` answers
per prompt; each dimension of the reward model of the stage named by `reward_model:` is one reward
function (weighted as the recipe says), and rule rewards (length, format, banned terms; `reward.rules`)
can be added. The KL to the reference (the policy's starting adapter, frozen) is weighted by `beta`.
Saves one complete adapter, like `dpo`. The options are `finetune.recipe.RlhfOptions`.

TRL's GRPOTrainer reads a model reward at `logits[:, 0]` and cannot take an unmerged PeftModel as a reward
model, so each dimension of the trained reward model is a plain reward function instead, named after its
dimension (TRL logs `rewards/<dimension>/mean`). The functions share one `RewardScorer`: the first of them
scores a batch of answers on every dimension at once, the others read their column. Generation on CPU is
transformers' `generate` (no vLLM).
"""

from __future__ import annotations

import sys
from typing import Any

from finetune.adapters import drop_fresh_reference, load_policy, save_policy
from finetune.data import load_records
from finetune.data.chat import render, to_messages
from finetune.data.preference import prompt_key, prompt_messages
from finetune.errors import DataError, WenmaiError
from finetune.recipe import Recipe, RlhfOptions
from finetune.run_dir import StageContext, StageResult
from finetune.tracking import jsonl_callback
from finetune.training import build_training_args, fit
from reward.rules import completion_text, read_banned_terms, rule_functions
from reward.score import RewardScorer


def run(ctx: StageContext) -> StageResult:
    """Sample, score, update; save the adapter; summarise rewards per dimension, KL and answer length."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config, recipe = ctx.config, ctx.recipe
    policy = load_policy(
        recipe,
        ctx.run_dir,
        ctx.input_stages.get("policy"),
        ctx.inputs.get("policy"),
        config.seed,
        f"stage {config.stage_name}",
    )
    prompts, prompt_stats = load_prompts(ctx, policy.tokenizer)
    rewards = build_rewards(ctx, device=next(policy.model.parameters()).device)
    args = build_training_args(
        GRPOConfig,
        config,
        recipe,
        ctx.stage_dir,
        ctx.run_dir.name,
        has_eval=False,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        beta=config.beta,
        temperature=config.temperature,
        scale_rewards=config.scale_rewards,
        reward_weights=rewards.weights,
        disable_dropout=True,  # the same answer must get the same log-prob from policy and reference
    )
    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=rewards.functions,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=policy.tokenizer,
        callbacks=[jsonl_callback(ctx.metrics_path, config.stage_name)],
    )
    drop_fresh_reference(trainer, policy)
    result = fit(trainer, ctx.resume_from)
    outputs = save_policy(trainer, ctx.stage_dir, policy)
    summary = summarise(trainer.state.log_history, result.metrics, rewards.names, trainer.state.global_step)
    summary.update(
        prompts=prompt_stats,
        reward_functions=dict(zip(rewards.names, rewards.weights, strict=True)),
        used={"policy": policy.source, "reward_model": rewards.source},
    )
    warning = no_spread_warning(trainer.state.log_history)
    if warning is not None:  # the stage still finishes: a warning in its summary (and report), not an error
        summary["warnings"] = [warning]
        if trainer.is_world_process_zero():
            print(f"{config.stage_name}: warning: {warning}", file=sys.stderr, flush=True)
    return StageResult(outputs=outputs, summary=summary)


class Rewards:
    """The reward functions for GRPOTrainer, their weights (`reward_weights`), names, and the reward model used."""

    def __init__(self) -> None:
        self.functions: list[Any] = []
        self.weights: list[float] = []
        self.source: dict | None = None

    @property
    def names(self) -> list[str]:
        return [f.__name__ for f in self.functions]

    def add(self, function: Any, weight: float) -> None:
        self.functions.append(function)
        self.weights.append(float(weight))


def build_rewards(ctx: StageContext, device: Any = None) -> Rewards:
    """A reward function per dimension of the wired reward model (weights normalised to sum 1), then the rules."""
    config = ctx.config
    rewards = Rewards()
    folder = ctx.inputs.get("reward_model", {}).get("reward_model")
    if folder is not None:
        scorer = RewardScorer.from_stage(folder)
        if device is not None:
            scorer.model.to(device)
        weights = dimension_weights(config, scorer.card, folder)
        shared = SharedScores(scorer)
        for name, weight in weights.items():
            rewards.add(DimensionReward(shared, name), weight)
        rewards.source = {
            "stage": ctx.input_stages.get("reward_model"),
            "reward_model": ctx.run_dir.relative(folder),
            "dimensions": scorer.dimensions,
        }
    for function, weight in rule_functions(config.rules):
        rewards.add(function, weight)
    if not rewards.functions:
        raise WenmaiError(
            f"stage {config.stage_name!r}: nothing rewards the answers; name a reward stage in reward_model or set rules"
        )
    return rewards


def dimension_weights(config: Any, card: Any, folder: str) -> dict[str, float]:
    """Each reward-model dimension's weight, normalised to sum 1: the stage's `weights`, else the trained ones."""
    dimensions = card.names
    if config.weights is None:
        given = {d.name: d.weight for d in card.dimensions}
    else:
        unknown = [name for name in config.weights if name not in dimensions]
        if unknown:
            raise WenmaiError(
                f"stages.{config.stage_name}.weights: the reward model in {folder} has no dimension "
                f"{', '.join(repr(n) for n in unknown)}; its dimensions are {', '.join(dimensions)}"
            )
        given = {name: config.weights.get(name, 0.0) for name in dimensions}
    total = sum(given.values())
    if total <= 0:
        raise WenmaiError(
            f"stages.{config.stage_name}.weights: every dimension weighs 0; give at least one a weight above 0"
        )
    return {name: weight / total for name, weight in given.items()}


class SharedScores:
    """Scores every dimension of a batch of answers once; each dimension's reward function reads its column."""

    def __init__(self, scorer: Any):
        self.scorer = scorer
        self._key: tuple | None = None
        self._scores: dict[str, list[float]] = {}

    def get(self, prompts: list, completions: list) -> dict[str, list[float]]:
        texts = [completion_text(c) for c in completions]
        key = (repr(prompts), tuple(texts))
        if key != self._key:
            prompt_messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
            self._scores = self.scorer.score(prompt_messages, texts)
            self._key = key
        return self._scores


class DimensionReward:
    """One reward-model dimension as a GRPO reward function; its `__name__` is the dimension (TRL's metric name)."""

    def __init__(self, shared: SharedScores, dimension: str):
        self.shared = shared
        self.dimension = dimension
        self.__name__ = dimension

    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        return self.shared.get(prompts, completions)[self.dimension]


def load_prompts(ctx: StageContext, tokenizer: Any) -> tuple[list[list[dict]], dict[str, int]]:
    """Distinct prompt conversations from the stage's dataset, without those longer than `max_prompt_length`."""
    config, recipe = ctx.config, ctx.recipe
    section = recipe.data[config.dataset]
    records = load_records(recipe, config.dataset, ctx.stage_dir).records
    prompts: dict[str, list[dict]] = {}
    for record in records:
        if section.record_format in ("chat", "instruction"):
            messages = to_messages(record, section.record_format, section.system_prompt)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages = messages[:last]
        else:
            messages = prompt_messages(record["prompt"])
        if messages and messages[-1]["role"] == "user":
            prompts.setdefault(prompt_key(messages), messages)
    kept, too_long = [], 0
    for messages in prompts.values():
        length = len(
            tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        )
        if length > config.max_prompt_length:
            too_long += 1
        else:
            kept.append(messages)
    if not kept:
        raise DataError(
            f"dataset {config.dataset!r}: no prompt fits max_prompt_length ({config.max_prompt_length} tokens; "
            f"{too_long} longer ones left out)"
        )
    return kept, {"records": len(records), "prompts": len(kept), "too_long_left_out": too_long}


def no_spread_warning(history: list[dict]) -> str | None:
    """A warning when in most logged steps every prompt's answers got the same reward, so GRPO learned nothing from them.

    TRL logs `frac_reward_zero_std`, the share of prompts whose group of answers got identical rewards; at 1 every
    advantage is 0 and the step leaves the policy as it was (bar the KL term).
    """
    fractions = [row["frac_reward_zero_std"] for row in history if "frac_reward_zero_std" in row]
    flat = sum(1 for fraction in fractions if fraction >= 1)
    if flat * 2 <= len(fractions):
        return None
    return (
        f"in {flat} of {len(fractions)} logged steps every group of answers to a prompt got the same reward, so the "
        "policy did not change in those steps; make the answers in a group differ (raise num_generations or "
        "temperature) or the rewards separate them (check that the rules match some answers and not others, and "
        "that the reward model scores answers differently)"
    )


def summarise(history: list[dict], train_metrics: dict, names: list[str], steps: int) -> dict[str, Any]:
    """Per reward function the mean reward at the first and last logged step, the weighted reward, KL, answer length."""
    rows = [row for row in history if "reward" in row]
    summary: dict[str, Any] = {"steps": steps}
    if rows:
        first, last = rows[0], rows[-1]
        summary["reward_first"] = {
            n: round(first[f"rewards/{n}/mean"], 4) for n in names if f"rewards/{n}/mean" in first
        }
        summary["reward_last"] = {n: round(last[f"rewards/{n}/mean"], 4) for n in names if f"rewards/{n}/mean" in last}
        summary.update(weighted_reward_first=round(first["reward"], 4), weighted_reward_last=round(last["reward"], 4))
        if "kl" in last:
            summary["kl_last"] = round(last["kl"], 5)
        if "completions/mean_length" in last:
            summary["completion_length_last"] = round(last["completions/mean_length"], 1)
    summary.update(train_runtime_s=round(train_metrics.get("train_runtime", 0.0), 2))
    return summary


# --- checks ----------------------------------------------------------------------------------


def check(options: RlhfOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """The banned-term file reads and lists terms."""
    if options.rules.banned_terms is None:
        return []
    try:
        read_banned_terms(options.rules.banned_terms.path)
    except WenmaiError as err:
        return [("rules.banned_terms.path", str(err).removeprefix("banned terms: "))]
    return []


def machine_problems(options: RlhfOptions) -> list[str]:
    """Nothing: generation runs on CPU too (transformers' `generate`)."""
    return []
