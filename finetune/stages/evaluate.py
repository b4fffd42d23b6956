"""Stage `evaluate`: multiple-choice knowledge tests and the value-alignment suite on a model, with gates.

Writes `evaluation.json` (every checkpoint's scores, the gates) and a metrics.jsonl row of flat
`eval/...` scalars, which also go to the recipe's dashboards. A failing gate raises `GateFailed` after
the results are written, so the stages after it do not run; `wenmai run --force` records the failure
in the summary and lineage and goes on. The options are `finetune.recipe.EvaluateOptions`.
"""

from __future__ import annotations

from finetune.errors import ConfigError, WenmaiError
from finetune.evaluation import dashboards, runner
from finetune.evaluation.gates import GateFailed, check_gates, failure_report, unknown_categories
from finetune.evaluation.mc import check_folder
from finetune.evaluation.results import EVALUATION_FILE, Evaluation, key_part, scalars
from finetune.evaluation.suite import TOTAL, check_dimensions, load_suite, uses_reward
from finetune.evaluation.targets import Target, base_target, stage_target
from finetune.recipe import EvaluateOptions, Recipe
from finetune.recipe.secrets import public_run_name
from finetune.run_dir import METRICS_FILE, StageContext, StageResult, atomic_write_text
from finetune.tracking import append_metrics
from reward.model import find_reward_model


def run(ctx: StageContext) -> StageResult:
    """Evaluate the model (and the baseline), write the results, and stop the pipeline if a gate fails."""
    config: EvaluateOptions = ctx.config
    recipe = ctx.recipe
    wired = ctx.input_stages
    targets = [_target(ctx, wired.get("model"))]
    if config.baseline != "none" and wired.get("baseline") != wired.get("model"):
        targets.append(_target(ctx, wired.get("baseline")))
    judge = str(find_reward_model(config.judge)) if config.judge else None
    spec = runner.EvalSpec.from_options(
        config, reward_model=judge or ctx.inputs.get("reward_model", {}).get("reward_model")
    )
    results = runner.evaluate_targets(
        targets, spec, log=lambda message: print(f"[{config.stage_name}] {message}", flush=True)
    )
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
    append_metrics(ctx.metrics_path, {"stage": config.stage_name, "step": 0, **figures})
    dashboards.log_evaluation(
        recipe.tracking,
        ctx.run_dir.root,
        config.stage_name,
        public_run_name(recipe, ctx.run_dir.name),
        figures,
        dashboards.tables(evaluation),
    )
    if failed and not forced:
        raise GateFailed(failure_report(config.stage_name, failed, str(evaluation_path), str(ctx.run_dir.root)))
    summary = headline(evaluation)
    if gates:
        summary["gate"] = {"passed": not failed, "forced": forced, "failed": [g.gate for g in failed]}
    return StageResult(outputs={"evaluation": EVALUATION_FILE, "metrics": METRICS_FILE}, summary=summary)


def check(options: EvaluateOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """The files it reads, and reward dimensions against the recipe's reward section and wiring."""
    problems = [("mc", p) for p in check_folder(options.mc, options.shots)] if options.mc else []
    loaded = None
    if options.suite:
        try:
            loaded = load_suite(options.suite, options.suite_limit)
        except ConfigError as err:
            problems += [("suite", str(p)) for p in err.problems]
    if loaded is not None:
        problems += [("gates.bias_max_effect", message) for message in unknown_categories(options.gates, loaded.axes())]
    dimensions = recipe_dimensions(recipe)
    if loaded is not None and dimensions is not None:
        problems += [("suite", str(p)) for p in check_dimensions(loaded, dimensions)]
    if dimensions is not None:
        unknown = [d for d in options.gates.reward_min if d not in [*dimensions, TOTAL]]
        problems += [
            ("gates.reward_min", f"unknown reward dimension {d!r} (declared: {', '.join([*dimensions, TOTAL])})")
            for d in unknown
        ]
    if options.judge:
        try:
            find_reward_model(options.judge)
        except WenmaiError as err:
            problems.append(("judge", str(err)))
    needs_reward = options.gates.needs_reward() or (loaded is not None and uses_reward(loaded))
    if needs_reward and not options.judge and not options.reward_model and not _earlier_reward_stage(recipe, options):
        problems.append(
            (
                "reward_model",
                "the suite or the gates use reward scores, but no earlier stage produces a reward_model; "
                "add a reward stage before this one, or drop the reward dimensions",
            )
        )
    return problems


def machine_problems(options: EvaluateOptions) -> list[str]:
    """Nothing: evaluation runs wherever the model loads."""
    return []


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
    return [d.name for d in recipe.reward.dimensions] if recipe.reward is not None else None


def _earlier_reward_stage(recipe: Recipe, config: EvaluateOptions) -> bool:
    configs = recipe.stage_configs()
    earlier = configs[: next((i for i, c in enumerate(configs) if c.stage_name == config.stage_name), len(configs))]
    return any("reward_model" in c.produces for c in earlier)


def _target(ctx: StageContext, stage: str | None) -> Target:
    if stage is None:  # `base`, or no earlier stage with a model
        return base_target(ctx.recipe, label="base")
    return stage_target(ctx.run_dir, ctx.recipe, stage, label=stage)
