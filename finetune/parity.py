"""The parity gate: a fixed probe set through a reference model and candidates; logits and greedy text compared.

The reference generates greedily on each probe prompt; every model then reads the same token ids (prompt plus
that continuation) in one forward pass, so the next-token logits at each step line up exactly. A candidate
whose greedy argmax matches the reference at every step would also generate the same text on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.data import load_records
from finetune.data.chat import render, to_messages
from finetune.recipe import Tolerance

BUILTIN_PROMPTS = (
    "用一句话介绍故宫博物院。",
    "请把“床前明月光，疑是地上霜”翻译成英文。",
    "Who was Li Bai, in one sentence?",
    "Name one thing the Silk Road carried between China and Europe.",
)
MAX_PROMPT_TOKENS = 256


# Measured on SmolLM2-135M (scripts/bench/merge_export.py) with about 3x headroom; tiny models sit far below.
# fp32 merges differ from the unmerged adapter only by float rounding; 16-bit stores round every weight.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_abs_logit_diff=2e-3, mean_kl=1e-6, min_greedy_agreement=1.0),
    "float16": Tolerance(max_abs_logit_diff=0.5, mean_kl=5e-4, min_greedy_agreement=0.5),
    "bfloat16": Tolerance(max_abs_logit_diff=3.0, mean_kl=1e-2, min_greedy_agreement=0.5),
    "gguf-f32": Tolerance(max_abs_logit_diff=2e-3, mean_kl=1e-6, min_greedy_agreement=1.0),
    "gguf-f16": Tolerance(max_abs_logit_diff=0.5, mean_kl=5e-4, min_greedy_agreement=0.5),
    "gguf-bf16": Tolerance(max_abs_logit_diff=3.0, mean_kl=1e-2, min_greedy_agreement=0.5),
    "gguf-q8_0": Tolerance(max_abs_logit_diff=5.0, mean_kl=2e-2, min_greedy_agreement=0.5),
}


def default_tolerance(*kinds: str) -> Tolerance:
    """The default tolerance for a dtype (`float32`, ...) or GGUF type (`gguf-q8_0`, ...); the loosest of several."""
    chosen = [DEFAULT_TOLERANCES[k] for k in kinds]
    return Tolerance(
        max_abs_logit_diff=max(t.max_abs_logit_diff for t in chosen),
        mean_kl=max(t.mean_kl for t in chosen),
        min_greedy_agreement=min(t.min_greedy_agreement for t in chosen),
    )


def tokenizer_agreement(tokenizer: Any, probes: list[Probe]) -> float:
    """Share of probe prompts `tokenizer` encodes to exactly the ids training's tokenizer gave."""
    same = sum(
        tokenizer(p.text, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:] == p.input_ids for p in probes
    )
    return same / max(len(probes), 1)


@dataclass
class Probe:
    """One probe prompt: where it came from, its text, and its token ids."""

    source: str  # `data:culture#3` or `builtin#1`
    text: str
    input_ids: list[int]


@dataclass
class Trace:
    """The reference's greedy continuation of a probe and its next-token logits at each step."""

    probe: Probe
    continuation: list[int]
    logits: Any  # float32 tensor [steps, vocab]


@dataclass
class Comparison:
    """Drift of one candidate from the reference, and the gate's verdict."""

    name: str
    tolerance: Tolerance
    max_abs_logit_diff: float = 0.0
    mean_kl: float = 0.0
    max_kl: float = 0.0
    top1_agreement: float = 1.0
    greedy_agreement: float = 1.0
    steps: int = 0
    probes: int = 0
    diverging: list[dict] = field(default_factory=list)  # first differing step of each probe that diverged
    reference: str = "reference"
    tokenizer_agreement: float | None = None  # share of probe prompts a rebuilt tokenizer encodes identically

    @property
    def failures(self) -> list[str]:
        tol, out = self.tolerance, []
        if not self.max_abs_logit_diff <= tol.max_abs_logit_diff:  # `not <=` also catches NaN
            out.append(f"max |logit diff| {self.max_abs_logit_diff:.3g} > {tol.max_abs_logit_diff:g}")
        if not self.mean_kl <= tol.mean_kl:
            out.append(f"mean KL {self.mean_kl:.3g} > {tol.mean_kl:g}")
        if not self.greedy_agreement >= tol.min_greedy_agreement:
            out.append(f"greedy agreement {self.greedy_agreement:.0%} < {tol.min_greedy_agreement:.0%}")
        if self.tokenizer_agreement is not None and self.tokenizer_agreement < 1:
            out.append(f"its tokenizer encodes {1 - self.tokenizer_agreement:.0%} of the probe prompts differently")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "passed": self.passed,
            "failures": self.failures,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "mean_kl": self.mean_kl,
            "max_kl": self.max_kl,
            "top1_agreement": round(self.top1_agreement, 4),
            "greedy_agreement": round(self.greedy_agreement, 4),
            "steps": self.steps,
            "probes": self.probes,
            "tolerance": self.tolerance.model_dump(),
            "diverging": self.diverging[:5],
            **({} if self.tokenizer_agreement is None else {"tokenizer_agreement": self.tokenizer_agreement}),
        }

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (
            f"{self.name}: max |logit diff| {self.max_abs_logit_diff:.3g}, mean KL {self.mean_kl:.3g}, "
            f"greedy agreement {self.greedy_agreement:.0%} ({self.probes} probes) — {verdict}"
        )


