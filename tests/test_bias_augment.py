"""Counterfactual augmentation: swaps both ways, Chinese without word boundaries, protected words and names
kept, records without group terms left alone, copies marked with their origin and rights, counts in the card."""

from __future__ import annotations

import json

from tiny_models import write_jsonl

from finetune.config_io import load_recipe
from finetune.data import load_records
from finetune.data.augment import Swapper, augment_records
from finetune.data.card import read_card

PAIRS = [
    ["他", "她"],
    ["男性", "女性"],
    ["男", "女"],
    ["汉族", "藏族"],
    ["he", "she"],
    ["him", "her"],
    ["man", "woman"],
]
PROTECT = ["其他", "他人", "女娲", "男爵", "Hermitage"]


def test_terms_swap_both_ways_in_chinese_and_english():
    swapper = Swapper.build(PAIRS, PROTECT)
    assert swapper.swap("他是一位男性修复师，她是汉族讲解员。")[0] == "她是一位女性修复师，他是藏族讲解员。"
    assert swapper.swap("藏族学生问她：男生还是女生？")[0] == "汉族学生问他：女生还是男生？"
    assert swapper.swap("He told her that she met him. HE left.")[0] == "She told him that he met her. SHE left."
    text, counts = swapper.swap("A man and a woman.")
    assert text == "A woman and a man." and counts == {"man": 1, "woman": 1}


def test_longer_words_and_listed_names_are_never_swapped_inside():
    swapper = Swapper.build(PAIRS, PROTECT)
    # 其他/他人 contain 他, 女娲 (a name) contains 女, 男爵 contains 男: protected; 男性 goes as one term
    assert (
        swapper.swap("其他人和他人都知道女娲的故事，男爵是他的朋友。")[0]
        == "其他人和他人都知道女娲的故事，男爵是她的朋友。"
    )
    # Latin terms only as whole words: not in the, she'd not touched inside shed, Hermitage, human, Manchu
    assert swapper.swap("The shed by the Hermitage; the human Manchu hero.")[0] == (
        "The shed by the Hermitage; the human Manchu hero."
    )


def test_records_without_group_terms_get_no_copy_and_originals_are_unchanged():
    records = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "故宫在哪里？"}, {"role": "assistant", "content": "在北京。"}],
        },
        {
            "id": "b",
            "messages": [{"role": "user", "content": "他会修复青铜器吗？"}, {"role": "assistant", "content": "他会。"}],
        },
    ]
    before = json.dumps(records, ensure_ascii=False)
    copies, swaps = augment_records(records, "chat", Swapper.build(PAIRS, PROTECT))
    assert json.dumps(records, ensure_ascii=False) == before
    assert len(copies) == 1 and swaps == {"他": 2}
    assert copies[0]["messages"][0] == {"role": "user", "content": "她会修复青铜器吗？"}
    assert copies[0]["messages"][1]["role"] == "assistant"  # roles are not text


def test_augmented_copies_carry_origin_licence_and_provenance_and_are_counted_in_the_card(
    write_recipe, tiny_model, tmp_path, cli
):
    rows = [
        {
            "id": f"r{i}",
            "licence": "CC-BY-4.0",
            "source": {"institution": "Palace Museum", "object_id": f"obj-{i}"},
            "messages": [
                {"role": "user", "content": f"第{i}位男性讲解员在哪个展厅？" if i % 2 else f"第{i}件文物是什么？"},
                {"role": "assistant", "content": f"他在第{i}展厅。" if i % 2 else f"是第{i}件青铜器。"},
            ],
        }
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = write_recipe(
        f"""\
        name: aug
        model: {{path: {tiny_model}}}
        data:
          d: {{path: {data}, format: chat}}
          augment:
            pairs: [[他, 她], [男性, 女性]]
        stages:
          - sft: {{dataset: d, max_steps: 1}}
        """
    )
    loaded = load_recipe(recipe).recipe
    stage_dir = tmp_path / "stage"
    records = load_records(loaded, "d", stage_dir).records
    copies = [r for r in records if r.get("augmented")]
    assert len(records) == 9 and len(copies) == 3
    copy = next(r for r in copies if r["augmented"]["from"] == "r1")
    assert copy["id"] == "r1-counterfactual"
    assert copy["licence"] == "CC-BY-4.0" and copy["source"] == rows[1]["source"]
    assert copy["messages"][0]["content"] == "第1位女性讲解员在哪个展厅？"
    assert copy["augmented"]["swaps"] == {"男性": 1, "他": 1}
    card = read_card(stage_dir).datasets[0]
    assert card.kept == 6 and card.augmented == 3 and card.augmented_swaps == {"男性": 3, "他": 3}
    assert "3 counterfactual copies added" in (stage_dir / "data_card.md").read_text(encoding="utf-8")
    # `wenmai data card RECIPE` (no training run) counts the same copies, as the stage will add them
    out = tmp_path / "card"
    code, _, err = cli("data", "card", recipe, "--out", out)
    assert code == 0, err
    standalone = read_card(out).datasets[0]
    assert standalone.augmented == 3 and standalone.augmented_swaps == {"男性": 3, "他": 3}


def test_a_term_pair_with_an_empty_side_is_refused(write_recipe, tiny_model, chat_file, cli):
    recipe = write_recipe(
        f"""\
        name: aug
        model: {{path: {tiny_model}}}
        data:
          d: {{path: {chat_file}, format: chat}}
          augment:
            pairs: [[他, 她], ["", 女]]
            datasets: [d, missing]
        stages:
          - sft: {{dataset: d}}
        """
    )
    code, out, err = cli("validate", recipe)
    assert code == 2
    text = out + err
    assert "data.augment.pairs" in text and "empty side" in text and "recipe.yaml:6" in text
