"""The tokenised-data cache: a second run reads the rows back and trains on identical batches; anything the rows
depend on (the data file, the template, the data policy) changed is a miss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import chat_rows, tiny_recipe
from tiny_models import write_jsonl

from finetune.data import tokenize_records
from finetune.pipeline import load_recipe


@pytest.fixture
def setup(tmp_path, tiny_model):
    """A recipe on a copy of the tiny model, its tokenizer, and an empty cache folder."""
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    path = tmp_path / "recipe.yaml"
    path.write_text(tiny_recipe(tiny_model, data, tmp_path / "runs"), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    return path, data, tokenizer, tmp_path / "cache"


def tokenize(path: Path, tokenizer, cache: Path, stage_dir: Path | None = None):
    recipe = load_recipe(path).recipe
    return tokenize_records(recipe, "d", tokenizer, 64, True, stage_dir, cache)


def test_second_run_hits_and_gives_identical_rows_and_data_card(setup, tmp_path):
    path, _, tokenizer, cache = setup
    first = tokenize(path, tokenizer, cache, tmp_path / "stage1")
    second = tokenize(path, tokenizer, cache, tmp_path / "stage2")
    assert (first.stats["token_cache"], second.stats["token_cache"]) == ("miss", "hit")
    assert second.rows == first.rows and len(list(cache.glob("*.json"))) == 1

    def card(folder: Path) -> dict:
        text = (folder / "data_card.json").read_text(encoding="utf-8")
        return {k: v for k, v in json.loads(text).items() if k not in ("updated", "stage")}

    assert card(tmp_path / "stage2") == card(tmp_path / "stage1")  # the data layer's report comes back with the rows


def test_cached_rows_give_identical_training_batches(setup, tmp_path):
    from finetune.stages.sft import build_trainer

    path, _, tokenizer, cache = setup
    recipe = load_recipe(path).recipe
    options = recipe.stage_configs()[0]

    def first_batches(rows):
        trainer, _ = build_trainer(recipe, options, tokenizer, rows, None, tmp_path / "stage", "run")
        batches = iter(trainer.get_train_dataloader())
        return [{k: getattr(v, "tolist", lambda v=v: v)() for k, v in next(batches).items()} for _ in range(3)]

    miss = tokenize(path, tokenizer, cache)
    hit = tokenize(path, tokenizer, cache)
    assert hit.stats["token_cache"] == "hit"
    assert first_batches(hit.rows) == first_batches(miss.rows)


def test_a_changed_data_file_misses(setup):
    path, data, tokenizer, cache = setup
    tokenize(path, tokenizer, cache)
    rows = chat_rows(40)
    rows[7]["messages"][1]["content"] = "Du Fu wrote it, not the poet you think."
    write_jsonl(data, rows)
    changed = tokenize(path, tokenizer, cache)
    assert changed.stats["token_cache"] == "miss"
    assert any("Du Fu" in tokenizer.decode(r["input_ids"]) for r in changed.rows)
    assert len(list(cache.glob("*.json"))) == 2


def test_the_same_bytes_under_another_name_hit(setup, tmp_path):
    path, data, tokenizer, cache = setup
    tokenize(path, tokenizer, cache)
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(data, moved)
    path.write_text(path.read_text(encoding="utf-8").replace(str(data), str(moved)), encoding="utf-8")
    assert tokenize(path, tokenizer, cache).stats["token_cache"] == "hit"


def test_the_same_file_augmented_under_another_name_misses_and_is_named_in_its_card(setup, tmp_path):
    """Two datasets on one file, data.augment covering only the second: the second is its own entry (with the
    counterfactual copies), and its card names it, not the first."""
    path, data, tokenizer, cache = setup
    text = path.read_text(encoding="utf-8")
    rows = chat_rows(40)
    rows[3]["messages"][0]["content"] = "他是谁？"
    write_jsonl(data, rows)
    entry = f"  d: {{path: {data}, format: chat}}\n"
    assert entry in text
    text = text.replace(
        entry, entry + f"  d_aug: {{path: {data}, format: chat}}\n  augment: {{pairs: [[他, 她]], datasets: [d_aug]}}\n"
    )
    path.write_text(text, encoding="utf-8")
    recipe = load_recipe(path).recipe
    plain = tokenize_records(recipe, "d", tokenizer, 64, True, tmp_path / "s1", cache)
    augmented = tokenize_records(recipe, "d_aug", tokenizer, 64, True, tmp_path / "s2", cache)
    assert (plain.stats["token_cache"], augmented.stats["token_cache"]) == ("miss", "miss")
    assert len(augmented.rows) == len(plain.rows) + 1
    again = tokenize_records(recipe, "d_aug", tokenizer, 64, True, tmp_path / "s3", cache)
    assert again.stats["token_cache"] == "hit" and again.rows == augmented.rows
    card = json.loads((tmp_path / "s3" / "data_card.json").read_text(encoding="utf-8"))["datasets"][0]
    assert card["name"] == "d_aug" and card["augmented"] == 1


def test_a_changed_template_or_policy_or_sequence_length_misses(setup):
    path, _, tokenizer, cache = setup
    recipe = load_recipe(path).recipe
    base = tokenize_records(recipe, "d", tokenizer, 64, True, None, cache)
    assert base.stats["token_cache"] == "miss"
    assert tokenize_records(recipe, "d", tokenizer, 32, True, None, cache).stats["token_cache"] == "miss"
    assert tokenize_records(recipe, "d", tokenizer, 64, False, None, cache).stats["token_cache"] == "miss"
    policy = recipe.data.policy.model_copy(update={"max_sensitivity": "restricted"})
    stricter = recipe.model_copy(update={"data": recipe.data.model_copy(update={"policy": policy})})
    assert tokenize_records(stricter, "d", tokenizer, 64, True, None, cache).stats["token_cache"] == "miss"
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenize_records(recipe, "d", tokenizer, 64, True, None, cache).stats["token_cache"] == "miss"


def test_a_broken_entry_is_rebuilt_not_read(setup):
    path, _, tokenizer, cache = setup
    first = tokenize(path, tokenizer, cache)
    [entry] = cache.glob("*.json")
    entry.write_text("{not json", encoding="utf-8")
    again = tokenize(path, tokenizer, cache)
    assert again.stats["token_cache"] == "miss" and again.rows == first.rows


def test_without_a_cache_folder_nothing_is_written(setup, tmp_path):
    path, _, tokenizer, _ = setup
    assert tokenize(path, tokenizer, None).stats["token_cache"] == "off"
    assert not (tmp_path / "cache").exists()


def test_a_cache_folder_that_cannot_be_written_does_not_stop_tokenizing(setup, tmp_path, capsys):
    path, _, tokenizer, _ = setup
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be", encoding="utf-8")
    result = tokenize(path, tokenizer, blocked)
    assert result.rows and result.stats["token_cache"] == "miss"
    assert "token_cache: not saved" in capsys.readouterr().err
