"""Multiple-choice evaluation: CSV reading with file:line errors, letter scoring, the 'always B' model."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
from tiny_models import write_jsonl

from finetune.errors import DataError
from finetune.evaluation import mc

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MC = ROOT / "recipes" / "data" / "culture-mc"


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def mc_folder(root: Path, answers: str, subjects: int = 2, dev: bool = True) -> Path:
    """Subjects whose answers are the letters of `answers`, spread round-robin over the subjects."""
    rng = random.Random(0)
    rows: dict[int, list[str]] = {s: [] for s in range(subjects)}
    for i, answer in enumerate(answers):
        words = " ".join(rng.choice(["poem", "dynasty", "museum", "bronze", "Tang", "Li Bai"]) for _ in range(5))
        rows[i % subjects].append(
            f"{i},Which is right about {words} {i}?,first {i},second {i},third {i},fourth {i},{answer}"
        )
    for s, lines in rows.items():
        write_csv(root / "test" / f"subject_{s}.csv", ",Question,A,B,C,D,Answer\n" + "\n".join(lines) + "\n")
        if dev:
            write_csv(
                root / "dev" / f"subject_{s}.csv",
                ",Question,A,B,C,D,Answer\n0,Dev question?,w,x,y,z,B\n1,Another?,w,x,y,z,B\n",
            )
    return root


def test_quoted_newlines_stay_in_one_field_and_lines_stay_right(tmp_path):
    path = write_csv(
        tmp_path / "test" / "s.csv",
        """\
        ,Question,A,B,C,D,Answer
        0,"A question
        over two lines?",a,b,c,d,A
        1,Next?,a,b,c,d,E
        """,
    )
    with pytest.raises(DataError) as err:
        mc.read_questions(path)
    assert f"{path}:4: Answer 'E' is not one of A, B, C, D" in str(err.value)
    path.write_text(path.read_text(encoding="utf-8").replace(",E\n", ",C\n"), encoding="utf-8")
    questions = mc.read_questions(path)
    assert questions[0].question == "A question\nover two lines?" and questions[0].where == f"{path}:2"
    assert questions[1].answer == "C" and questions[1].where == f"{path}:4"


def test_malformed_row_is_named_by_file_and_line(tmp_path):
    write_csv(
        tmp_path / "mc" / "test" / "history.csv",
        """\
        ,Question,A,B,C,D,Answer
        0,Good?,a,b,c,d,A
        1,Too few fields,a,b
        2,Empty choice?,a,,c,d,B
        """,
    )
    problems = mc.check_folder(tmp_path / "mc")
    path = tmp_path / "mc" / "test" / "history.csv"
    assert problems == [
        f"{path}:3: 4 fields, expected at least 7 (,Question,A,B,C,D,Answer); is a quote unbalanced?",
        f"{path}:4: empty B",
    ]
    with pytest.raises(DataError, match=r"history\.csv:3: 4 fields"):
        mc.load_folder(tmp_path / "mc")


def test_folder_problems_name_what_is_missing(tmp_path):
    assert "no test/ folder" in mc.check_folder(tmp_path)[0]
    mc_folder(tmp_path / "mc", "AB", subjects=1, dev=False)
    problem = mc.check_folder(tmp_path / "mc", shots=3)[0]
    assert str(tmp_path / "mc" / "dev" / "subject_0.csv") in problem and "3-shot" in problem


def test_ceval_and_headerless_mmlu_files_read_by_column(tmp_path):
    ceval = write_csv(tmp_path / "ceval.csv", "id,question,A,B,C,D,answer,explanation\n0,Q?,a,b,c,d,b,because\n")
    mmlu = write_csv(tmp_path / "astronomy_test.csv", 'What is "near"?,a,b,c,d,D\n')
    assert mc.read_questions(ceval)[0].answer == "B"
    assert mc.read_questions(mmlu)[0].question == 'What is "near"?'
    assert mc._subject_name(mmlu, "test") == "astronomy"


def test_shipped_folder_is_balanced_and_few_shot_ready():
    subjects = mc.load_folder(SHIPPED_MC, shots=5)
    assert {s.name for s in subjects} == {"heritage_sites", "tang_poetry"}
    for subject in subjects:
        assert len(subject.dev) == 5
        counts = {letter: sum(q.answer == letter for q in subject.test) for letter in mc.LETTERS}
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    languages = {s.name: s.language for s in subjects}
    assert languages == {"heritage_sites": "en", "tang_poetry": "zh"}


def test_few_shot_examples_are_earlier_turns():
    subject = mc.load_folder(SHIPPED_MC, shots=2)[1]
    messages = mc.messages_for(subject, subject.test[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages if m["role"] == "assistant"] == ["A", "B"]
    assert messages[0]["content"].startswith("以下是关于tang poetry的单项选择题")
    assert messages[-1]["content"].endswith("D. 王维")


def test_wilson_interval_matches_the_closed_form():
    low, high = mc.wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(1.96**2 / (10 + 1.96**2))
    low, high = mc.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + 1.96**2))
    low, high = mc.wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_parse_letter_takes_the_first_standalone_letter():
    assert mc.parse_letter("答案是：C。") == "C"
    assert mc.parse_letter("B. Li Bai") == "B"
    assert mc.parse_letter("A good question; the answer is D") == "D"
    assert mc.parse_letter("no letter here") is None


def test_a_model_folder_to_evaluate_does_not_inherit_the_recipes_trust_remote_code(tiny_model, tmp_path):
    from finetune.evaluation.targets import parse_target
    from finetune.recipe import Recipe

    recipe = Recipe.model_validate(
        {
            "name": "trusting",
            "model": {"path": str(tiny_model), "trust_remote_code": True, "dtype": "float32"},
            "data": {"d": {"path": "d.jsonl", "format": "chat"}},
            "stages": [{"sft": {"dataset": "d"}}],
        }
    )
    other = parse_target(str(tiny_model), recipe=recipe)
    assert other.section.trust_remote_code is False and other.section.dtype == "float32"
    assert parse_target("base", recipe=recipe).section.trust_remote_code is True  # the recipe's own model


def test_batched_scores_equal_one_at_a_time(tiny_model):
    from finetune.evaluation import lm
    from finetune.evaluation.targets import folder_target, load

    model, tokenizer = load(folder_target(tiny_model))
    subject = mc.load_folder(SHIPPED_MC, shots=2)[0]
    prompts = [lm.render_prompt(tokenizer, mc.messages_for(subject, q)) for q in subject.test]
    batched, _ = lm.choice_logprobs(model, tokenizer, prompts, mc.LETTERS, batch_size=5)
    single, _ = lm.choice_logprobs(model, tokenizer, prompts, mc.LETTERS, batch_size=1)
    assert len({len(p) for p in prompts}) > 1, "prompts of one length would not exercise padding"
    for a, b in zip(batched, single, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    uncached, _ = lm.choice_logprobs(model, tokenizer, prompts, mc.LETTERS, batch_size=5, share_prefix=False)
    assert lm._shared_prefix([lm.encode(tokenizer, p) for p in prompts], 1) > lm.MIN_SHARED_PREFIX, (
        "the few-shot prefix was not shared"
    )
    for a, b in zip(batched, uncached, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    multi, _ = lm.choice_logprobs(model, tokenizer, prompts[:3], ("A", "Li Bai", "museum", "D"), batch_size=2)
    alone = [
        lm.choice_logprobs(model, tokenizer, [p], ("A", "Li Bai", "museum", "D"), batch_size=1, share_prefix=False)[0][
            0
        ]
        for p in prompts[:3]
    ]
    for a, b in zip(multi, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_model_trained_to_answer_b_scores_exactly_the_share_of_b(tmp_path, tiny_model, cli, monkeypatch):
    """SFT teaches the tiny model to reply "B" to any question; its accuracy must be #B / #questions."""
    answers = "BBACDBCADBAC"  # 4 of 12 are B
    folder = mc_folder(tmp_path / "mc", answers)
    rng = random.Random(1)
    train = []
    for i in range(48):
        topic = " ".join(
            rng.choice(["poem", "dynasty", "museum", "bronze", "Tang", "Li Bai", "Beijing"]) for _ in range(6)
        )
        subject = mc.Subject(f"s{i % 3}", [mc.Question(f"About {topic}?", ("w", "x", "y", "z"), "B", "")])
        train.append({"messages": [*mc.messages_for(subject, subject.test[0]), {"role": "assistant", "content": "B"}]})
    data = write_jsonl(tmp_path / "always_b.jsonl", train)
    recipe = write_csv(
        tmp_path / "r.yaml",
        f"""\
        name: always-b
        model: {{path: {tiny_model}}}
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
        data:
          b: {{path: {data}, format: chat}}
        stages:
          - sft: {{dataset: b, max_steps: 30, batch_size: 8, learning_rate: 0.05, warmup: 0, lr_scheduler: constant, seq_len: 256, save_steps: 100}}
          - evaluate: {{mc: {folder}, shots: 1, baseline: none}}
        output: {{root: {tmp_path / "runs"}}}
        """,
    )
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "runs" / "b")
    assert code == 0, out + err
    evaluation = json.loads((tmp_path / "runs" / "b" / "evaluate" / "evaluation.json").read_text(encoding="utf-8"))
    overall = evaluation["checkpoints"][0]["mc"][0]["overall"]
    assert overall["predicted"] == {"B": 12}, overall["predicted"]
    assert overall["correct"] == answers.count("B") and overall["accuracy"] == round(100 * 4 / 12, 2)

    # the same adapter, merged into a plain folder (what export writes), scores the same through `wenmai eval`
    merged = merge_into_folder(tmp_path / "runs" / "b", tmp_path / "merged", tiny_model)
    code, out, err = cli(
        "eval",
        merged,
        "--mc",
        folder,
        "--shots",
        "1",
        "--compare",
        f"{tmp_path / 'runs' / 'b'}/sft,base",
        "--output",
        tmp_path / "cmp.json",
    )
    assert code == 0, out + err
    compared = json.loads((tmp_path / "cmp.json").read_text(encoding="utf-8"))["checkpoints"]
    assert [c["label"] for c in compared] == ["merged", "b/sft", "base"]
    assert [c["mc"][0]["overall"]["correct"] for c in compared[:2]] == [4, 4]
    assert compared[2]["mc"][0]["overall"]["predicted"] != {"B": 12}, "the base model should not always answer B"
    assert "merged" in out and "overall" in out

    # without --output, `wenmai eval RUN` files its results in the run folder, not the current one
    monkeypatch.chdir(tmp_path / "merged")
    code, out, err = cli("eval", tmp_path / "runs" / "b", "--mc", folder, "--shots", "1")
    assert code == 0, out + err
    [written] = (tmp_path / "runs" / "b").glob("eval-*.json")
    assert json.loads(written.read_text(encoding="utf-8"))["checkpoints"][0]["label"] == "b/sft"
    assert not list((tmp_path / "merged").glob("*eval*.json"))


