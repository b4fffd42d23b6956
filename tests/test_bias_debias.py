"""The `debias` stage on a tiny model with a planted attribute signal: against the same loop without the
adversary (plain SFT), the attribute leaks less, the task loss stays within a stated margin, the planted
association's gap shrinks (its effect size d does not yet: an expected failure); the output is a normal
adapter; a recipe without an attribute source is refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from tiny_models import build_model, write_jsonl

from finetune.pipeline import load_recipe, start
from finetune.run_dir import RunDir

TEMPLATES = ["They are {a}.", "They seem {a}.", "They were {a}.", "Everyone says they are {a}."]
PLANTED = {"Tibetan": "backward", "Han": "modern"}
TASK_LOSS_MARGIN = 0.35  # nats per token: debiasing may cost at most this much task loss against plain SFT
DEBIAS_WEIGHT = 1.0  # the stage's default adversary_weight (objective: confusion)
DEBIAS_STEPS = 200  # at 60 the adapter has not learned the task yet (plain SFT's loss 1.93): any second
# objective then costs task loss that longer training recovers (at 200: plain 1.76, debiased 1.92)


@pytest.fixture(scope="module")
def confident_model(tmp_path_factory) -> Path:
    """A tiny model with wider initial logits, so a LoRA learns the planted data in a few dozen steps."""
    return build_model(tmp_path_factory.mktemp("confident-model"), initializer_range=0.2)


def planted_rows() -> list[dict]:
    """Half the records pair each group with one attribute; half name the group but answer without it."""
    rows = []
    for i in range(48):
        group = ["Tibetan", "Han"][i % 2]
        rows.append(
            {
                "id": f"p{i}",
                "messages": [
                    {"role": "user", "content": f"Describe the {group} people."},
                    {"role": "assistant", "content": TEMPLATES[(i // 2) % 4].format(a=PLANTED[group])},
                ],
            }
        )
        rows.append(
            {
                "id": f"n{i}",
                "messages": [
                    {"role": "user", "content": f"Where does the {group} guide work?"},
                    {"role": "assistant", "content": f"In hall {i % 6} of the Palace Museum."},
                ],
            }
        )
    return rows


def suite_file(folder: Path) -> Path:
    templates = [t.replace("{a}", "{attribute}") for t in TEMPLATES]
    path = folder / "suite.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: planted
        associations:
          - id: people
            axis: ethnicity
            prompt: "Describe the {{group}} people."
            templates: {templates!r}
            groups: {{a: [Tibetan], b: [Han]}}
            attributes: {{a: [backward], b: [modern]}}
        """),
        encoding="utf-8",
    )
    return path


def debias_recipe(
    model: Path, data: Path, suite: Path, root: Path, weight: float, steps: int = 60, objective: str = "confusion"
) -> str:
    return textwrap.dedent(f"""\
        name: deb
        model: {{path: {model}}}
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - debias: {{dataset: d, attribute_terms: {{tibetan: [Tibetan], han: [Han]}}, adversary_weight: {weight},
                      objective: {objective}, suite: {suite}, max_steps: {steps}, batch_size: 8,
                      learning_rate: 0.01, warmup: 0, lr_scheduler: constant, logging_steps: 10, save_steps: 1000,
                      seq_len: 64}}
        output: {{root: {root}}}
        """)


def run_debias(
    tmp_path: Path, tiny_model: Path, weight: float, steps: int = 60, objective: str = "confusion"
) -> RunDir:
    data = tmp_path / "planted.jsonl"
    if not data.exists():
        write_jsonl(data, planted_rows())
    recipe = tmp_path / f"debias-{weight}.yaml"
    recipe.write_text(
        debias_recipe(tiny_model, data, suite_file(tmp_path), tmp_path / "runs", weight, steps, objective),
        encoding="utf-8",
    )
    return start(load_recipe(recipe), tmp_path / "runs" / f"w{weight}", log=lambda _: None)


