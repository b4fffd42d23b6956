"""Dedup: exact and near duplicates in Chinese, distinct poems kept, and overlap with evaluation sets."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from test_data_policy import chat, make_recipe
from tiny_models import write_jsonl

from finetune.data import load_records
from finetune.data.dedup import Deduplicator
from finetune.errors import ConfigError, WenmaiError
from finetune.pipeline import load_recipe
from finetune.recipe.data_policy import DedupOptions

ROOT = Path(__file__).resolve().parent.parent
LABELLED = json.loads((Path(__file__).parent / "data" / "near_dup_zh.json").read_text(encoding="utf-8"))


def verdicts(options: DedupOptions, texts: list[str]) -> list[str | None]:
    dedup = Deduplicator(options)
    return [dedup.verdict([t]) for t in texts]


def test_exact_duplicates_ignore_spacing_case_punctuation_and_width():
    texts = [
        "《静夜思》是李白的诗。",
        "《静夜思》 是李白的诗",
        "静夜思是李白的诗！",
        "Ｌｉ Ｂａｉ wrote it.",
        "li bai wrote it",
    ]
    assert verdicts(DedupOptions(exact=True), texts) == [None, "exact", "exact", None, "exact"]


def test_chinese_paraphrases_are_found_as_near_duplicates():
    options = DedupOptions(near=True)  # defaults: runs of 1-2 units, threshold 0.55 (scripts/bench/dedup_threshold.py)
    found = [verdicts(options, pair)[1] == "near" for pair in LABELLED["paraphrases"]]
    assert sum(found) >= 8, found  # measured: 8 of 12 at the default threshold, 11 of 12 at 0.5
    assert all(found[i] for i in (0, 4, 7)), found  # the lightly reworded ones are always caught


def test_distinct_poems_sharing_phrases_are_kept():
    options = DedupOptions(near=True)
    assert [verdicts(options, pair)[1] for pair in LABELLED["distinct"]] == [None] * len(LABELLED["distinct"])


def test_the_shipped_sample_data_has_no_near_duplicates(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml").recipe
    report = load_records(recipe, "culture").report
    assert report.kept == report.records_read == 329 and report.duplicates == {}


def test_training_records_that_repeat_an_eval_question_are_dropped(tmp_path, tiny_model):
    question = "下列哪位诗人被后世称为“诗圣”，其诗作被称为“诗史”？"
    mc = tmp_path / "cmmlu" / "test"
    mc.mkdir(parents=True)
    (mc / "chinese_literature.csv").write_text(
        f",Question,A,B,C,D,Answer\n0,{question},李白,杜甫,白居易,王维,B\n"
        '1,"《兰亭集序》的作者是谁？\n（单选）",王羲之,颜真卿,柳公权,欧阳询,A\n',
        encoding="utf-8",
    )
    answers = [
        "莫高窟在敦煌。",
        "兵马俑在西安。",
        "赵州桥建于隋代。",
        "故宫旧称紫禁城。",
        "长城大多修于明代。",
        "拙政园在苏州。",
    ]
    rows = [chat(i, answer) for i, answer in enumerate(answers)]
    for row, place in zip(rows, ["甘肃", "陕西", "河北", "北京", "北方", "江苏"], strict=True):
        row["messages"][0]["content"] = f"{place}有什么著名古迹？"
    rows += [chat(6, "杜甫。"), chat(7, "是杜甫。")]
    rows[6]["messages"][0]["content"] = question  # verbatim
    rows[7]["messages"][0]["content"] = "下列哪一位诗人被后世称为“诗圣”，他的诗作被称为“诗史”？"  # reworded
    policy = f"dedup: {{near: true, check_against: [{tmp_path / 'cmmlu'}]}}"
    report = load_records(load_recipe(make_recipe(tmp_path, tiny_model, rows, policy)).recipe, "d").report
    assert report.kept == 6
    assert report.duplicates == {"eval: cmmlu/test/chinese_literature.csv": 2}


def test_train_set_is_checked_against_the_recipes_eval_dataset(tmp_path, tiny_model):
    train = [chat(i) for i in range(6)]
    held_out = write_jsonl(tmp_path / "eval.jsonl", [chat(3), chat(40)])
    path = make_recipe(tmp_path, tiny_model, train, stage_extra=", eval_dataset: e")
    path.write_text(
        path.read_text().replace("stages:", f"  e: {{path: {held_out}, format: chat}}\nstages:"), encoding="utf-8"
    )
    recipe = load_recipe(path).recipe
    assert load_records(recipe, "d").report.duplicates == {"eval: dataset e": 1}
    assert load_records(recipe, "e").report.kept == 2  # an eval set is never filtered against training data


def test_near_dedup_without_datasketch_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_datasketch(name, *args, **kwargs):
        if name.startswith("datasketch"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasketch)
    with pytest.raises(WenmaiError, match=r"pip install 'wenmai\[data\]'"):
        Deduplicator(DedupOptions(near=True))


def test_check_against_a_missing_folder_is_named(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match=r"data.policy.dedup.check_against\[0\]: .*nope not found"):
        load_recipe(make_recipe(tmp_path, tiny_model, [chat(0)], f"dedup: {{check_against: [{tmp_path / 'nope'}]}}"))


def test_near_duplicates_are_found_in_every_segment_of_the_index(monkeypatch):
    from finetune.data import lsh

    monkeypatch.setattr(lsh, "BUFFER_RECORDS", 3)  # sort entries into segments (and merge them) every 3 records
    monkeypatch.setattr(lsh, "CHUNK_RECORDS", 4)  # and spread signatures over several blocks
    originals = [pair[0] for pair in LABELLED["paraphrases"]]
    rewordings = [pair[1] for pair in LABELLED["paraphrases"]]
    dedup = Deduplicator(DedupOptions(near=True, threshold=0.5))
    assert [dedup.verdict([t]) for t in originals] == [None] * len(originals)
    assert len(dedup.near._lsh._segments) > 1 and dedup.near._lsh.count == len(originals)
    found = [dedup.verdict([t]) for t in rewordings]
    assert found.count("near") >= 10, found  # 11 of 12 at 0.5 (scripts/bench/dedup_threshold.py)
