"""data.policy: licences by intended use, sensitivity grades, missing rights, consent; bad input named early."""

from __future__ import annotations

import json
import textwrap

import pytest
from tiny_models import write_jsonl

from finetune.data import load_records
from finetune.errors import ConfigError, DataError
from finetune.pipeline import load_recipe


def chat(i: int, answer: str = "", **meta) -> dict:
    return {
        "id": f"r{i}",
        **meta,
        "messages": [
            {"role": "user", "content": f"Tell me about object number {i}."},
            {"role": "assistant", "content": answer or f"Object {i} is a bronze vessel from dynasty {i % 7}."},
        ],
    }


def make_recipe(
    tmp_path, model, rows, policy: str = "", defaults: str = "", stage_extra: str = "", root=None
) -> object:
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    text = textwrap.dedent(f"""\
        name: t
        model: {{path: {model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          policy: {{{policy}}}
          d: {{path: {data}, format: chat{", defaults: {" + defaults + "}" if defaults else ""}}}
        stages:
          - sft: {{dataset: d, max_steps: 1, batch_size: 2, seq_len: 64, save_steps: 1{stage_extra}}}
        output: {{root: {root or tmp_path / "runs"}}}
        """)
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_commercial_recipe_drops_cc_by_nc_records_and_says_how_many(tmp_path, tiny_model):
    rows = [chat(i, licence="CC-BY-NC-4.0" if i % 3 == 0 else "CC-BY-4.0") for i in range(12)]
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, rows, "intended_use: commercial")).recipe
    records = load_records(recipe, "d")
    assert sorted(r["id"] for r in records.records) == sorted(f"r{i}" for i in range(12) if i % 3)
    assert records.report.excluded == {"licence: CC-BY-NC-4.0 does not permit commercial use": 4}
    research = load_recipe(make_recipe(tmp_path, tiny_model, rows, "intended_use: research")).recipe
    assert len(load_records(research, "d").records) == 12


@pytest.mark.parametrize("use", ["research", "non-commercial", "commercial", "internal"])
def test_no_derivatives_material_trains_only_where_the_policy_names_it(tmp_path, tiny_model, use):
    """The conservative reading: a model trained on CC BY-ND material may be a derivative work of it."""
    rows = [chat(i, licence="CC-BY-ND-4.0" if i % 2 else "CC-BY-4.0") for i in range(8)]
    records = load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, f"intended_use: {use}")).recipe, "d")
    assert sorted(r["id"] for r in records.records) == ["r0", "r2", "r4", "r6"]
    assert records.report.excluded == {
        "licence: CC-BY-ND-4.0 allows no derivative works (name it in data.policy.licences to train on it)": 4
    }
    named = f"intended_use: {use}, licences: [CC-BY-4.0, CC-BY-ND-4.0]"
    assert len(load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, named)).recipe, "d").records) == 8
    declared = f"intended_use: {use}, custom_licences: {{CC-BY-ND-4.0: [{use}]}}"
    assert len(load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, declared)).recipe, "d").records) == 8


def test_naming_cc_by_nc_nd_does_not_let_it_train_a_commercial_model(tmp_path, tiny_model):
    rows = [chat(i, licence="CC-BY-NC-ND-4.0") for i in range(2)] + [chat(2, licence="CC0-1.0")]
    policy = "intended_use: research, licences: [CC0-1.0, CC-BY-NC-ND-4.0]"
    assert len(load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, policy)).recipe, "d").records) == 3
    with pytest.raises(ConfigError, match="CC-BY-NC-ND-4.0 does not permit commercial use"):
        load_recipe(make_recipe(tmp_path, tiny_model, rows, "intended_use: commercial, licences: [CC-BY-NC-ND-4.0]"))


def test_grades_missing_rights_consent_and_licence_list(tmp_path, tiny_model):
    rows = [
        chat(0, licence="CC0-1.0"),
        chat(1, licence="CC0-1.0", sensitivity="restricted"),
        chat(2),
        chat(3, licence="CC-BY-SA-4.0"),
        chat(4, licence="cc0-1.0", consent=False),
        chat(5, licence="CC0-1.0", sensitivity="internal"),
    ]
    policy = "max_sensitivity: internal, allow_missing_rights: false, licences: [CC0-1.0]"
    report = load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, policy)).recipe, "d").report
    assert report.kept == 2 and report.grades == {"public": 1, "internal": 1}
    assert report.excluded == {
        "sensitivity: restricted (above internal)": 1,
        "rights: no licence (allow_missing_rights is false)": 1,
        "licence: CC-BY-SA-4.0 not in data.policy.licences": 1,
        "consent: refused or withdrawn": 1,
    }


