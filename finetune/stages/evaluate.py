"""Stage `evaluate`: multiple-choice knowledge tests and the value-alignment suite on a model, with gates.

Writes `evaluation.json` (every checkpoint's scores, the gates) and a metrics.jsonl row of flat
`eval/...` scalars, which also go to the recipe's dashboards. A failing gate raises `GateFailed` after
the results are written, so the stages after it do not run; `wenmai run --force` records the failure
in the summary and lineage and goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from finetune.evaluation.gates import Gates
from finetune.stages.base import StageConfig, StageContext, StageResult, input_field

if TYPE_CHECKING:
    from finetune.recipe import Recipe

MODEL_KINDS = ["model", "adapter"]


class Config(StageConfig):
    """Evaluate a model: multiple-choice tests (CMMLU-style CSV folders) and a value-alignment suite; gate the stages after it."""

    kind: ClassVar[str] = "evaluate"
    produces: ClassVar[tuple[str, ...]] = ()
    optional_inputs: ClassVar[tuple[str, ...]] = ("model", "reward_model")

    model: str | None = input_field(
        MODEL_KINDS, "Stage whose model or adapter is evaluated, or `base` (default: the latest earlier stage with one, else base).",
        special=("base",))
    baseline: str = input_field(
        MODEL_KINDS, "What the model is compared with (accuracy drops, before/after samples): `base`, an earlier stage, or `none`.",
        special=("base", "none"), default="base")
    mc: str | None = Field(None, description="Multiple-choice folder: test/<subject>.csv and optional dev/<subject>.csv "
                                             "(header ,Question,A,B,C,D,Answer).", json_schema_extra={"is_path": True})
    shots: int = Field(0, ge=0, le=10, description="Few-shot examples per question, taken from dev/ (0: zero-shot).")
    mc_limit: int | None = Field(None, gt=0, description="Use only the first N questions of each subject (a stated subsample).")
    mc_method: Literal["loglik", "generate"] = Field(
        "loglik", description="loglik: the answer letter with the highest log-likelihood; generate: the first letter of a greedy reply.")
    suite: str | None = Field(None, description="Value-alignment suite (YAML or JSONL of probes).", json_schema_extra={"is_path": True})
    suite_limit: int | None = Field(None, gt=0, description="Use only the first N probes of the suite (bias probes are kept).")
    max_new_tokens: int | None = Field(None, gt=0, description="Reply length bound for the suite (default: the suite's `max_new_tokens`).")
    reward_model: str | None = input_field("reward_model", "Reward stage that scores the suite's replies per dimension "
                                                           "(default: the latest earlier one; none: reward checks are skipped).")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    max_length: int = Field(2048, ge=16, description="Longest prompt in tokens; longer ones lose their earliest tokens (counted).")
    gates: Gates = Field(default_factory=Gates, description="Thresholds; a failing one stops the pipeline (wenmai run --force overrides).")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.mc and not self.suite:
            problems.append(("mc", "an evaluate stage needs `mc:` (a multiple-choice folder), `suite:` (an alignment suite), or both"))
        if self.gates.needs_mc() and not self.mc:
            problems.append(("gates", "multiple-choice gates (mc_*) need `mc:`"))
        if self.gates.needs_baseline() and self.baseline == "none":
            problems.append(("baseline", "mc_max_drop / mc_subject_max_drop compare with a baseline; set `baseline:` to base or a stage"))
        if self.gates.needs_suite() and not self.suite:
            problems.append(("gates", "suite gates (reward_min, rules_min_pass_rate, bias_*) need `suite:`"))
        return problems

    def check_in_recipe(self, recipe: Recipe) -> list[tuple[str, str]]:
        """The files it reads, and reward dimensions against the recipe's reward section and wiring."""
        from finetune.errors import ConfigError
        from finetune.evaluation.mc import check_folder
        from finetune.evaluation.suite import TOTAL, check_dimensions, load_suite, uses_reward

        problems = [("mc", p) for p in check_folder(self.mc, self.shots)] if self.mc else []
        loaded = None
        if self.suite:
            try:
                loaded = load_suite(self.suite, self.suite_limit)
            except ConfigError as err:
                problems += [("suite", str(p)) for p in err.problems]
        dimensions = recipe_dimensions(recipe)
        if loaded is not None and dimensions is not None:
            problems += [("suite", str(p)) for p in check_dimensions(loaded, dimensions)]
        if dimensions is not None:
            unknown = [d for d in self.gates.reward_min if d not in [*dimensions, TOTAL]]
            problems += [("gates.reward_min", f"unknown reward dimension {d!r} (declared: {', '.join([*dimensions, TOTAL])})") for d in unknown]
        needs_reward = self.gates.needs_reward() or (loaded is not None and uses_reward(loaded))
        if needs_reward and not self.reward_model and not _earlier_reward_stage(recipe, self):
            problems.append(("reward_model", "the suite or the gates use reward scores, but no earlier stage produces a reward_model; "
                                             "add a reward stage before this one, or drop the reward dimensions"))
        return problems


