"""Multiple-choice knowledge tests: CMMLU / C-Eval / MMLU-style CSV folders, scored by answer letters.

A folder holds `test/<subject>.csv` and, for few-shot, `dev/<subject>.csv`; every file is a subject,
so the same code runs on subjects it has never seen. A question is shown through the tokenizer's
chat template (few-shot examples as earlier user/assistant turns) and the model's answer is the
letter A-D with the highest log-likelihood as the first token(s) of its reply, or, with
`method="generate"`, the first letter of a short greedy reply.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import DataError, WenmaiError
from finetune.evaluation import lm
from finetune.evaluation.results import McScore, SubjectScore

LETTERS = ("A", "B", "C", "D")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_LEADING_LETTER = re.compile(r"^\W*([A-D])(?:\s*$|\s*[.)．:：、，,。）])")
_STATED_LETTER = re.compile(r"(?:answer|答案|选项)(?:\s*is)?[\s是为:：应该选]*[(（]?([A-D])(?![A-Za-z])", re.IGNORECASE)
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])(?!\s+[a-z])")  # not the article in "A good answer"
MAX_PROBLEMS = 20  # bad rows listed before "... and N more"


@dataclass(frozen=True)
class Question:
    """One question; `where` is its `file:line`."""

    question: str
    choices: tuple[str, str, str, str]
    answer: str
    where: str


@dataclass
class Subject:
    """A subject: its test questions and the dev questions used as few-shot examples."""

    name: str
    test: list[Question]
    dev: list[Question] = field(default_factory=list)

    @property
    def language(self) -> str:
        """zh when the questions are Chinese (the prompt is then Chinese too), else en."""
        sample = "".join(q.question for q in self.test[:20])
        return "zh" if _CJK.search(sample) else "en"


def load_folder(folder: str | Path, shots: int = 0, limit: int | None = None) -> list[Subject]:
    """Every subject in `folder` (`test/*.csv`, and `dev/*.csv` when `shots` > 0); raises `DataError`."""
    folder = Path(folder)
    problems = check_folder(folder, shots)
    if problems:
        raise DataError(f"multiple-choice folder {folder} has problems:\n  - " + "\n  - ".join(problems))
    subjects = []
    for name, test_path in _test_files(folder):
        test = read_questions(test_path)[: limit or None]
        dev_path = _dev_file(folder, name)
        dev = read_questions(dev_path)[:shots] if shots and dev_path else []
        subjects.append(Subject(name, test, dev))
    return subjects


def check_folder(folder: str | Path, shots: int = 0) -> list[str]:
    """Problems with a multiple-choice folder, each naming the file (and line); empty when it is usable."""
    folder = Path(folder)
    if not (folder / "test").is_dir():
        return [
            f"{folder}: no test/ folder; a multiple-choice folder holds test/<subject>.csv and optional dev/<subject>.csv"
        ]
    tests = _test_files(folder)
    if not tests:
        return [
            f"{folder / 'test'}: no .csv files; each subject is one CSV file with the header ,Question,A,B,C,D,Answer"
        ]
    problems: list[str] = []
    for name, test_path in tests:
        problems += _file_problems(test_path)
        dev_path = _dev_file(folder, name)
        if shots and dev_path is None:
            problems.append(
                f"{folder / 'dev' / (name + '.csv')}: missing; {shots}-shot evaluation takes its examples from dev/"
            )
        elif shots and dev_path is not None:
            examples, dev_problems = _parse(dev_path)
            problems += _cap(dev_problems)
            if not dev_problems and len(examples) < shots:
                problems.append(
                    f"{dev_path}: {len(examples)} questions, fewer than the {shots} shots asked for; lower `shots`"
                )
    return problems


def read_questions(path: Path) -> list[Question]:
    """The questions of one CSV file; raises `DataError` listing every bad row by file:line."""
    questions, problems = _parse(Path(path))
    if problems:
        raise DataError(f"{path} has bad rows:\n  - " + "\n  - ".join(_cap(problems)))
    return questions


def messages_for(subject: Subject, question: Question) -> list[dict]:
    """The chat turns for one question: the few-shot examples as earlier turns, then the question."""
    header = _HEADERS[subject.language].format(subject=subject.name.replace("_", " "))
    messages: list[dict] = []
    for i, example in enumerate([*subject.dev, question]):
        text = (header + "\n\n" if i == 0 else "") + format_question(example)
        messages.append({"role": "user", "content": text})
        if example is not question:
            messages.append({"role": "assistant", "content": example.answer})
    return messages


def format_question(question: Question) -> str:
    """The question text followed by its four lettered choices."""
    lines = [question.question] + [
        f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True)
    ]
    return "\n".join(lines)


def evaluate(
    model: Any,
    tokenizer: Any,
    subjects: list[Subject],
    shots: int,
    method: str = "loglik",
    batch_size: int = 8,
    max_length: int = 2048,
    label: str = "",
    name: str = "mc",
) -> McScore:
    """Accuracy per subject and overall (Wilson 95% interval) of one loaded model."""

    started = time.perf_counter()
    scores = []
    for subject in subjects:
        prompts = [lm.render_prompt(tokenizer, messages_for(subject, q)) for q in subject.test]
        desc = f"{label} {subject.name} ({shots}-shot)".strip()
        if method == "generate":
            replies = lm.generate(
                model, tokenizer, prompts, max_new_tokens=8, batch_size=batch_size, max_length=max_length, desc=desc
            )
            predicted = [parse_letter(reply) for reply in replies]
            truncated = sum(lm.too_long(tokenizer, p, max_length) for p in prompts)
        else:
            logprobs, truncated = lm.choice_logprobs(
                model, tokenizer, prompts, LETTERS, batch_size, max_length, desc=desc
            )
            predicted = [LETTERS[max(range(len(LETTERS)), key=row.__getitem__)] for row in logprobs]
        answers = [q.answer for q in subject.test]
        scores.append(subject_score(subject.name, predicted, answers, truncated))
    return McScore(
        name=name,
        shots=shots,
        method=method,
        subjects=scores,
        overall=subject_score(
            "overall", [p for s in scores for p in s.predictions], [a for s in scores for a in s.answers]
        ).model_copy(update={"predictions": [], "answers": []}),
        macro_accuracy=round(sum(s.accuracy for s in scores) / len(scores), 2) if scores else 0.0,
        seconds=round(time.perf_counter() - started, 2),
    )


def subject_score(name: str, predicted: list[str | None], answers: list[str], truncated: int = 0) -> SubjectScore:
    """Accuracy (percent) with its Wilson 95% interval and how often each letter was predicted."""
    correct = sum(p == a for p, a in zip(predicted, answers, strict=True))
    low, high = wilson_interval(correct, len(answers))
    return SubjectScore(
        subject=name,
        correct=correct,
        total=len(answers),
        accuracy=_pct(correct, len(answers)),
        ci_low=round(100 * low, 2),
        ci_high=round(100 * high, 2),
        truncated=truncated,
        predicted=dict(Counter(p or "none" for p in predicted)),
        predictions=list(predicted),
        answers=list(answers),
    )


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (sound for small samples and for 0% / 100%)."""
    if total == 0:
        return 0.0, 0.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_letter(reply: str) -> str | None:
    """The answer letter of a generated reply: a leading letter, a stated one ("答案是 C"), or the first lone one."""
    for pattern in (_LEADING_LETTER, _STATED_LETTER, _LONE_LETTER):
        match = pattern.search(reply.strip())
        if match:
            return match.group(1)
    return None