def build_probes(recipe: Any, tokenizer: Any, dataset: str | None, count: int) -> list[Probe]:
    """The first `count` prompts of `dataset` (rendered with the chat template) plus the built-in bilingual ones."""

    texts: list[tuple[str, str]] = []
    if dataset is not None and count > 0:
        section = recipe.data[dataset]
        for i, record in enumerate(load_records(recipe, dataset).records[:count]):
            if section.record_format == "text":
                texts.append((f"data:{dataset}#{i}", record["text"][:400]))
                continue
            messages = to_messages(record, section.record_format, section.system_prompt)
            last_user = max(j for j, m in enumerate(messages) if m["role"] != "assistant")
            texts.append(
                (f"data:{dataset}#{i}", render(tokenizer, messages[: last_user + 1], add_generation_prompt=True))
            )
    for i, prompt in enumerate(BUILTIN_PROMPTS):
        texts.append(
            (f"builtin#{i}", render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True))
        )
    probes = []
    for source, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:]
        probes.append(Probe(source, text, ids))
    return probes


def probe_dataset(recipe: Any, wanted: str | None) -> str | None:
    """The dataset probes come from: the stage option, else the first training stage's, else the first chat data.

    None when that file is not on this machine (a run exported elsewhere): the built-in probes still run.
    """
    from pathlib import Path

    name = wanted
    for config in recipe.stage_configs():
        if name is None and isinstance(getattr(config, "dataset", None), str) and config.dataset in recipe.data:
            name = config.dataset
    if name is None:
        name = next((n for n, section in recipe.data.items() if section.record_format in ("chat", "instruction")), None)
    path = recipe.data[name].path if name is not None else None
    return name if path is not None and Path(path).is_file() else None


def trace(model: Any, probes: list[Probe], stop_ids: list[int], max_new_tokens: int) -> list[Trace]:
    """Generate greedily from the reference and record its next-token logits along that path."""
    import torch

    traces = []
    device = _device(model)
    for probe in probes:
        prompt = torch.tensor([probe.input_ids], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=stop_ids[0],
                temperature=None,
                top_p=None,
                top_k=None,
            )
        continuation = out[0, len(probe.input_ids) :].tolist()
        traces.append(Trace(probe, continuation, step_logits(model, probe.input_ids, continuation)))
    return traces


def step_logits(model: Any, prompt: list[int], continuation: list[int]) -> Any:
    """Next-token logits (float32, CPU) after the prompt and after each continuation token but the last."""
    import torch

    ids = torch.tensor([prompt + continuation], device=_device(model))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(prompt) - 1
    return logits[start : start + max(len(continuation), 1)].cpu()


def compare(
    name: str, model: Any, traces: list[Trace], tolerance: Tolerance, reference: str = "reference"
) -> Comparison:
    """Run the candidate on the reference's probe paths and measure its drift."""
    import torch

    result = Comparison(name, tolerance, probes=len(traces), reference=reference)
    kls, top1, agreeing = [], 0, 0
    for t in traces:
        cand = step_logits(model, t.probe.input_ids, t.continuation)
        if cand.shape[-1] != t.logits.shape[-1]:
            n = min(cand.shape[-1], t.logits.shape[-1])  # padded vocab rows hold no token
            cand, ref = cand[..., :n], t.logits[..., :n]
        else:
            ref = t.logits
        diff = (cand - ref).abs().max().item()
        result.max_abs_logit_diff = max(result.max_abs_logit_diff, diff) if diff == diff else float("nan")
        ref_logp, cand_logp = ref.log_softmax(-1), cand.log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).clamp_min(0)
        kls.append(kl)
        picks = cand.argmax(-1)
        wanted = torch.tensor(t.continuation[: len(picks)])
        matches = picks[: len(wanted)] == wanted
        top1 += int(matches.sum())
        if bool(matches.all()):
            agreeing += 1
        else:
            step = int((~matches).nonzero()[0, 0])
            result.diverging.append(
                {
                    "probe": t.probe.source,
                    "step": step,
                    "reference_token": int(wanted[step]),
                    "candidate_token": int(picks[step]),
                }
            )
    all_kl = torch.cat(kls) if kls else torch.zeros(1)
    result.steps = int(all_kl.numel())
    result.mean_kl = float(all_kl.mean())
    result.max_kl = float(all_kl.max())
    result.top1_agreement = top1 / max(sum(len(t.continuation) for t in traces), 1)
    result.greedy_agreement = agreeing / max(len(traces), 1)
    return result


def probes_json(traces: list[Trace], tokenizer: Any) -> list[dict]:
    """The probe set and the reference's greedy answers, for parity.json."""
    return [
        {
            "source": t.probe.source,
            "prompt_tokens": len(t.probe.input_ids),
            "reference_answer": tokenizer.decode(t.continuation, skip_special_tokens=False),
        }
        for t in traces
    ]


def _device(model: Any) -> Any:
    return next(model.parameters()).device