def run(ctx: StageContext) -> StageResult:
    """Evaluate the model (and the baseline), write the results, and stop the pipeline if a gate fails."""
    from finetune.evaluation import dashboards, runner
    from finetune.evaluation.gates import GateFailed, check_gates, failure_report
    from finetune.evaluation.results import EVALUATION_FILE, Evaluation, key_part, scalars
    from finetune.run_dir import atomic_write_text
    from finetune.tracking import append_metrics

    config: Config = ctx.config
    recipe = ctx.recipe
    wired = ctx.input_stages
    targets = [_target(ctx, wired.get("model"))]
    if config.baseline != "none" and wired.get("baseline") != wired.get("model"):
        targets.append(_target(ctx, wired.get("baseline")))
    spec = runner.EvalSpec(
        mc=config.mc, shots=[config.shots], mc_limit=config.mc_limit, mc_method=config.mc_method,
        suite=config.suite, suite_limit=config.suite_limit, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, max_length=config.max_length,
        reward_model=ctx.inputs.get("reward_model", {}).get("reward_model"),
    )
    results = runner.evaluate_targets(targets, spec, log=lambda message: print(f"[{config.stage_name}] {message}", flush=True))
    gates = check_gates(config.gates, results[0], results[1] if len(results) > 1 else None)
    failed = [g for g in gates if not g.passed]
    forced = bool(failed) and bool(ctx.extra.get("force"))
    evaluation = Evaluation(checkpoints=results, gates=gates, passed=not failed, forced=forced)
    evaluation_path = ctx.stage_dir / EVALUATION_FILE
    atomic_write_text(evaluation_path, evaluation.model_dump_json(indent=2))

    figures = scalars(results[0])
    if len(results) > 1:
        figures.update(scalars(results[1], prefix="baseline"))
    figures.update({f"gates/{key_part(g.gate)}": float(g.passed) for g in gates})
    append_metrics(ctx.run_dir.metrics_path(config.stage_name), {"stage": config.stage_name, "step": 0, **figures})
    dashboards.log_evaluation(recipe.tracking, ctx.run_dir.root, config.stage_name, recipe.tracking.run_name or ctx.run_dir.name,
                              figures, dashboards.tables(evaluation))
    if failed and not forced:
        raise GateFailed(failure_report(config.stage_name, failed, str(evaluation_path), str(ctx.run_dir.root)))
    summary = headline(evaluation)
    if gates:
        summary["gate"] = {"passed": not failed, "forced": forced, "failed": [g.gate for g in failed]}
    return StageResult(outputs={"evaluation": EVALUATION_FILE, "metrics": "metrics.jsonl"}, summary=summary)


def headline(evaluation) -> dict:
    """The model's overall figures, for the run summary table."""
    model = evaluation.checkpoints[0]
    figures: dict = {"evaluated": model.label}
    for mc in model.mc:
        figures[f"{mc.name}_accuracy"] = mc.overall.accuracy
    if model.alignment is not None:
        figures["rule_pass_rate"] = model.alignment.rule_pass_rate
        figures.update({f"{d}_mean": v for d, v in model.alignment.dimension_means.items()})
    return figures


def recipe_dimensions(recipe: Recipe) -> list[str] | None:
    """Reward dimension names declared in the recipe's `reward:` section, or None when it has none."""
    section = getattr(recipe, "reward", None)
    dimensions = getattr(section, "dimensions", None) if section is not None else None
    if dimensions is None:
        return None
    return [getattr(d, "name", d) for d in dimensions]


def _earlier_reward_stage(recipe: Recipe, config: Config) -> bool:
    configs = recipe.stage_configs()
    earlier = configs[: next((i for i, c in enumerate(configs) if c.stage_name == config.stage_name), len(configs))]
    return any("reward_model" in c.produces for c in earlier)


def _target(ctx: StageContext, stage: str | None):
    from finetune.evaluation.targets import base_target, stage_target

    if stage is None:  # `base`, or no earlier stage with a model
        return base_target(ctx.recipe, label="base")
    return stage_target(ctx.run_dir, ctx.recipe, stage, label=stage)
