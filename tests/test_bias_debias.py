"""The `debias` stage on a tiny model with a planted attribute signal: against the same loop without the
adversary (plain SFT), the adversary is fooled, the task loss stays within a stated margin, and the planted
association falls (its gap in nats and its effect size d), on three model seeds; the output is a normal adapter;
a resumed stage goes on against the saved adversary; a recipe without an attribute source is refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from tiny_models import build_model, write_jsonl

from finetune.pipeline import load_recipe, resume, start
from finetune.run_dir import RunDir

TEMPLATES = ["They are {a}.", "They seem {a}.", "They were {a}.", "Everyone says they are {a}."]
PLANTED = {"Tibetan": "backward", "Han": "modern"}
TASK_LOSS_MARGIN = 0.35  # nats per token: debiasing may cost at most this much task loss against plain SFT
DEBIAS_WEIGHT = 1.0  # the stage's default adversary_weight (objective: confusion, reads: output)
DEBIAS_STEPS = 500  # the adversary needs time: at 200 steps (seed 0) the gap 7.15 -> 1.28, d 1.86 -> 1.64 only
SEEDS = [0, 1, 2]  # the tiny model's initialisation: every seed measured is tested


def confident(folder: Path, seed: int = 0) -> Path:
    """A tiny model with wider initial logits, so a LoRA learns the planted data in a few dozen steps."""
    return build_model(folder, initializer_range=0.2, seed=seed)


@pytest.fixture(scope="module")
def confident_model(tmp_path_factory) -> Path:
    return confident(tmp_path_factory.mktemp("confident-model"))


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
                    # the hall does not depend on the group (i % 6 would: its parity is the group's)
                    {"role": "assistant", "content": f"In hall {(i // 2) % 6} of the Palace Museum."},
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
    model: Path,
    data: Path,
    suite: Path | None,
    root: Path,
    weight: float,
    steps: int = 60,
    objective: str = "confusion",
    extra: str = "",
    save_steps: int = 1000,
) -> str:
    probes = f", suite: {suite}" if suite else ""
    return textwrap.dedent(f"""\
        name: deb
        model: {{path: {model}}}
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - debias: {{dataset: d, attribute_terms: {{tibetan: [Tibetan], han: [Han]}}, adversary_weight: {weight},
                      objective: {objective}{probes}, max_steps: {steps}, batch_size: 8,
                      learning_rate: 0.01, warmup: 0, lr_scheduler: constant, logging_steps: 10, save_steps: {save_steps},
                      seq_len: 64{extra}}}
        output: {{root: {root}}}
        """)


def run_debias(
    tmp_path: Path,
    tiny_model: Path,
    weight: float,
    steps: int = 60,
    objective: str = "confusion",
    extra: str = "",
    name: str | None = None,
    save_steps: int = 1000,
    probes: bool = True,
) -> RunDir:
    data = tmp_path / "planted.jsonl"
    if not data.exists():
        write_jsonl(data, planted_rows())
    name = name or f"w{weight}"
    recipe = tmp_path / f"debias-{name}.yaml"
    recipe.write_text(
        debias_recipe(
            tiny_model,
            data,
            suite_file(tmp_path) if probes else None,
            tmp_path / "runs",
            weight,
            steps,
            objective,
            extra,
            save_steps,
        ),
        encoding="utf-8",
    )
    return start(load_recipe(recipe), tmp_path / "runs" / name, log=lambda _: None)


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


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{seed}" for seed in SEEDS])
def plain_and_debiased(request, tmp_path_factory) -> tuple[dict, dict]:
    """The same loop and data without the adversary (plain SFT) and with it at the default objective and weight."""
    folder = tmp_path_factory.mktemp(f"debias-pair-{request.param}")
    model = confident(folder / "model", request.param)
    plain = run_debias(folder, model, 0.0, DEBIAS_STEPS).status("debias").summary
    debiased = run_debias(folder, model, DEBIAS_WEIGHT, DEBIAS_STEPS).status("debias").summary
    return plain, debiased


def test_debias_fools_the_adversary_keeps_the_task_and_removes_the_planted_association(plain_and_debiased):
    plain, debiased = plain_and_debiased

    # the planted signal is there: plain SFT learns the pairing (the untouched model's gap is about -1.2 nats)
    assert plain["after"]["bias/ethnicity"] > 1.5 and plain["after"]["bias/people/difference"] > 5.0, plain
    # the adversary (reading what the model says) is fooled, the task loss stays within the margin
    assert abs(debiased["adversary_accuracy_last"] - 0.5) <= 0.15, debiased
    assert debiased["after"]["task_loss"] <= plain["after"]["task_loss"] + TASK_LOSS_MARGIN, (debiased, plain)
    # the probe bias falls: the planted gap (log-likelihood of the planted pairing minus the swapped one, per
    # sentence) loses four fifths or more, and its effect size d falls too
    gap_plain, gap_debiased = plain["after"]["bias/people/difference"], debiased["after"]["bias/people/difference"]
    assert abs(gap_debiased) <= 0.2 * gap_plain, (debiased, plain)
    assert debiased["after"]["bias/ethnicity"] <= plain["after"]["bias/ethnicity"] - 0.2, (debiased, plain)


def test_debias_reading_the_hidden_state_fools_its_adversary_and_keeps_the_task(tmp_path, confident_model):
    plain = run_debias(tmp_path, confident_model, 0.0, DEBIAS_STEPS, extra=", reads: hidden").status("debias")
    hidden = run_debias(tmp_path, confident_model, DEBIAS_WEIGHT, DEBIAS_STEPS, extra=", reads: hidden")
    summary = hidden.status("debias").summary
    assert summary["reads"] == "hidden"
    assert plain.summary["adversary_accuracy_last"] >= 0.75  # without the adapter hiding it, the attribute is read
    assert abs(summary["adversary_accuracy_last"] - 0.5) <= 0.15, summary
    assert summary["after"]["task_loss"] <= plain.summary["after"]["task_loss"] + TASK_LOSS_MARGIN, summary


def test_a_resumed_debias_stage_goes_on_against_the_saved_adversary(tmp_path, confident_model, monkeypatch):
    """Interrupted after its step-10 checkpoint, resumed: the adversary and adapter end as in an unbroken run."""
    import torch

    from finetune.stages import debias

    unbroken = run_debias(tmp_path, confident_model, DEBIAS_WEIGHT, 20, name="unbroken", save_steps=10, probes=False)

    real = debias.jsonl_callback

    def interrupting(path, stage):
        callback = real(path, stage)
        on_step_end = callback.on_step_end

        def stop_at_15(args, state, control, **kwargs):
            if state.global_step == 15:
                raise KeyboardInterrupt
            return on_step_end(args, state, control, **kwargs)

        callback.on_step_end = stop_at_15
        return callback

    monkeypatch.setattr(debias, "jsonl_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_debias(tmp_path, confident_model, DEBIAS_WEIGHT, 20, name="broken", save_steps=10, probes=False)
    monkeypatch.setattr(debias, "jsonl_callback", real)
    resumed = resume(tmp_path / "runs" / "broken", log=lambda _: None)

    def final(run: RunDir) -> dict:
        saved = torch.load(run.stage_dir("debias") / "checkpoints" / "checkpoint-20" / debias.ADVERSARY_FILE)
        return saved["adversary"]

    assert resumed.status("debias").attempts == 2
    for key, value in final(unbroken).items():
        assert torch.allclose(final(resumed)[key], value, atol=1e-5), key
    after = resumed.status("debias").summary["after"]
    assert after["task_loss"] == pytest.approx(unbroken.status("debias").summary["after"]["task_loss"], abs=1e-3)


def validate_debias(write_recipe, tiny_model, chat_file, cli, options: str) -> tuple[int, str]:
    """`wenmai validate` of a one-stage debias recipe with these options: its exit code and what it printed."""
    recipe = write_recipe(
        f"""\
        name: deb
        model: {{path: {tiny_model}}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - debias: {{dataset: d{options}}}
        """
    )
    code, out, err = cli("validate", recipe)
    return code, out + err


def test_debias_without_an_attribute_source_is_refused(write_recipe, tiny_model, chat_file, cli):
    code, said = validate_debias(write_recipe, tiny_model, chat_file, cli, "")
    assert code == 2
    assert "stages[0].debias.attribute_field" in said and "data.augment" in said


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("objective: confuse", ["stages[0].debias.objective", "'confusion' or 'reversal'"]),
        ("objectve: confusion", ["stages[0].debias.objectve", "did you mean objective"]),
        ("reads: logits", ["stages[0].debias.reads", "'output' or 'hidden'"]),
    ],
)
def test_a_bad_debias_option_is_named_with_what_is_allowed(write_recipe, tiny_model, chat_file, cli, option, words):
    code, said = validate_debias(
        write_recipe, tiny_model, chat_file, cli, f", attribute_terms: {{a: [他], b: [她]}}, {option}"
    )
    assert code == 2 and all(word in said for word in words), said


def test_the_output_adversary_does_not_see_the_attribute_terms_themselves(tiny_model):
    """Naming the group, or 她 of a woman, is not bias: those tokens are left out of what the adversary reads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.stages.debias import shown_columns

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    shown = shown_columns(model, tokenizer, ["Tibetan", "她"])
    assert len(shown) == model.get_output_embeddings().weight.shape[0]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert all(shown[i] == 0 for text in ("Tibetan", " Tibetan", "她") for i in ids(text))
    assert shown[ids(" ")[0]] == 1 and shown[ids("museum")[0]] == 1  # the space alone, another word: seen
    assert int((shown == 0).sum()) <= len(ids("Tibetan") + ids(" Tibetan") + ids("她") + ids(" 她"))
