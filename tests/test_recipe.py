"""Recipe loading: schema, includes, overrides, env secrets, and errors that name the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.config_io import CONFIGS_DIR
from finetune.errors import ConfigError
from finetune.pipeline import load_recipe

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
name: t
model: {{path: {model}}}
data:
  d: {{path: {data}, format: chat}}
stages:
  - sft:
      dataset: d
"""


def problems_of(path: Path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


@pytest.fixture
def base_recipe(write_recipe, tiny_model, chat_file):
    def make(extra: str = "", sft: str = "") -> Path:
        text = BASE.format(model=tiny_model, data=chat_file)
        text = text.replace("      dataset: d\n", f"      dataset: d\n{sft}")
        return write_recipe(text + extra)

    return make


def test_unknown_key_names_path_and_suggestion(base_recipe):
    path = base_recipe(sft="      learnig_rate: 0.001\n")
    [problem] = problems_of(path)
    assert problem.startswith("stages[0].sft.learnig_rate: unknown key — did you mean learning_rate?")
    assert f"{path.name}:8" in problem


def test_every_problem_is_reported_at_once(base_recipe):
    path = base_recipe(
        extra="lora: {r: zero, varient: dora}\ntracking: {backends: [wandbb]}\n", sft="      seq_len: 0\n"
    )
    problems = problems_of(path)
    joined = "\n".join(problems)
    assert len(problems) == 4, joined
    assert "lora.r: Input should be a valid integer" in joined and "'zero'" in joined
    assert "lora.varient: unknown key — did you mean variant?" in joined
    assert "tracking.backends[0]:" in joined and "'wandbb'" in joined
    assert "stages[0].sft.seq_len: Input should be greater than 0" in joined


def test_missing_required_key_is_named(write_recipe, chat_file):
    path = write_recipe(
        f"name: t\ndata: {{d: {{path: {chat_file}, format: chat}}}}\nstages: [{{sft: {{dataset: d}}}}]\n"
    )
    assert any(p.startswith("model: required key is missing") for p in problems_of(path))


def test_unknown_stage_kind_suggests_the_right_one(base_recipe, write_recipe, tiny_model, chat_file):
    text = BASE.format(model=tiny_model, data=chat_file).replace("  - sft:", "  - sfft:")
    [problem] = problems_of(write_recipe(text))
    assert problem.startswith("stages[0].sfft: unknown stage kind — did you mean sft?")


def test_stage_dataset_must_exist_in_data(base_recipe):
    path = base_recipe(sft="      eval_dataset: nope\n")
    [problem] = problems_of(path)
    assert "stages[0].sft.eval_dataset: dataset 'nope' is not in `data` (defined: d)" in problem


def test_duplicate_stage_names_are_rejected(write_recipe, tiny_model, chat_file):
    text = BASE.format(model=tiny_model, data=chat_file) + "  - sft: {dataset: d}\n"
    [problem] = problems_of(write_recipe(text))
    assert problem.startswith("stages[1].sft.name: stage name 'sft' is already used by stages[0]")


def test_yaml_syntax_error_names_line(write_recipe):
    path = write_recipe("name: t\nmodel:\n  path: [unclosed\ndata: {}\n")
    [problem] = problems_of(path)
    assert "not valid YAML" in problem and f"{path.name}:" in problem


def test_include_merges_and_recipe_wins(write_recipe, tiny_model, chat_file):
    write_recipe("lora: {r: 32, alpha: 64}\nmodel: {dtype: float32}\n", "frag.yaml")
    text = "include: [frag.yaml]\n" + BASE.format(model=tiny_model, data=chat_file) + "lora: {r: 8}\n"
    loaded = load_recipe(write_recipe(text))
    assert loaded.recipe.lora.r == 8 and loaded.recipe.lora.alpha == 64
    assert loaded.recipe.model.dtype == "float32"
    assert loaded.origin(("lora", "alpha")).kind == "fragment"
    assert loaded.origin(("lora", "r")).kind == "recipe"
    assert "# default" in loaded.to_yaml(annotate=True)


def test_include_by_name_finds_configs_folder(write_recipe, tiny_model, chat_file):
    text = "include: [lora/small]\n" + BASE.format(model=tiny_model, data=chat_file)
    loaded = load_recipe(write_recipe(text))
    assert loaded.recipe.lora.r == yaml.safe_load((CONFIGS_DIR / "lora" / "small.yaml").read_text())["lora"]["r"]


def test_include_cycle_is_reported(write_recipe):
    write_recipe("include: [b.yaml]\n", "a.yaml")
    write_recipe("include: [a.yaml]\n", "b.yaml")
    path = write_recipe("include: [a.yaml]\nname: t\n")
    assert any("include cycle: recipe.yaml -> a.yaml -> b.yaml -> a.yaml" in p for p in problems_of(path))


def test_include_not_found_lists_available_fragments(write_recipe):
    path = write_recipe("include: [models/nope]\nname: t\n")
    problems = problems_of(path)
    assert any("fragment 'models/nope' not found" in p and "models/smollm2-135m" in p for p in problems)


def test_set_override_is_typed_and_addressed_by_stage_name(base_recipe):
    loaded = load_recipe(base_recipe(), ["stages.sft.max_steps=5", "lora.variant=dora"])
    assert loaded.recipe.stage("sft").max_steps == 5
    assert loaded.recipe.lora.variant == "dora"
    assert str(loaded.origin(("stages", 0, "sft", "max_steps"))) == "--set"


def test_set_on_unknown_key_is_an_error(base_recipe):
    [problem] = problems_of(base_recipe(), ["stages.sft.max_stepz=5"])
    assert problem == "stages[0].sft.max_stepz: unknown key — did you mean max_steps?  (--set)"


def test_set_on_unknown_stage_lists_stages(base_recipe):
    [problem] = problems_of(base_recipe(), ["stages.dpo.beta=0.1"])
    assert "no item 'dpo' in stages (items: sft)" in problem


def test_env_secret_is_expanded_but_never_written(base_recipe, monkeypatch):
    monkeypatch.setenv("WENMAI_TEST_URI", "https://user:s3cret@mlflow.example")
    loaded = load_recipe(base_recipe(extra="tracking: {mlflow_tracking_uri: '${env:WENMAI_TEST_URI}'}\n"))
    assert loaded.recipe.tracking.mlflow_tracking_uri == "https://user:s3cret@mlflow.example"
    written = loaded.to_yaml()
    assert "s3cret" not in written and "${env:WENMAI_TEST_URI}" in written


def test_missing_env_variable_is_named(base_recipe, monkeypatch):
    monkeypatch.delenv("WENMAI_NOT_SET", raising=False)
    [problem] = problems_of(base_recipe(extra="tracking: {run_name: '${env:WENMAI_NOT_SET}'}\n"))
    assert problem.startswith("tracking.run_name: environment variable WENMAI_NOT_SET is not set")


def test_relative_data_path_is_relative_to_the_recipe(tmp_path, write_recipe, tiny_model, chat_file):
    text = BASE.format(model=tiny_model, data=chat_file.name)
    loaded = load_recipe(write_recipe(text, "sub/../recipe.yaml"))
    assert Path(loaded.recipe.data["d"].path) == chat_file.resolve()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    from finetune.pipeline import check_data

    loaded = load_recipe(recipe)
    check_data(loaded.recipe)


@pytest.mark.parametrize("fragment", sorted(CONFIGS_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_config_fragment_validates_inside_a_recipe(fragment, write_recipe, tiny_model, chat_file):
    text = f"include: [{fragment}]\n" + BASE.format(model=tiny_model, data=chat_file)
    load_recipe(write_recipe(text))


def test_a_run_folder_written_when_every_trainer_stage_listed_speed_still_loads(tmp_path):
    from finetune.config_io import load_resolved
    from finetune.recipe import SpeedOptions

    stored = load_recipe(ROOT / "recipes" / "quickstart-rlhf.yaml").to_yaml()  # a run folder's recipe.yaml
    data = yaml.safe_load(stored)
    rlhf = next(item["rlhf"] for item in data["stages"] if "rlhf" in item)
    rlhf["speed"] = SpeedOptions().model_dump(mode="json")  # what the previous schema stored for every trainer stage
    old = tmp_path / "recipe.yaml"
    old.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    assert [c.kind for c in load_resolved(old.read_text(encoding="utf-8"), old).recipe.stage_configs()] == [
        "sft",
        "reward",
        "rlhf",
    ]
    rlhf["speed"]["liger"] = True  # a speed section that asks for something is still refused
    old.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"stages\[2\]\.rlhf\.speed: the rlhf stage does not run the speed options"):
        load_resolved(old.read_text(encoding="utf-8"), old)


def test_a_stage_holding_out_eval_data_two_ways_is_named_at_its_line(base_recipe):
    path = base_recipe(sft="      eval_dataset: d\n      eval_fraction: 0.1\n")
    [problem] = problems_of(path)
    assert problem.startswith("stages[0].sft.eval_fraction: set either eval_dataset or eval_fraction, not both")
    assert f"{path.name}:" in problem