def test_file_defaults_fill_what_records_leave_out(tmp_path, tiny_model):
    rows = [chat(0), chat(1, licence="CC-BY-NC-4.0", source={"collection": "bronzes"})]
    defaults = "licence: CC0-1.0, source: {institution: Palace Museum}"
    report = load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, "", defaults)).recipe, "d").report
    assert report.licences == {"CC0-1.0": 1, "CC-BY-NC-4.0": 1}
    assert report.sources == {"Palace Museum": 1, "Palace Museum / bronzes": 1}


def test_unknown_licence_in_a_record_names_file_line_and_suggestion(tmp_path, tiny_model):
    rows = [chat(0, licence="CC0-1.0"), chat(1, licence="CC-BY-NC4.0")]
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, rows)).recipe
    with pytest.raises(DataError) as info:
        load_records(recipe, "d")
    assert "d.jsonl:2: licence 'CC-BY-NC4.0' is not a known SPDX id" in str(info.value)
    assert "did you mean CC-BY-NC-4.0?" in str(info.value)


def test_unknown_grade_in_a_record_and_in_defaults_is_named(tmp_path, tiny_model):
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, [chat(0, sensitivity="secret")])).recipe
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: unknown grade 'secret'; grades .*public, internal, restricted, prohibited"
    ):
        load_records(recipe, "d")
    with pytest.raises(ConfigError) as info:
        load_recipe(make_recipe(tmp_path, tiny_model, [chat(0)], defaults="sensitivity: secret, licence: CC-BY-9.9"))
    problems = [str(p) for p in info.value.problems]
    assert any(p.startswith("data.d.defaults.sensitivity: unknown grade 'secret'") for p in problems), problems
    assert any(p.startswith("data.d.defaults.licence: licence 'CC-BY-9.9'") for p in problems), problems


def test_renamed_grades_are_used_everywhere(tmp_path, tiny_model):
    rows = [chat(0, sensitivity="open"), chat(1, sensitivity="staff"), chat(2, sensitivity="never")]
    recipe = load_recipe(make_recipe(tmp_path, tiny_model, rows, "grades: [open, staff, never]")).recipe
    report = load_records(recipe, "d").report
    assert report.kept == 2 and report.excluded == {"sensitivity: never (above staff)": 1}


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (
            "max_sensitivity: prohibited",
            "data.policy.max_sensitivity: 'prohibited' is the highest grade and never trains",
        ),
        ("max_sensitivity: top", "data.policy.max_sensitivity: unknown grade 'top'"),
        (
            "intended_use: commercial, licences: [CC-BY-NC-SA-4.0]",
            "data.policy.licences[0]: CC-BY-NC-SA-4.0 does not permit commercial use",
        ),
        ("licences: [CC-BY-NC-4]", "data.policy.licences[0]: licence 'CC-BY-NC-4' is not a known SPDX id"),
        ("dedupp: {exact: true}", "data.policy.dedupp: unknown key — did you mean dedup?"),
        (
            "intended_use: comercial",
            "data.policy.intended_use: Input should be 'research', 'non-commercial', 'commercial' or 'internal'",
        ),
    ],
)
def test_bad_policy_is_a_recipe_error_naming_the_key(tmp_path, tiny_model, policy, problem):
    with pytest.raises(ConfigError) as info:
        load_recipe(make_recipe(tmp_path, tiny_model, [chat(0)], policy))
    assert any(str(p).startswith(problem) for p in info.value.problems), info.value


