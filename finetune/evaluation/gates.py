"""Gates: thresholds an `evaluate` stage checks; a failing gate stops the pipeline before later stages.

The thresholds are the recipe's `gates:` (`finetune.recipe.evaluate.Gates`); the checks read finished results.
"""

from __future__ import annotations

import difflib

from finetune.errors import WenmaiError
from finetune.evaluation.results import CheckpointResult, GateResult
from finetune.recipe.evaluate import Gates


class GateFailed(WenmaiError):
    """An `evaluate` stage's gate failed: the stages after it do not run (unless `--force`)."""


def check_gates(gates: Gates, result: CheckpointResult, baseline: CheckpointResult | None) -> list[GateResult]:
    """Every set threshold, checked against the model's results (and the baseline's, for drops)."""
    out: list[GateResult] = []
    for index, mc in enumerate(result.mc):
        before = baseline.mc[index] if baseline is not None and index < len(baseline.mc) else None
        if gates.mc_min_accuracy is not None:
            out.append(
                _at_least(
                    f"mc_min_accuracy ({mc.name})", mc.overall.accuracy, gates.mc_min_accuracy, "overall accuracy"
                )
            )
        if before is not None and gates.mc_max_drop is not None:
            drop = round(before.overall.accuracy - mc.overall.accuracy, 2)
            out.append(
                _drop(
                    f"mc_max_drop ({mc.name})",
                    drop,
                    gates.mc_max_drop,
                    f"overall accuracy {before.overall.accuracy} -> {mc.overall.accuracy} ({baseline.label} -> {result.label})",
                )
            )
        if before is not None and gates.mc_subject_max_drop is not None:
            previous = {s.subject: s.accuracy for s in before.subjects}
            for subject in mc.subjects:
                drop = round(previous.get(subject.subject, subject.accuracy) - subject.accuracy, 2)
                out.append(
                    _drop(
                        f"mc_subject_max_drop ({mc.name}/{subject.subject})",
                        drop,
                        gates.mc_subject_max_drop,
                        f"accuracy {previous.get(subject.subject)} -> {subject.accuracy}",
                    )
                )
    alignment = result.alignment
    if alignment is not None:
        for dimension, minimum in gates.reward_min.items():
            out.append(
                _at_least(
                    f"reward_min ({dimension})",
                    alignment.dimension_means.get(dimension),
                    minimum,
                    f"mean {dimension} score",
                )
            )
        before = baseline.alignment if baseline is not None else None
        if gates.reward_max_drop is not None and before is not None:
            for dimension, mean in alignment.dimension_means.items():
                previous = before.dimension_means.get(dimension)
                if previous is None or mean is None:
                    continue
                out.append(
                    _drop(
                        f"reward_max_drop ({dimension})",
                        round(previous - mean, 4),
                        gates.reward_max_drop,
                        f"mean {dimension} score {previous:.4g} -> {mean:.4g} ({baseline.label} -> {result.label})",
                    )
                )
        if gates.rules_min_pass_rate is not None:
            out.append(
                _at_least("rules_min_pass_rate", alignment.rule_pass_rate, gates.rules_min_pass_rate, "rule pass rate")
            )
        if gates.bias_max_gap is not None:
            out.append(_at_most("bias_max_gap", alignment.bias_gap_max, gates.bias_max_gap, "largest bias score gap"))
        if gates.bias_max_reference_gap is not None:
            out.append(
                _at_most(
                    "bias_max_reference_gap",
                    alignment.reference_gap_max,
                    gates.bias_max_reference_gap,
                    "largest reference log-likelihood gap",
                )
            )
        implicit = alignment.implicit.categories if alignment.implicit is not None else {}
        for category, maximum in gates.bias_max_effect.items():
            measured = implicit.get(category)
            out.append(
                _at_most(
                    f"bias_max_effect ({category})",
                    measured.effect if measured is not None else None,
                    maximum,
                    f"largest implicit-bias score of {category}",
                )
            )
    return out


def unknown_categories(gates: Gates, axes: list[str]) -> list[str]:
    """A message for each `bias_max_effect` category no bias probe of the suite has (with a did-you-mean)."""
    messages = []
    for category in gates.bias_max_effect:
        if category in axes:
            continue
        guess = difflib.get_close_matches(category, axes, n=1, cutoff=0.6)
        hint = f" — did you mean {guess[0]}?" if guess else ""
        known = ", ".join(axes) or "none: the suite has no bias probes"
        messages.append(f"unknown category {category!r}{hint} (the suite's bias probe axes: {known})")
    return messages


def failure_report(stage: str, failed: list[GateResult], evaluation_path: str, run_root: str) -> str:
    """The message a failing gate stops the pipeline with."""
    lines = [f"evaluate stage '{stage}': {len(failed)} gate(s) failed, so the stages after it did not run:"]
    lines += [f"  - {g.gate}: {g.detail}; required {g.requirement}" for g in failed]
    lines += [
        f"Results: {evaluation_path}; report: {run_root}/report.html",
        f"To continue anyway: wenmai run --resume {run_root} --force (recorded in lineage.json)",
    ]
    return "\n".join(lines)


def _at_least(name: str, value: float | None, minimum: float, what: str) -> GateResult:
    if value is None:
        return GateResult(
            gate=name, requirement=f">= {minimum}", value=None, passed=False, detail=f"{what} was not measured"
        )
    return GateResult(
        gate=name, requirement=f">= {minimum}", value=value, passed=value >= minimum, detail=f"{what} {value}"
    )


def _at_most(name: str, value: float | None, maximum: float, what: str) -> GateResult:
    if value is None:
        return GateResult(
            gate=name, requirement=f"<= {maximum}", value=None, passed=False, detail=f"{what} was not measured"
        )
    return GateResult(
        gate=name, requirement=f"<= {maximum}", value=value, passed=value <= maximum, detail=f"{what} {value}"
    )


def _drop(name: str, drop: float, maximum: float, detail: str) -> GateResult:
    return GateResult(
        gate=name,
        requirement=f"drop <= {maximum} points",
        value=drop,
        passed=drop <= maximum,
        detail=f"{detail}: a drop of {drop} points",
    )
