"""The tensors that travel: a PEFT model's LoRA A and B matrices, by name, and nothing else.

`lora_state` reads them with PEFT's own `get_peft_model_state_dict` and keeps only `lora_A` / `lora_B`; `load_lora_state`
puts a received set back with `set_peft_model_state_dict`, after checking every name and shape against the model, so
a client whose recipe has another base model or LoRA shape is refused with both shapes named.
"""

from __future__ import annotations

from typing import Any

from finetune.errors import WenmaiError

LORA_PARTS = (".lora_A.", ".lora_B.")


def is_lora_tensor(name: str) -> bool:
    return any(part in name for part in LORA_PARTS)


def lora_state(model: Any) -> dict[str, Any]:
    """The adapter's LoRA A/B tensors (names as PEFT saves them), detached CPU float32 copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    others = [name for name in state if not is_lora_tensor(name)]
    if others:
        raise WenmaiError(
            f"the adapter has tensors that are not LoRA A/B ({others[0]}, ...); federated training sends LoRA A/B "
            "only: use lora.variant lora or rslora, without modules_to_save"
        )
    return {name: tensor.detach().to("cpu").float().clone() for name, tensor in state.items()}


def load_lora_state(model: Any, state: dict[str, Any], theirs: str, ours: str) -> None:
    """Put received LoRA tensors into `model`'s adapter; refuse names or shapes that differ from the model's.

    `theirs` / `ours` describe both sides for the message (e.g. "the server's adapter", "this client's recipe").
    """
    from peft import set_peft_model_state_dict

    expected = lora_state(model)
    problem = shape_mismatch(expected, state, theirs, ours)
    if problem:
        raise WenmaiError(problem)
    dtype = next(p.dtype for n, p in model.named_parameters() if is_lora_tensor(n))
    set_peft_model_state_dict(model, {name: tensor.to(dtype) for name, tensor in state.items()})


def shape_mismatch(expected: dict[str, Any], given: dict[str, Any], theirs: str, ours: str) -> str | None:
    """A message naming the first tensor whose name or shape differs between two LoRA states, or None."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if extra or missing:
        name = (extra or missing)[0]
        has, lacks = (theirs, ours) if extra else (ours, theirs)
        return (
            f"{has} has LoRA tensor {name} and {lacks} has none ({len(given)} tensors against {len(expected)}): "
            "the base model or lora.targets differ; every participant needs the same model and lora section"
        )
    for name, tensor in expected.items():
        if tuple(given[name].shape) != tuple(tensor.shape):
            return (
                f"LoRA tensor {name} has shape {tuple(given[name].shape)} in {theirs} and "
                f"{tuple(tensor.shape)} in {ours}: the base model or lora.r differ; every participant needs the same "
                "model and lora section"
            )
    return None


def nbytes(state: dict[str, Any]) -> int:
    """Bytes of a set of tensors (what a message carries, before protocol overhead)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))
