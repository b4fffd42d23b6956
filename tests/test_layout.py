"""The floor plan holds: the schema loads alone and light, every stage kind has its options and its method."""

from __future__ import annotations

import json
import subprocess
import sys

from finetune import stages
from finetune.recipe import OPTIONS, StageOptions


def test_the_recipe_schema_imports_no_stage_library_reward_or_torch():
    code = (
        "import json, sys; import finetune.recipe; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('finetune', 'reward', 'torch', 'transformers'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    forbidden = ("finetune.stages", "finetune.data", "finetune.training", "reward", "torch", "transformers")
    assert [m for m in loaded if m.startswith(forbidden)] == []
    assert "finetune.recipe.schema" in loaded  # the check above looked at a real import


def test_the_cli_imports_no_torch_so_validate_starts_fast():
    code = "import sys; import finetune.cli; print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_every_stage_kind_has_options_and_a_method_with_the_stage_interface():
    assert list(stages.STAGES) == list(OPTIONS)
    for kind, module in stages.STAGES.items():
        assert issubclass(OPTIONS[kind], StageOptions) and OPTIONS[kind].kind == kind
        for hook in ("run", "check", "machine_problems"):
            assert callable(getattr(module, hook, None)), (
                f"finetune/stages/{module.__name__.rsplit('.', 1)[-1]}.py lacks {hook}()"
            )


def test_only_stages_that_run_a_speed_plan_have_speed_options():
    with_speed = sorted(kind for kind, options in OPTIONS.items() if "speed" in options.model_fields)
    assert with_speed == ["reward", "sft"]
