"""Values that validate but would break the run are refused at their key and line: yes/no for a number,
infinities, step counts of 0, negative or astronomic, an absurd LoRA rank, and a key given twice."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe

from finetune.errors import ConfigError
from finetune.pipeline import load_recipe


@pytest.mark.parametrize(
    ("option", "key", "message"),
    [
        ("seq_len: true", "stages[0].sft.seq_len", "true is a yes/no value; give a number"),
        ("max_grad_norm: .inf", "stages[0].sft.max_grad_norm", "inf is not a finite number"),
        ("learning_rate: .nan", "stages[0].sft.learning_rate", "nan is not a finite number"),
        ("max_steps: 0", "stages[0].sft.max_steps", "0 steps trains nothing"),
        ("max_steps: -5", "stages[0].sft.max_steps", "greater than or equal to -1"),
        ("max_steps: 1.0e+12", "stages[0].sft.max_steps", "less than or equal to 100000000"),
    ],
)
def test_values_that_would_break_the_run_are_named_at_their_key(
    option, key, message, tmp_path, tiny_model, chat_file, write_recipe
):
    text = tiny_recipe(tiny_model, chat_file, tmp_path / "runs")
    text = (
        text.replace("seq_len: 64", option)
        if option.startswith("seq_len")
        else text.replace("sft: {dataset: d,", f"sft: {{dataset: d, {option},")
    )
    if option.startswith("max_steps"):
        text = text.replace("max_steps: 4, ", "")
    with pytest.raises(ConfigError) as err:
        load_recipe(write_recipe(text))
    assert key in str(err.value) and message in str(err.value), str(err.value)


def test_an_absurd_lora_rank_and_a_key_given_twice_are_refused(tmp_path, tiny_model, chat_file, write_recipe):
    text = tiny_recipe(tiny_model, chat_file, tmp_path / "runs").replace("lora: {r: 4,", "lora: {r: 100000000000,")
    with pytest.raises(ConfigError, match=r"lora.r: .*less than or equal to 4096"):
        load_recipe(write_recipe(text))
    twice = tiny_recipe(tiny_model, chat_file, tmp_path / "runs") + "name: again\n"
    with pytest.raises(ConfigError) as err:
        load_recipe(write_recipe(twice, "twice.yaml"))
    assert "name: given twice (lines 1 and 9)" in str(err.value) and "twice.yaml:9" in str(err.value)
