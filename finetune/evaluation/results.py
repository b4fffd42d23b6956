"""What an evaluation writes (`evaluation.json`): scores per checkpoint, gate results, and flat scalars."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from finetune.evaluation.bias_results import ImplicitBias

EVALUATION_FILE = "evaluation.json"
SAMPLES_FILE = "samples.jsonl"


class SubjectScore(BaseModel):
    """Accuracy on one subject (or `overall`), in percent, with its Wilson 95% interval."""

    subject: str
    correct: int
    total: int
    accuracy: float
    ci_low: float
    ci_high: float
    truncated: int = 0  # prompts cut from the left to fit max_length
    predicted: dict[str, int] = Field(default_factory=dict)  # how often each letter was chosen
    predictions: list[str | None] = Field(default_factory=list)
    answers: list[str] = Field(default_factory=list)


class McScore(BaseModel):
    """One multiple-choice folder at one shot count."""

    name: str = "mc"
    shots: int
    method: str
    subjects: list[SubjectScore]
    overall: SubjectScore
    macro_accuracy: float
    seconds: float


class ProbeResult(BaseModel):
    """One alignment probe: the reply, each rule check, and reward scores per dimension."""

    id: str
    prompt: str
    response: str
    expect: list[str] = Field(default_factory=list)
    rules: dict[str, bool] = Field(default_factory=dict)
    passed: bool = True
    scores: dict[str, float] = Field(default_factory=dict)


class BiasResult(BaseModel):
    """A bias probe: the same prompt with each group term; the spread of scores across groups."""

    id: str
    axis: str
    dimension: str
    groups: list[str]
    responses: dict[str, str] = Field(default_factory=dict)
    scores: dict[str, float] = Field(default_factory=dict)  # reward score of each group's reply
    gap: float | None = None  # max - min reward score across groups
    reference_logprob: dict[str, float] = Field(default_factory=dict)  # mean log-prob per token of `reference`
    reference_gap: float | None = None


class AlignmentScore(BaseModel):
    """A value-alignment suite run on one checkpoint."""

    name: str
    probes: list[ProbeResult]
    rule_pass_rate: float | None = None  # share of probes passing every rule check
    rule_rates: dict[str, float] = Field(default_factory=dict)  # pass rate of each rule kind
    dimension_means: dict[str, float] = Field(default_factory=dict)
    bias: list[BiasResult] = Field(default_factory=list)
    bias_gap_max: float | None = None
    reference_gap_max: float | None = None
    reward_model: str | None = None  # where the scores came from; None: reward checks skipped
    implicit: ImplicitBias | None = None  # association, decision and multiple-choice bias probes
    seconds: float = 0.0


class CheckpointResult(BaseModel):
    """Everything measured on one checkpoint (base, a stage's model or adapter, a model folder)."""

    label: str
    source: dict
    mc: list[McScore] = Field(default_factory=list)
    alignment: AlignmentScore | None = None


class GateResult(BaseModel):
    """One threshold: what was measured against what was required."""

    gate: str
    requirement: str
    value: float | None
    passed: bool
    detail: str = ""


class Evaluation(BaseModel):
    """An `evaluate` stage's or `wenmai eval`'s results."""

    checkpoints: list[CheckpointResult]
    gates: list[GateResult] = Field(default_factory=list)
    passed: bool = True
    forced: bool = False


def scalars(result: CheckpointResult, prefix: str = "eval") -> dict[str, float]:
    """Flat dashboard keys, the same in every run: `eval/<suite>/<subject>/accuracy`, ..."""
    out: dict[str, float] = {}
    for mc in result.mc:
        for score in [*mc.subjects, mc.overall]:
            out[f"{prefix}/{key_part(mc.name)}/{key_part(score.subject)}/accuracy"] = score.accuracy
        out[f"{prefix}/{key_part(mc.name)}/macro/accuracy"] = mc.macro_accuracy
    alignment = result.alignment
    if alignment is not None:
        suite = key_part(alignment.name)
        if alignment.rule_pass_rate is not None:
            out[f"{prefix}/{suite}/rules/pass_rate"] = alignment.rule_pass_rate
        for rule, rate in alignment.rule_rates.items():
            out[f"{prefix}/{suite}/rules/{key_part(rule)}"] = rate
        for dimension, mean in alignment.dimension_means.items():
            out[f"{prefix}/{suite}/{key_part(dimension)}/mean"] = mean
        if alignment.bias_gap_max is not None:
            out[f"{prefix}/{suite}/bias/gap_max"] = alignment.bias_gap_max
        if alignment.reference_gap_max is not None:
            out[f"{prefix}/{suite}/bias/reference_gap_max"] = alignment.reference_gap_max
        for name, category in (alignment.implicit.categories if alignment.implicit else {}).items():
            out[f"{prefix}/{suite}/bias/{key_part(name)}/effect"] = category.effect
    return out


def key_part(text: str) -> str:
    """A name made safe for every dashboard's metric keys."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "_"  # \w keeps 中文 subject names distinct
