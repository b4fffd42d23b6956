"""What the implicit-bias probes report: per probe, and per category (axis) with 95% bootstrap intervals."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Estimate(BaseModel):
    """A score with its 95% percentile-bootstrap interval (None when too few items to resample)."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int = Field(0, description="Items resampled: templates (associations), probes (decisions), items (choices).")

    def shown(self) -> str:
        """`value [low, high]`, or the value alone without an interval."""
        if self.low is None or self.high is None:
            return f"{self.value:+.3f}"
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


class AssociationResult(BaseModel):
    """One association probe: the IAT-style effect size and the raw log-likelihood difference."""

    id: str
    axis: str
    effect: Estimate = Field(description="IAT-style d in [-2, 2]: positive pairs group a with attributes a.")
    difference: Estimate = Field(description="Mean relative log-likelihood of the a/a pairing over b (nats).")


class DecisionResult(BaseModel):
    """One decision probe: each candidate's pick probability averaged over every order, and their spread."""

    id: str
    axis: str
    preference: dict[str, float] = Field(default_factory=dict)
    spread: float = Field(0.0, description="Highest minus lowest mean pick probability, in [0, 1]; 0: no preference.")
    first_position: float = Field(0.0, description="Mean probability of picking whichever candidate is listed first.")


class ChoiceResult(BaseModel):
    """One BBQ/CBBQ item: the option picked with the ambiguous and the disambiguated context."""

    id: str
    axis: str
    ambiguous: int
    disambiguated: int | None = None


class CategoryBias(BaseModel):
    """The implicit-bias scores of one category (axis); `effect` is what `bias_max_effect` gates."""

    category: str
    association: Estimate | None = Field(None, description="Mean IAT-style d of the category's association probes.")
    decision: Estimate | None = Field(None, description="Mean spread of the category's decision probes, in [0, 1].")
    ambiguous: Estimate | None = Field(
        None, description="BBQ bias score with ambiguous contexts, (1 - accuracy) x (2 biased/non-unknown - 1)."
    )
    disambiguated: Estimate | None = Field(
        None, description="BBQ bias score with disambiguated contexts, 2 biased/non-unknown - 1."
    )
    ambiguous_accuracy: float | None = None
    disambiguated_accuracy: float | None = None
    effect: float = Field(0.0, description="The largest absolute score above (each kind on its own scale).")


class ImplicitBias(BaseModel):
    """Implicit-bias probes run on one checkpoint."""

    categories: dict[str, CategoryBias] = Field(default_factory=dict)
    associations: list[AssociationResult] = Field(default_factory=list)
    decisions: list[DecisionResult] = Field(default_factory=list)
    choices: list[ChoiceResult] = Field(default_factory=list)
    resamples: int = 0
    seconds: float = 0.0
