"""Evaluating checkpoints on the same suites: what the `evaluate` stage and `wenmai eval` both call."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import ConfigError
from finetune.evaluation import alignment, bias, mc
from finetune.evaluation import targets as target_loading
from finetune.evaluation.results import CheckpointResult
from finetune.evaluation.suite import check_dimensions, load_suite
from finetune.evaluation.targets import Target
from finetune.recipe import EvaluateOptions

Log = Callable[[str], None]


OPTIONS = EvaluateOptions.model_fields  # the `evaluate` stage's options: their defaults and meanings are declared there


@dataclass
class EvalSpec:
    """What to measure on every checkpoint: the `evaluate` stage's options (`wenmai eval` takes the same)."""

    mc: Path | str | None = None
    shots: list[int] = field(default_factory=lambda: [OPTIONS["shots"].default])
    mc_limit: int | None = OPTIONS["mc_limit"].default
    mc_method: str = OPTIONS["mc_method"].default
    suite: Path | str | None = None
    suite_limit: int | None = OPTIONS["suite_limit"].default
    max_new_tokens: int | None = OPTIONS["max_new_tokens"].default
    reward_model: str | None = None  # a reward stage folder (or its reward_model output)
    batch_size: int = OPTIONS["batch_size"].default
    max_length: int = OPTIONS["max_length"].default

    @classmethod
    def from_options(cls, options: EvaluateOptions, reward_model: str | None = None) -> EvalSpec:
        """The spec of an `evaluate` stage; `reward_model` is the folder its `reward_model:` input resolved to."""
        return cls(
            mc=options.mc,
            shots=[options.shots],
            mc_limit=options.mc_limit,
            mc_method=options.mc_method,
            suite=options.suite,
            suite_limit=options.suite_limit,
            max_new_tokens=options.max_new_tokens,
            reward_model=reward_model,
            batch_size=options.batch_size,
            max_length=options.max_length,
        )


def evaluate_targets(targets: list[Target], spec: EvalSpec, log: Log = print) -> list[CheckpointResult]:
    """Load each checkpoint in turn (one in memory at a time), measure it, then score replies with the reward model."""

    subjects = {shots: mc.load_folder(spec.mc, shots, spec.mc_limit) for shots in spec.shots} if spec.mc else {}
    suite = load_suite(spec.suite, spec.suite_limit) if spec.suite else None
    results = []
    for target in targets:
        log(f"evaluating {target.label}")
        model, tokenizer = target_loading.load(target)
        result = CheckpointResult(label=target.label, source=target.source)
        for shots, subject_list in subjects.items():
            score = mc.evaluate(
                model,
                tokenizer,
                subject_list,
                shots,
                spec.mc_method,
                spec.batch_size,
                spec.max_length,
                label=target.label,
                name=mc_name(spec.mc, shots),
            )
            log(
                f"  {score.name}: {score.overall.accuracy}% [{score.overall.ci_low}, {score.overall.ci_high}] "
                f"on {score.overall.total} questions ({score.seconds} s)"
            )
            result.mc.append(score)
        if suite is not None:
            result.alignment = alignment.generate_replies(
                model, tokenizer, suite, spec.batch_size, spec.max_length, target.label, spec.max_new_tokens
            )
            if suite.suite.probes or suite.suite.bias:
                log(
                    f"  {suite.suite.name}: rule pass rate {result.alignment.rule_pass_rate} "
                    f"({result.alignment.seconds} s)"
                )
            if suite.has_implicit_bias():
                implicit = bias.measure(model, tokenizer, suite, spec.batch_size, spec.max_length)
                result.alignment.implicit = implicit
                for category in implicit.categories.values():
                    log(f"  bias {category.category}: effect {category.effect} ({implicit.seconds} s)")
        results.append(result)
        del model
        gc.collect()
    if suite is not None and spec.reward_model:
        scorer = alignment.load_scorer(spec.reward_model)
        problems = check_dimensions(suite, list(scorer.dimensions), declared_in=f"the reward model {spec.reward_model}")
        if problems:
            raise ConfigError(problems, f"suite {suite.path} names reward dimensions the reward model does not have")
        for result in results:
            alignment.add_scores(result.alignment, suite, scorer, spec.reward_model)
    return results


def mc_name(folder: Path, shots: int) -> str:
    """The name a multiple-choice result is filed under: the folder's name and the shot count."""
    return f"{Path(folder).name}-{shots}shot"