def test_policy_typo_and_dataset_typo_are_named(write_recipe, tiny_model, chat_file):
    path = write_recipe(
        f"name: t\nmodel: {{path: {tiny_model}}}\ndata:\n  polcy: {{intended_use: research}}\n"
        f"  d: {{path: {chat_file}, format: chat}}\nstages: [{{sft: {{dataset: d}}}}]\n"
    )
    with pytest.raises(ConfigError, match="data: 'polcy' is neither `policy` nor a dataset .* did you mean policy"):
        load_recipe(path)
    path = write_recipe(
        f"name: t\nmodel: {{path: {tiny_model}}}\ndata:\n  d: {{path: {chat_file}, format: chat, "
        f"defualts: {{}}}}\nstages: [{{sft: {{dataset: d}}}}]\n"
    )
    with pytest.raises(ConfigError, match="data.d.defualts: unknown key — did you mean defaults?"):
        load_recipe(path)


def test_policy_that_excludes_every_record_stops_before_any_model_loads(tmp_path, tiny_model, cli, monkeypatch):
    from finetune import model

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded although the data cannot train")

    monkeypatch.setattr(model, "load_model", must_not_load)
    rows = [chat(i, licence="CC-BY-NC-ND-4.0") for i in range(5)]
    recipe = make_recipe(tmp_path, tiny_model, rows, "intended_use: commercial")
    for command in ("validate", "run"):
        code, out, err = cli(command, recipe)
        assert code == 2, out + err
        assert "dataset 'd': no record is left to train on (5 read, 0 bad)" in err
        assert "licence: CC-BY-NC-ND-4.0 does not permit commercial use: 5" in err
    assert not (tmp_path / "runs").exists()


def test_prohibited_record_never_reaches_the_trainer(tmp_path, tiny_model, monkeypatch):
    import trl

    from finetune.pipeline import start

    received = []

    class RecordingTrainer(trl.SFTTrainer):
        def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
            received.extend(train_dataset["input_ids"])
            received.extend(eval_dataset["input_ids"] if eval_dataset is not None else [])
            super().__init__(*args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

    monkeypatch.setattr(trl, "SFTTrainer", RecordingTrainer)
    secret = "SECRETWORDS in the sealed archive"
    rows = [chat(i) for i in range(8)] + [
        chat(8, secret, sensitivity="prohibited", topics=["human_remains"]),
        chat(9, "Restricted note on the tomb.", sensitivity="restricted"),
    ]
    recipe = make_recipe(tmp_path, tiny_model, rows, "max_sensitivity: restricted", stage_extra=", eval_fraction: 0.2")
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "r", log=lambda _: None)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.decode(ids) for ids in received]
    assert len(texts) == 9 and any("Restricted note" in t for t in texts)
    assert not any("SECRET" in t for t in texts)
    card = json.loads((run_dir.root / "sft" / "data_card.json").read_text())
    assert card["stage"] == "sft" and card["datasets"][0]["excluded"] == {
        "sensitivity: prohibited (above restricted)": 1
    }
    register = [
        json.loads(line) for line in (run_dir.root / "sft" / "sensitive_register.jsonl").read_text().splitlines()
    ]
    assert [(e["record"], e["grade"], e["stage"]) for e in register] == [("r9", "restricted", "sft")]
    assert (run_dir.root / "sft" / "data_card.md").read_text().startswith("# Data card — stage `sft`")


@pytest.mark.parametrize(
    ("pii", "kept", "masked"),
    [
        ("{action: mask}", ["r0", "r1", "r2"], {"r1": True, "r2": True}),
        ("{action: drop}", ["r0"], {}),
        ("{action: mask, keep_with_consent: true}", ["r0", "r1", "r2"], {"r1": True, "r2": False}),
        ("{action: off}", ["r0", "r1", "r2"], {"r1": False, "r2": False}),
    ],
)
def test_pii_action_and_consent(tmp_path, tiny_model, pii, kept, masked):
    rows = [
        chat(0),
        chat(1, "Ring the donor on 13812345678."),
        chat(2, "Oral history: call me on 13912345678.", consent=True),
    ]
    records = load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, f"pii: {pii}")).recipe, "d")
    assert [r["id"] for r in records.records] == kept
    for record in records.records:
        if record["id"] in masked:
            assert ("<PHONE>" in record["messages"][1]["content"]) is masked[record["id"]]
    if pii == "{action: drop}":
        assert records.report.excluded == {"pii: contains mobile": 2} and records.report.pii_found == {"mobile": 2}
