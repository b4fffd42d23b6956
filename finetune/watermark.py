"""Text watermarking: green-list watermarks at generation time and their detection in text (`wenmai detect`).

The scheme is transformers' `WatermarkingConfig` (Kirchenbauer et al. 2023, "A Watermark for Large Language
Models"): at each step the previous token and a secret key pick a "green" share of the vocabulary, and
generation adds `bias` to their logits. Detection needs the key, the tokenizer and the model's vocabulary
size, never the weights: it counts how many tokens of a text are green for their predecessor and turns the
count into a z-score against the share that chance gives. The key is read from an environment variable, so
the secret never lives in a file, a recipe or an export.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import WenmaiError
from finetune.generate import export_tokenizer

if TYPE_CHECKING:
    from transformers import WatermarkingConfig

DEFAULT_KEY_ENV = "WENMAI_WATERMARK_KEY"
# Defaults measured on SmolLM2-135M-Instruct, answers of up to 96 tokens, 513 human texts (en + zh):
# scripts/bench/watermark_rates.py, table in scripts/bench/README.md.
BIAS = 2.5  # above the paper's 2.0: a ~100-token answer needs a strong green share (71% reach z 4 at 2.5)
GREENLIST_RATIO = 0.25  # the paper's gamma: a quarter of the vocabulary is green after each token
SEEDING_SCHEME = "lefthash"  # the green list depends on the previous token only: one lookup per step
CONTEXT_WIDTH = 1  # lefthash seeds from the last token whatever the width; a wider one only scores fewer tokens
# z-score: at 4, no human text (0/513) and no unwatermarked answer (0/59) was flagged; at 3, 3 human texts were.
THRESHOLD = 4.0
MIN_SCORED_TOKENS = 16  # below this the normal approximation behind z misleads: no verdict


@dataclass
class Detection:
    """The verdict on one text: tokens scored, z-score, one-sided p-value, and whether z reaches the threshold."""

    tokens: int
    z_score: float | None
    p_value: float | None
    watermarked: bool
    green_fraction: float | None = None
    reason: str | None = None  # why there is no verdict (too short)
    source: str | None = None  # where the text came from: `file:line`, a file, or `-`

    def to_json(self) -> dict:
        out: dict[str, Any] = asdict(self)
        for name in ("z_score", "p_value", "green_fraction"):
            if out[name] is not None:
                out[name] = round(out[name], 6 if name == "p_value" else 3)
        return {k: v for k, v in out.items() if v is not None or k in ("z_score", "p_value")}


def key_from_env(var: str = DEFAULT_KEY_ENV) -> int:
    """The watermark key from environment variable `var`: any string, hashed to a stable integer."""
    secret = os.environ.get(var, "")
    if not secret:
        raise WenmaiError(
            f"the watermark key is read from the environment variable {var}, which is not set or empty; "
            f"set it to the same secret the model was served with (export {var}='your secret'); "
            "the key never lives in a file, a recipe or the export"
        )
    # In [1, 2**32): a key of 0 would seed every green list the same.
    return int.from_bytes(hashlib.sha256(secret.encode("utf-8")).digest()[:8], "big") % (2**32 - 1) + 1


def watermarking_config(
    key: int,
    bias: float = BIAS,
    greenlist_ratio: float = GREENLIST_RATIO,
    seeding_scheme: str = SEEDING_SCHEME,
    context_width: int = CONTEXT_WIDTH,
) -> WatermarkingConfig:
    """The `WatermarkingConfig` to pass to `model.generate(..., watermarking_config=...)`.

    Defaults: bias 2.5 on a green list of a quarter of the vocabulary, seeded by the previous token
    (`lefthash`, width 1). Detection needs the same key, ratio, scheme and width; the bias only sets strength.
    """
    from transformers import WatermarkingConfig

    if not 0 < greenlist_ratio < 1:
        raise WenmaiError(f"watermark greenlist_ratio: {greenlist_ratio} is not between 0 and 1 (exclusive)")
    if seeding_scheme not in ("lefthash", "selfhash"):
        raise WenmaiError(f"watermark seeding_scheme: {seeding_scheme!r} is not one of lefthash, selfhash")
    if context_width < 1:
        raise WenmaiError(f"watermark context_width: {context_width} must be at least 1")
    return WatermarkingConfig(
        greenlist_ratio=greenlist_ratio,
        bias=bias,
        hashing_key=key,
        seeding_scheme=seeding_scheme,
        context_width=context_width,
    )


def detect(
    texts: list[str],
    tokenizer: Any,
    vocab_size: int,
    key: int,
    threshold: float = THRESHOLD,
    *,
    greenlist_ratio: float = GREENLIST_RATIO,
    seeding_scheme: str = SEEDING_SCHEME,
    context_width: int = CONTEXT_WIDTH,
    min_tokens: int = MIN_SCORED_TOKENS,
    ignore_repeated_ngrams: bool = True,
) -> list[Detection]:
    """One `Detection` per text, scored with transformers' `WatermarkDetector` (no model weights needed).

    `vocab_size` is the model config's (what `generate` sized the green lists with), not `len(tokenizer)`.
    `ignore_repeated_ngrams` counts each distinct (previous, current) token pair once: counting every token,
    a phrase repeated in a loop pushes z far up on its own (3 of 60 unwatermarked SmolLM2 answers reached z 4).
    """
    import torch
    from transformers import PreTrainedConfig, WatermarkDetector

    config = watermarking_config(
        key, greenlist_ratio=greenlist_ratio, seeding_scheme=seeding_scheme, context_width=context_width
    )
    # The detector reads vocab_size and bos_token_id from the model config; it drops a leading BOS, which only
    # matters when a text itself starts with one, since texts are tokenized without special tokens.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model_config = PreTrainedConfig(vocab_size=vocab_size, bos_token_id=bos)
    detector = WatermarkDetector(model_config, "cpu", config, ignore_repeated_ngrams=ignore_repeated_ngrams)
    results = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= context_width:
            results.append(_too_short(len(ids) - context_width, min_tokens))
            continue
        # One text at a time: padding a batch would score the pad tokens.
        out = detector(torch.tensor([ids]), z_threshold=threshold, return_dict=True)
        scored = int(out.num_tokens_scored[0])
        if scored < min_tokens:
            results.append(_too_short(scored, min_tokens))
            continue
        z = float(out.z_score[0])
        results.append(Detection(scored, z, float(out.p_value[0]), z >= threshold, float(out.green_fraction[0])))
    return results


def detect_file(
    path_or_dash: str | Path, export_dir: str | Path, key: int, threshold: float = THRESHOLD
) -> list[Detection]:
    """Detect the watermark in a file ("-": stdin) with the tokenizer of an export (or a run with one).

    A file whose non-empty lines are all JSON objects (or any `.jsonl` file) holds one text a line, in its
    `text` or `content` field (`wenmai chat` and the server's answers have `content`); anything else is one text.
    """
    from transformers import AutoConfig

    sources, texts = read_texts(str(path_or_dash))
    folder, tokenizer, _ = export_tokenizer(export_dir, "watermark detection with")
    vocab_size = AutoConfig.from_pretrained(str(folder)).get_text_config().vocab_size
    results = detect(texts, tokenizer, vocab_size, key, threshold)
    for source, result in zip(sources, results, strict=True):
        result.source = source
    return results


def read_texts(path_or_dash: str) -> tuple[list[str], list[str]]:
    """(where each text came from, the texts) of a JSONL file, a plain text file, or stdin ("-")."""
    if path_or_dash == "-":
        content = sys.stdin.read()
    else:
        path = Path(path_or_dash)
        if not path.is_file():
            raise WenmaiError(f"{path}: no such file; give a text or JSONL file, or - to read stdin")
        content = path.read_text(encoding="utf-8")
    # split("\n"), not splitlines(): a JSON line may hold U+2028 and other characters splitlines breaks at.
    lines = [(n, line) for n, line in enumerate(content.split("\n"), 1) if line.strip()]
    if not lines:
        raise WenmaiError(f"{path_or_dash}: there is no text to check (the input is empty)")
    rows = _json_objects(lines)
    if rows is None and path_or_dash.endswith(".jsonl"):
        bad = next(n for n, line in lines if _json_object(line) is None)
        raise WenmaiError(f"{path_or_dash}:{bad}: not a JSON object; a .jsonl file holds one object a line")
    if rows is None:
        return [path_or_dash], [content.strip()]
    sources, texts = [], []
    for n, row in rows:
        text = row.get("text", row.get("content"))
        if not isinstance(text, str):
            raise WenmaiError(
                f"{path_or_dash}:{n}: no `text` or `content` string in this JSON line "
                f"(keys: {', '.join(row) or 'none'}); put the text to check in one of them"
            )
        sources.append(f"{path_or_dash}:{n}")
        texts.append(text)
    return sources, texts


def summary(results: list[Detection]) -> dict:
    """Counts for a report: texts, watermarked, not watermarked, and too short to tell."""
    undecided = sum(r.z_score is None for r in results)
    flagged = sum(r.watermarked for r in results)
    return {
        "texts": len(results),
        "watermarked": flagged,
        "not_watermarked": len(results) - flagged - undecided,
        "too_short": undecided,
    }


def _too_short(scored: int, min_tokens: int) -> Detection:
    return Detection(
        max(scored, 0), None, None, False, reason=f"too short: {max(scored, 0)} tokens scored, needs {min_tokens}"
    )


def _json_objects(lines: list[tuple[int, str]]) -> list[tuple[int, dict]] | None:
    rows = []
    for n, line in lines:
        row = _json_object(line)
        if row is None:
            return None
        rows.append((n, row))
    return rows


def _json_object(line: str) -> dict | None:
    if not line.lstrip().startswith("{"):
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
