"""Dataset mixing: an sft stage reads several datasets by weight; the draw keeps the ratios; the data card says so."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tiny_models import write_jsonl

from finetune.data.mixing import mix_rows, quotas, tokenize_mixture
from finetune.errors import ConfigError
from finetune.pipeline import load_recipe


def rows_of(name: str, n: int) -> list[dict]:
    return [
        {
            "id": f"{name}{i}",
            "messages": [
                {"role": "user", "content": f"{name} question {i}?"},
                {"role": "assistant", "content": f"{name} answer {i}."},
            ],
        }
        for i in range(n)
    ]


def mixed_recipe(tmp_path: Path, model: Path, weights: str, mix: str = "", sizes=(60, 25, 40)) -> Path:
    files = {
        n: write_jsonl(tmp_path / f"{n}.jsonl", rows_of(n, k))
        for n, k in zip(("museum", "poetry", "ritual"), sizes, strict=True)
    }
    data = "\n".join(f"  {n}: {{path: {p}, format: chat}}" for n, p in files.items())
    text = (
        f"name: mix\nmodel: {{path: {model}}}\nlora: {{r: 4, alpha: 8, dropout: 0.0}}\ndata:\n{data}\nstages:\n"
        f"  - sft:\n      datasets: {weights}\n      {mix}\n      max_steps: 1\n      batch_size: 4\n"
        f"      seq_len: 64\n      save_steps: 10\noutput: {{root: {tmp_path / 'runs'}}}\n"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("weights", [{"a": 0.7, "b": 0.3}, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 2, "b": 1}])
@pytest.mark.parametrize("seed", range(5))
def test_a_thousand_samples_land_within_two_percent_of_the_ratios(weights, seed):
    rows = {name: [(name, i) for i in range(n)] for name, n in zip(weights, (150, 400, 90), strict=False)}
    total = sum(weights.values())
    mixed, shares = mix_rows(rows, weights, "first_exhausted", 1000, seed)
    counts = Counter(name for name, _ in mixed)
    assert len(mixed) == 1000
    for name, weight in weights.items():
        assert abs(counts[name] / 1000 - weight / total) <= 0.02, (name, counts)
    assert {s.dataset: s.drawn for s in shares} == dict(counts)


def test_first_exhausted_repeats_nothing_and_all_exhausted_uses_everything():
    sizes = {"a": 70, "b": 10}
    weights = {"a": 0.5, "b": 0.5}
    first = quotas(weights, sizes, "first_exhausted", None)
    assert first == {"a": 10, "b": 10}  # b runs out first
    every = quotas(weights, sizes, "all_exhausted", None)
    assert every == {"a": 70, "b": 70}  # b's 10 records repeat 7 times
    mixed, _ = mix_rows({n: [(n, i) for i in range(k)] for n, k in sizes.items()}, weights, "all_exhausted", None, 0)
    assert set(mixed) == {(n, i) for n, k in sizes.items() for i in range(k)}
    assert Counter(mixed)[("b", 3)] == 7


def test_a_mixed_stage_draws_by_weight_and_reports_it_on_the_data_card(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    recipe = load_recipe(
        mixed_recipe(tmp_path, tiny_model, "{museum: 0.7, poetry: 0.3}", "mix: {samples: 1000}")
    ).recipe
    config = recipe.stage_configs()[0]
    assert config.dataset == "museum" and config.mixture() == {"museum": 0.7, "poetry": 0.3}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    stage_dir = tmp_path / "stage"
    mixed = tokenize_mixture(recipe, config.mixture(), tokenizer, 64, True, stage_dir, "first_exhausted", 1000, 42)

    sources = Counter("museum" if "museum" in tokenizer.decode(r["input_ids"]) else "poetry" for r in mixed.rows)
    assert abs(sources["museum"] / 1000 - 0.7) <= 0.02 and abs(sources["poetry"] / 1000 - 0.3) <= 0.02
    card = json.loads((stage_dir / "data_card.json").read_text(encoding="utf-8"))
    assert {d["name"] for d in card["datasets"]} == {"museum", "poetry"}
    shares = {s["dataset"]: s for s in card["mixture"]["shares"]}
    assert shares["museum"]["drawn"] == sources["museum"] and shares["poetry"]["available"] == 25
    markdown = (stage_dir / "data_card.md").read_text(encoding="utf-8")
    assert "## Mixture (first_exhausted)" in markdown and "| `poetry` | 0.300 | 25 |" in markdown


def test_a_mixed_sft_run_trains_and_its_summary_counts_each_dataset(tmp_path, tiny_model):
    from finetune.pipeline import start

    loaded = load_recipe(mixed_recipe(tmp_path, tiny_model, "{museum: 1, poetry: 1, ritual: 2}"))
    run_dir = start(loaded, tmp_path / "runs" / "r", log=lambda _: None)
    summary = run_dir.status("sft").summary
    card = json.loads((run_dir.root / "sft" / "data_card.json").read_text(encoding="utf-8"))
    available = {s["dataset"]: s["available"] for s in card["mixture"]["shares"]}
    assert available == {"museum": 60, "poetry": 25, "ritual": 40}
    # first_exhausted: ritual, half the draw with 40 records, runs out first (80 in all); no record repeats
    assert summary["data"]["mixture"] == {"museum": 20, "poetry": 20, "ritual": 40}
    assert summary["data"]["sequences"] == 80
    lineage = json.loads(run_dir.lineage_path.read_text(encoding="utf-8"))
    assert {"museum", "poetry", "ritual"} <= set(lineage["data"])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("{museum: 0.7, potery: 0.3}", "stages[0].sft.datasets.potery: dataset 'potery' is not in `data`"),
        ("{museum: 0.7, poetry: 0}", "each with a weight above 0"),
    ],
)
def test_a_bad_mixture_names_the_dataset_or_the_weight(tmp_path, tiny_model, weights, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(mixed_recipe(tmp_path, tiny_model, weights))
    assert message in "\n".join(map(str, info.value.problems))


def test_a_stage_without_dataset_or_datasets_says_which_to_give(tmp_path, tiny_model):
    path = mixed_recipe(tmp_path, tiny_model, "{museum: 1}")
    path.write_text(path.read_text(encoding="utf-8").replace("datasets: {museum: 1}", ""), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert "needs `dataset` (one dataset) or `datasets`" in "\n".join(map(str, info.value.problems))