# --- reading CSV ------------------------------------------------------------------------------

_HEADERS = {
    "zh": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项（A、B、C 或 D）。",
    "en": "The following is a multiple choice question about {subject}. Answer with the letter of the correct choice (A, B, C or D) only.",
}
_COLUMNS = ("question", "a", "b", "c", "d", "answer")


def _test_files(folder: Path) -> list[tuple[str, Path]]:
    return [(_subject_name(p, "test"), p) for p in sorted((folder / "test").glob("*.csv"))]


def _dev_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / "dev" / f"{name}.csv", folder / "dev" / f"{name}_dev.csv"):
        if candidate.is_file():
            return candidate
    return None


def _subject_name(path: Path, split: str) -> str:
    return path.stem.removesuffix(f"_{split}")  # MMLU names files astronomy_test.csv


def _file_problems(path: Path) -> list[str]:
    return _cap(_parse(path)[1])


def _parse(path: Path) -> tuple[list[Question], list[str]]:
    """Questions and problems (`file:line: ...`); the header is named columns, or none (MMLU: 6 fields)."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as err:
        raise WenmaiError(f"{path}: cannot read ({err})") from None
    questions: list[Question] = []
    problems: list[str] = []
    with handle:
        reader = csv.reader(handle)
        line = 1
        columns: dict[str, int] | None = None
        try:
            for row in reader:
                where, line = f"{path}:{line}", reader.line_num + 1  # a quoted field may span lines
                if columns is None:
                    columns = _columns(row)
                    if columns is not None:
                        continue
                    if len(row) != 6:
                        problems.append(
                            f"{where}: no header; expected ,Question,A,B,C,D,Answer (or 6 fields without a header)"
                        )
                        return [], problems
                    columns = dict(zip(_COLUMNS, range(6), strict=True))
                if not any(cell.strip() for cell in row):
                    continue
                question, problem = _question(row, columns, where)
                if problem:
                    problems.append(problem)
                else:
                    questions.append(question)
        except csv.Error as err:
            problems.append(f"{path}:{reader.line_num}: not valid CSV ({err})")
        except UnicodeDecodeError:
            problems.append(f"{path}: not UTF-8 text; save the file as UTF-8")
    if not questions and not problems:
        problems.append(f"{path}: no questions")
    return questions, problems


def _columns(row: list[str]) -> dict[str, int] | None:
    names = [cell.strip().lower() for cell in row]
    if "question" not in names or "answer" not in names:
        return None
    return {name: names.index(name) for name in _COLUMNS if name in names}


def _question(row: list[str], columns: dict[str, int], where: str) -> tuple[Question | None, str | None]:
    missing = [name for name in _COLUMNS if name not in columns]
    if missing:
        return (
            None,
            f"{where}: the header lacks the column(s) {', '.join(m.upper() if len(m) == 1 else m for m in missing)}",
        )
    needed = max(columns.values()) + 1
    if len(row) < needed:
        return (
            None,
            f"{where}: {len(row)} fields, expected at least {needed} (,Question,A,B,C,D,Answer); is a quote unbalanced?",
        )
    values = {name: row[i].strip() for name, i in columns.items()}
    answer = values["answer"].upper()
    if answer not in LETTERS:
        return None, f"{where}: Answer {values['answer']!r} is not one of A, B, C, D"
    empty = [name for name in _COLUMNS[:5] if not values[name]]
    if empty:
        return None, f"{where}: empty {', '.join(n if n == 'question' else n.upper() for n in empty)}"
    choices = (values["a"], values["b"], values["c"], values["d"])
    return Question(values["question"], choices, answer, where), None


def _cap(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more"]


def _pct(part: int, whole: int) -> float:
    return round(100 * part / whole, 2) if whole else 0.0