def merge_into_folder(run: Path, target: Path, base: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(run / "sft" / "adapter")
    ).merge_and_unload()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(run / "sft" / "tokenizer").save_pretrained(target)
    return target


def test_eval_command_names_what_is_missing(tmp_path, cli):
    code, _, err = cli("eval", "base", "--mc", SHIPPED_MC)
    assert code == 2 and "'base' needs a recipe: give a run folder as well, or --recipe FILE" in err
    code, _, err = cli("eval", tmp_path, "--mc", SHIPPED_MC)
    assert code == 2 and f"cannot evaluate {str(tmp_path)!r}: give `base`, a run folder" in err
    code, _, err = cli("eval", "base", "--mc", SHIPPED_MC, "--shots", "zero")
    assert code == 2 and "--shots takes numbers separated by commas" in err
    code, _, err = cli("eval", "base")
    assert code == 2 and "give --mc DIR" in err
    bad = mc_folder(tmp_path / "bad", "AE", subjects=1)
    code, _, err = cli("eval", "base", "--recipe", ROOT / "recipes" / "smoke.yaml", "--mc", bad)
    assert code == 2 and f"{bad / 'test' / 'subject_0.csv'}:3: Answer 'E' is not one of A, B, C, D" in err


def test_validate_reports_bad_rows_before_any_model_loads(tmp_path, chat_file):
    from finetune.errors import ConfigError
    from finetune.pipeline import load_recipe

    bad = mc_folder(tmp_path / "mc", "AB", subjects=1)
    csv_file = bad / "test" / "subject_0.csv"
    csv_file.write_text(csv_file.read_text(encoding="utf-8") + "9,Broken row,a,b\n", encoding="utf-8")
    recipe = write_csv(
        tmp_path / "r.yaml",
        f"""\
        name: v
        model: {{path: {tmp_path / "no-model-needed"}}}
        data:
          d: {{path: {chat_file}, format: chat}}
        stages:
          - evaluate: {{mc: mc, shots: 5}}
        """,
    )
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    text = str(err.value)
    assert f"stages[0].evaluate.mc: {csv_file}:4: 4 fields, expected at least 7" in text
    assert (
        f"stages[0].evaluate.mc: {bad / 'dev' / 'subject_0.csv'}: 2 questions, fewer than the 5 shots asked for" in text
    )
    assert f"({recipe}:6)" in text