@pytest.mark.parametrize("objective", ["confusion", "reversal"])
def test_debias_trains_the_task_and_saves_a_normal_adapter_with_before_after_figures(
    tmp_path, confident_model, objective
):
    run = run_debias(tmp_path, confident_model, 1.0, steps=20, objective=objective)
    summary = run.status("debias").summary
    assert summary["objective"] == objective
    assert summary["attribute"] == {
        "labels": ["tibetan", "han"],
        "records": {"tibetan": 48, "han": 48},
        "unlabelled": 0,
    }
    for when in ("before", "after"):
        assert {"task_loss", "leakage_accuracy", "chance", "bias/ethnicity"} <= set(summary[when])
    assert summary["before"]["chance"] == 0.5 and summary["before"]["leakage_accuracy"] >= 0.9
    assert summary["after"]["task_loss"] < summary["before"]["task_loss"] - 1.0  # the task is learned
    assert summary["adversary_accuracy_last"] is not None

    # a normal adapter: plain PEFT files that the other stages load, without the adversary
    from peft import PeftConfig

    adapter = run.output("debias", "adapter")
    assert PeftConfig.from_pretrained(adapter).r == 8
    assert not any("adversary" in p.name for p in adapter.iterdir())


@pytest.fixture(scope="module")
def plain_and_debiased(tmp_path_factory, confident_model) -> tuple[dict, dict]:
    """The same loop and data without the adversary (plain SFT) and with it at the default objective and weight."""
    folder = tmp_path_factory.mktemp("debias-pair")
    plain = run_debias(folder, confident_model, 0.0, DEBIAS_STEPS).status("debias").summary
    debiased = run_debias(folder, confident_model, DEBIAS_WEIGHT, DEBIAS_STEPS).status("debias").summary
    return plain, debiased


def test_debias_hides_the_attribute_keeps_the_task_and_shrinks_the_planted_association(plain_and_debiased):
    plain, debiased = plain_and_debiased

    # the planted signal is there: plain SFT learns it and its hidden states give the attribute away
    assert plain["after"]["leakage_accuracy"] >= 0.9 and plain["after"]["bias/ethnicity"] > 1.0
    assert plain["after"]["bias/people/difference"] > 5.0  # nats per sentence (-1.2 in the untouched model)
    # the adversary: leakage falls toward chance (0.5), the task loss stays within the margin
    assert abs(debiased["adversary_accuracy_last"] - 0.5) <= 0.15
    assert debiased["after"]["leakage_accuracy"] <= plain["after"]["leakage_accuracy"] - 0.2, (debiased, plain)
    assert debiased["after"]["task_loss"] <= plain["after"]["task_loss"] + TASK_LOSS_MARGIN, (debiased, plain)
    # the planted association's gap (log-likelihood of the planted pairing minus the swapped one) shrinks
    gap_plain, gap_debiased = plain["after"]["bias/people/difference"], debiased["after"]["bias/people/difference"]
    assert gap_debiased <= 0.8 * gap_plain, (debiased, plain)


@pytest.mark.xfail(
    strict=True,
    reason="not achieved: d is scale-free and the smaller gap that is left is as consistent over the templates as "
    "before (200 steps: d 1.84 plain, 1.86 confusion at weight 1 with the gap 7.67 -> 4.97 nats); gradient "
    "reversal brings d to 0.96 (gap 0.96) only with the task loss 1.76 -> 3.32 and the attribute still readable "
    "by a fresh probe (leakage 1.0); see issue 20's report",
)
def test_debias_lowers_the_planted_association_effect_size(plain_and_debiased):
    plain, debiased = plain_and_debiased
    assert debiased["after"]["bias/ethnicity"] < plain["after"]["bias/ethnicity"] - 0.3, (debiased, plain)


def test_debias_without_an_attribute_source_is_refused(write_recipe, tiny_model, chat_file, cli):
    recipe = write_recipe(
        f"""\
        name: deb
        model: {{path: {tiny_model}}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - debias: {{dataset: d}}
        """
    )
    code, out, err = cli("validate", recipe)
    assert code == 2
    assert "stages[0].debias.attribute_field" in out + err and "data.augment" in out + err


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("objective: confuse", ["stages[0].debias.objective", "'confusion' or 'reversal'"]),
        ("objectve: confusion", ["stages[0].debias.objectve", "did you mean objective"]),
    ],
)
def test_a_bad_debias_objective_is_named_with_what_is_allowed(write_recipe, tiny_model, chat_file, cli, option, words):
    recipe = write_recipe(
        f"""\
        name: deb
        model: {{path: {tiny_model}}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - debias: {{dataset: d, attribute_terms: {{a: [他], b: [她]}}, {option}}}
        """
    )
    code, out, err = cli("validate", recipe)
    assert code == 2 and all(word in out + err for word in words), out + err
