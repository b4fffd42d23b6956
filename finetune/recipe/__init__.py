"""The recipe schema: every section and every stage kind's options, the kind -> options registry, and the
checks that need no files or machine. Imports pydantic and `finetune.errors` only, so `wenmai validate`
and `wenmai stages` start without torch.

- `sections`: model, lora, data, reward, tracking, output, distributed; `data_policy`, `licences`: data rights
- `options`: the stage interface (`StageOptions`), the shared `TrainingOptions` and `SpeedOptions`
- `sft`, `reward`, `preference` (dpo, kto, orpo), `rlhf`, `debias`, `evaluate`, `merge` (merge, export): each kind's
  options; `augment`: the `data.augment` section
- `schema`: `Recipe`, `StageEntry` and `OPTIONS`; `checks`: wiring and the cross-section checks
"""

from finetune.recipe.augment import AugmentSection
from finetune.recipe.checks import (
    check_dimension_names,
    problems,
    stage_datasets,
    stage_dimension_problems,
    used_datasets,
    wiring,
)
from finetune.recipe.debias import DebiasOptions
from finetune.recipe.evaluate import EvaluateOptions, Gates
from finetune.recipe.federated import DifferentialPrivacy, FederatedClient, FederatedSection
from finetune.recipe.merge import ExportOptions, MergeOptions, Tolerance
from finetune.recipe.options import SpeedOptions, StageOptions, TrainingOptions
from finetune.recipe.preference import DpoOptions, KtoOptions, OrpoOptions, PreferenceOptions
from finetune.recipe.reward import RewardOptions
from finetune.recipe.rlhf import RlhfOptions, RuleRewards
from finetune.recipe.schema import OPTIONS, Recipe, StageEntry
from finetune.recipe.sections import (
    DATA_FORMATS,
    DEFAULT_DIMENSION,
    DataSection,
    DatasetSection,
    DistributedSection,
    LoraSection,
    ModelSection,
    OutputSection,
    RewardDimension,
    RewardSection,
    TrackingSection,
    reward_dimensions,
)
from finetune.recipe.sft import SftOptions

__all__ = [
    "AugmentSection",
    "DebiasOptions",
    "DATA_FORMATS",
    "DEFAULT_DIMENSION",
    "OPTIONS",
    "DataSection",
    "DifferentialPrivacy",
    "DatasetSection",
    "DistributedSection",
    "DpoOptions",
    "EvaluateOptions",
    "ExportOptions",
    "FederatedClient",
    "FederatedSection",
    "Gates",
    "KtoOptions",
    "LoraSection",
    "MergeOptions",
    "ModelSection",
    "OrpoOptions",
    "OutputSection",
    "PreferenceOptions",
    "Recipe",
    "RewardDimension",
    "RewardOptions",
    "RewardSection",
    "RlhfOptions",
    "RuleRewards",
    "SftOptions",
    "SpeedOptions",
    "StageEntry",
    "StageOptions",
    "Tolerance",
    "TrackingSection",
    "TrainingOptions",
    "check_dimension_names",
    "problems",
    "reward_dimensions",
    "stage_datasets",
    "stage_dimension_problems",
    "used_datasets",
    "wiring",
]
