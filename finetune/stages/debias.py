"""Stage `debias`: LoRA training on the task with an adversary on a protected attribute.

The adversary (a linear or one-hidden-layer head) predicts each record's protected attribute from what it reads
of the model (`reads`), averaged over the record's answer:

- `output` (the default): the model's next-token distribution at each position (the last hidden state through
  the LM head), with the probability of the attribute's own terms' tokens left out: what the model says. An
  adversary that cannot tell the groups apart from it means answers that do not depend on the group (Zhang et
  al. 2018's adversary reads the prediction, for demographic parity);
- `hidden`: the hidden state at `layer` (layer-normalised): hides the attribute from that representation. On the
  planted test it did, and the association the model learned stayed (the state keeps what the answer needs, in
  directions a linear adversary does not use).

It has its own optimiser and catches up on each batch (several steps on the detached features) before the
adapter moves; it and its optimiser are saved in every checkpoint, so a resumed stage goes on against the same
adversary. The adapter learns the task and to hide the attribute from it, by one of two objectives
(`objective`):

- `reversal`: a gradient-reversal layer between the features and the adversary (Ganin & Lempitsky 2015;
  adversarial debiasing, Zhang et al. 2018): loss = task loss + adversary loss, with the adversary's gradient
  multiplied by -adversary_weight on its way into the model;
- `confusion` (the default): loss = task loss + adversary_weight x the cross-entropy between the (frozen)
  adversary's prediction and the uniform distribution (Alvi et al. 2018, "Turning a blind eye"): the adapter is
  pushed toward features the adversary cannot tell apart, not toward features it reads the wrong way round
  (which a fresh probe still reads).

The attribute is a record field, or derived from the record's text by term lists (or data.augment's pairs).
Records without one train the task only.

Logged while training: task_loss, adversary_loss and adversary_accuracy (each batch scored before the adversary
learns from it). Logged before and after: the task loss, the leakage (the held-out accuracy of a fresh linear probe trained
on the adversary's features, 5-fold with identical records kept in one fold, against the majority-class rate),
and the suite's implicit-bias probes (each association's effect size d and its gap in nats). The output is a
normal adapter (`adapter/`, `tokenizer/`, `template.json`) that merge, evaluate and export read.
The options are `finetune.recipe.DebiasOptions`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from finetune.adapters import load_policy, save_policy
from finetune.data import tokenize_records
from finetune.data.augment import TermGroups, pair_groups, record_text
from finetune.data.chat import IGNORE_INDEX
from finetune.errors import ConfigError, DataError
from finetune.evaluation import bias
from finetune.evaluation.suite import load_suite
from finetune.recipe import DebiasOptions, Recipe
from finetune.run_dir import StageContext, StageResult
from finetune.tracking import append_metrics, jsonl_callback
from finetune.training import build_training_args, fit, loss_summary

NO_ATTRIBUTE = -100  # the adversary's ignore index: records that name no attribute
ADVERSARY_STEPS = 5  # adversary updates per batch, on the detached features, before the adapter's update
# reads: output: the averaged next-token probabilities sum to 1 over the vocabulary, so a linear adversary at its
# learning rate would take hundreds of steps to read a shift of a few tenths in one token; scaled by this
# it reads it in a few (on the planted test, before its hall fix: at 500 steps 3, 10 and 24 left a gap of 0.47, 0.35
# and 0.46 nats; at 200 steps 1 left 3.1 where 10 left 1.2)
OUTPUT_SCALE = 10.0
ADVERSARY_FILE = "adversary.pt"  # in each checkpoint: the adversary's and its optimiser's state


def run(ctx: StageContext) -> StageResult:
    """Train the adapter against the adversary, log leakage, task loss and probes before/after, and save it."""
    from datasets import Dataset
    from transformers import TrainingArguments

    options: DebiasOptions = ctx.config
    recipe = ctx.recipe
    policy = load_policy(
        recipe,
        ctx.run_dir,
        ctx.input_stages.get("policy"),
        ctx.inputs.get("policy"),
        options.seed,
        f"stage {options.stage_name}",
    )
    labels, attribute_of, terms = attribute_labeller(options, recipe)
    train = tokenize_records(
        recipe,
        options.dataset,
        policy.tokenizer,
        options.seq_len,
        options.loss_on == "assistant",
        ctx.stage_dir,
        extra=lambda record: {"attribute": attribute_of(record)},
    )
    labelled = [r for r in train.rows if r["attribute"] != NO_ATTRIBUTE]
    counts = {label: sum(r["attribute"] == i for r in labelled) for i, label in enumerate(labels)}
    if sum(1 for n in counts.values() if n) < 2:
        raise DataError(
            f"stage {options.stage_name}: the adversary needs records of at least two attribute values in "
            f"{options.dataset}; found {counts or 'none'}. Check attribute_field / attribute_terms."
        )
    probe_rows = random.Random(options.seed).sample(labelled, min(options.probe_records, len(labelled)))
    suite = load_suite(options.suite) if options.suite else None

    shown = shown_columns(policy.model, policy.tokenizer, terms) if options.reads == "output" else None
    before = measure(policy.model, policy.tokenizer, probe_rows, options, suite, shown)
    width = policy.model.config.hidden_size if shown is None else len(shown)
    adversary = build_adversary(width, len(labels), options.adversary_hidden)
    args = build_training_args(
        TrainingArguments,
        options,
        recipe,
        ctx.stage_dir,
        ctx.run_dir.name,
        has_eval=False,
        remove_unused_columns=False,
    )
    trainer = adversarial_trainer(
        model=policy.model,
        args=args,
        train_dataset=Dataset.from_list(train.rows),
        data_collator=lambda rows: collate(rows, policy.tokenizer.pad_token_id),
        processing_class=policy.tokenizer,
        callbacks=[jsonl_callback(ctx.metrics_path, options.stage_name)],
        adversary=adversary,
        options=options,
        shown=shown,
    )
    result = fit(trainer, ctx.resume_from)
    after = measure(trainer.model, policy.tokenizer, probe_rows, options, suite, shown)
    outputs = save_policy(trainer, ctx.stage_dir, policy)

    figures = {f"{when}/{key}": value for when, m in (("before", before), ("after", after)) for key, value in m.items()}
    append_metrics(ctx.metrics_path, {"stage": options.stage_name, "step": trainer.state.global_step, **figures})
    return StageResult(
        outputs=outputs,
        summary={
            "data": train.stats,
            "attribute": {"labels": labels, "records": counts, "unlabelled": len(train.rows) - len(labelled)},
            "before": before,
            "after": after,
            "objective": options.objective,
            "reads": options.reads,
            "adversary_weight": options.adversary_weight,
            "adversary_accuracy_last": next(
                (
                    row["adversary_accuracy"]
                    for row in reversed(trainer.state.log_history)
                    if "adversary_accuracy" in row
                ),
                None,
            ),
            "steps": trainer.state.global_step,
            "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
            "used": {"policy": policy.source},
            **loss_summary(trainer.state.log_history, eval_loss=False),
        },
    )


def check(options: DebiasOptions, recipe: Recipe) -> list[tuple[str, str]]:
    """The suite file, when one is given, must load."""
    if not options.suite:
        return []
    try:
        load_suite(options.suite)
    except ConfigError as err:
        return [("suite", str(p)) for p in err.problems]
    return []


def machine_problems(options: DebiasOptions) -> list[str]:
    """Nothing beyond what every trainer stage needs."""
    return []


def attribute_labeller(options: DebiasOptions, recipe: Recipe) -> tuple[list[str], Any, list[str]]:
    """The attribute's labels, a function record -> label index (NO_ATTRIBUTE when it has none), and the
    attribute's terms (none when it is a record field)."""
    fmt = recipe.data[options.dataset].record_format
    if options.attribute_field:
        seen: list[str] = []

        def from_field(record: dict) -> int:
            value = record.get(options.attribute_field)
            if value is None or value == "":
                return NO_ATTRIBUTE
            if str(value) not in seen:
                seen.append(str(value))
            return seen.index(str(value))

        return seen, from_field, []  # `seen` fills as records are read, in order of first appearance
    augment = recipe.data.augment
    protect = augment.protect if augment else []
    terms_of = options.attribute_terms or pair_groups(augment.pairs)
    groups = TermGroups(terms_of, protect)
    names = list(dict.fromkeys(groups.label.values()))

    def from_terms(record: dict) -> int:
        label = groups.of(record_text(record, fmt))
        return NO_ATTRIBUTE if label is None else names.index(label)

    return names, from_terms, [term for terms in terms_of.values() for term in terms]


def shown_columns(model: Any, tokenizer: Any, terms: list[str]) -> Any:
    """1 for each token of the output vocabulary the adversary sees, 0 for the tokens of the attribute's terms
    (alone or after a space; not a token that is only the space): a guide that names the group it talks about, or
    says 她 of a woman, gives the attribute away without any bias, and hiding that would teach it to avoid the
    names. A byte-level tokenizer splits many Chinese characters into pieces that other characters share (SmolLM2:
    the 45 tokens of 20 terms include the lead bytes of 汉族 and 藏族): those are left out too, so the adversary is
    a little blinder, never pushed against the names."""
    import torch

    head = model.get_output_embeddings()  # out_features: a weight ZeRO-3 partitions has shape [0] outside a forward
    shown = torch.ones(head.out_features, device=head.weight.device)  # where the logits are: no copy at every step
    for term in terms:
        for text in (term, f" {term}"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            shown[[i for i in ids if i < len(shown) and tokenizer.decode([i]).strip()]] = 0.0
    return shown


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, labels (ignored where padded), attention_mask and the attribute per row."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    attribute = torch.tensor([r["attribute"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "attribute": attribute}


def build_adversary(width: int, classes: int, hidden: int) -> Any:
    """A linear head, or one hidden layer, that predicts the attribute from a record's features."""
    import torch

    if hidden == 0:
        return torch.nn.Linear(width, classes)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def features(model: Any, batch: dict, options: DebiasOptions, shown: Any = None) -> tuple[Any, Any]:
    """The model's output (with its task loss) and what the adversary reads of each row (`options.reads`):
    its next-token probabilities without the `shown` == 0 tokens, or its layer-normalised hidden state at `layer`,
    averaged over the pooled positions."""
    import torch

    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        output_hidden_states=options.reads == "hidden",
    )
    mask = batch["attention_mask"].bool()
    answer = batch["labels"] != IGNORE_INDEX
    if options.reads == "output":
        # position t predicts token t + 1: keep the positions that predict a pooled token
        keep = (answer[:, 1:] if options.pool == "answer" else mask[:, 1:]) & mask[:, :-1]
        probabilities = torch.softmax(outputs.logits[:, :-1][keep].float(), -1) * shown
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(keep), probabilities.shape[-1], device=probabilities.device)
        sums = sums.index_add(0, rows, probabilities)
        return outputs, OUTPUT_SCALE * sums / keep.sum(1, keepdim=True).clamp(min=1)
    states = outputs.hidden_states[options.layer]
    keep = (answer if options.pool == "answer" else mask) & mask
    weights = keep.to(states.dtype).unsqueeze(-1)
    pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    # layer-normalised, so the adapter cannot fool the adversary by inflating the states (its loss would grow
    # without bound while the task suffers); it has to remove the attribute instead
    return outputs, torch.nn.functional.layer_norm(pooled.float(), pooled.shape[-1:])


def adversarial_trainer(adversary: Any, options: DebiasOptions, shown: Any = None, **trainer_kwargs: Any) -> Any:
    """A transformers Trainer whose loss is the task loss plus the hiding term of `objective` (confusion or
    the adversary's loss through gradient reversal); its checkpoints hold the adversary too."""
    import torch
    from transformers import Trainer

    class GradientReversal(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.weight = weight
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return -ctx.weight * grad, None

    class AdversarialTrainer(Trainer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.adversary = adversary.to(self.args.device)
            self.model_accepts_loss_kwargs = False  # our loss is a mean per micro-batch: the Trainer scales it
            self.sums: dict[str, float] = {}

            # the adversary has its own optimiser and catches up on each batch before the adapter moves
            # (several steps on the detached features): a lagging adversary is fooled by flipping the attribute,
            # which a fresh probe still reads; one that keeps up can only be fooled by removing it
            self.adversary_optimizer = torch.optim.AdamW(
                self.adversary.parameters(), lr=options.adversary_lr, weight_decay=0.01
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            attribute = inputs.pop("attribute")
            outputs, read = features(model, inputs, options, shown)
            # Ganin & Lempitsky's schedule: the reversal grows from 0 to adversary_weight, so the adversary has
            # learned something before the adapter is pushed against it
            progress = self.state.global_step / max(1, self.state.max_steps)
            weight = options.adversary_weight * (2 / (1 + math.exp(-10 * progress)) - 1)
            known = attribute != NO_ATTRIBUTE
            if known.any():
                # scored on the batch before it learns from it: after its catch-up steps it would be scored on
                # records it has just fitted (with one or two labelled records in a batch, always right)
                with torch.no_grad():
                    unseen = self.adversary(read.detach()[known]).argmax(-1) == attribute[known]
                self._add(adversary_correct=unseen.float().sum().item(), adversary_seen=known.sum().item())
            if known.any() and model.training:
                for _ in range(ADVERSARY_STEPS):
                    self.adversary_optimizer.zero_grad()
                    catch_up = self.adversary(read.detach()[known])
                    torch.nn.functional.cross_entropy(catch_up, attribute[known]).backward()
                    self.adversary_optimizer.step()
                self.adversary_optimizer.zero_grad()
            loss = outputs.loss
            if options.objective == "confusion":
                # the adversary is a fixed judge here (it learned above): only the features move toward its
                # uniform prediction
                self.adversary.requires_grad_(False)
                logits = self.adversary(read)
                self.adversary.requires_grad_(True)
            else:
                logits = self.adversary(GradientReversal.apply(read, weight))
            if known.any():
                adversary_loss = torch.nn.functional.cross_entropy(logits[known], attribute[known])
                if options.objective == "confusion":
                    # cross-entropy against the uniform distribution over the attribute's values
                    loss = loss - weight * torch.log_softmax(logits[known], -1).mean()
                else:
                    loss = loss + adversary_loss
                self._add(adversary_loss=adversary_loss.item())
            self._add(task_loss=outputs.loss.item(), task_batches=1)
            return (loss, outputs) if return_outputs else loss

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            super()._save_optimizer_and_scheduler(output_dir)
            if self.args.should_save:
                state = {"adversary": self.adversary.state_dict(), "optimizer": self.adversary_optimizer.state_dict()}
                torch.save(state, f"{output_dir}/{ADVERSARY_FILE}")

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            super()._load_optimizer_and_scheduler(checkpoint)
            saved = Path(checkpoint or "") / ADVERSARY_FILE
            if checkpoint is None or not saved.is_file():
                return  # a fresh stage, or a checkpoint from before adversaries were saved: a fresh adversary
            state = torch.load(saved, map_location=self.args.device, weights_only=True)
            self.adversary.load_state_dict(state["adversary"])
            self.adversary_optimizer.load_state_dict(state["optimizer"])

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if self.sums.get("task_batches"):
                logs["task_loss"] = round(
                    self.sums["task_batches"] and self.sums["task_loss"] / self.sums["task_batches"], 4
                )
            if self.sums.get("adversary_seen"):
                logs["adversary_accuracy"] = round(self.sums["adversary_correct"] / self.sums["adversary_seen"], 4)
                logs["adversary_loss"] = round(self.sums["adversary_loss"] / self.sums["task_batches"], 4)
            self.sums = {}
            super().log(logs, start_time)

        def _add(self, **values: float) -> None:
            for key, value in values.items():
                self.sums[key] = self.sums.get(key, 0.0) + value

    return AdversarialTrainer(**trainer_kwargs)


def measure(
    model: Any, tokenizer: Any, rows: list[dict], options: DebiasOptions, suite: Any, shown: Any = None
) -> dict:
    """Task loss, leakage (a fresh probe's held-out accuracy on the adversary's features, and the majority-class
    rate) and probe effects."""
    import torch

    was_training = model.training
    model.eval()
    read, losses = [], []
    with torch.no_grad():
        for start in range(0, len(rows), options.batch_size):
            batch = collate(rows[start : start + options.batch_size], tokenizer.pad_token_id)
            outputs, pooled = features(model, batch, options, shown)
            read.append(pooled.float())
            losses.append(outputs.loss.item())
    attributes = [r["attribute"] for r in rows]
    accuracy, chance = probe_accuracy(
        torch.cat(read), attributes, options.seed, groups=[tuple(r["input_ids"]) for r in rows]
    )
    figures: dict[str, Any] = {
        "task_loss": round(sum(losses) / len(losses), 4),
        "leakage_accuracy": round(accuracy, 4),
        "chance": round(chance, 4),
    }
    if suite is not None:
        implicit = bias.measure(model, tokenizer, suite, options.batch_size, options.seq_len)
        figures.update({f"bias/{name}": c.effect for name, c in implicit.categories.items()})
        figures.update({f"bias/{a.id}/association": a.effect.value for a in implicit.associations})
        # d is scale-free (a gap shrunk tenfold but as consistent over templates keeps its d): the gap in nats
        # per sentence says how much of the association is left
        figures.update({f"bias/{a.id}/difference": a.difference.value for a in implicit.associations})
    model.train(was_training)
    return figures


def probe_accuracy(
    features: Any, attributes: list[int], seed: int, folds: int = 5, groups: list | None = None
) -> tuple[float, float]:
    """Held-out accuracy of a fresh logistic-regression probe (k-fold), and the majority-class rate (chance).

    Rows with the same `groups` key (the same token ids) share a fold: a probe tested on a copy of a record it was
    trained on reads that record, not the attribute (a handful of distinct records are separable in any hidden
    size, whatever the model hides)."""
    import torch

    y = torch.tensor(attributes)
    classes = int(y.max()) + 1
    chance = max((y == c).float().mean().item() for c in range(classes))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).tolist()
    keys = groups if groups is not None else list(range(len(y)))
    fold_of = {key: n % folds for n, key in enumerate(dict.fromkeys(keys[i] for i in order))}
    fold = torch.tensor([fold_of[key] for key in keys])
    correct = 0
    for k in range(folds):
        test = torch.nonzero(fold == k).flatten()
        train = torch.nonzero(fold != k).flatten()
        if len(test) == 0 or len(train) == 0:
            continue
        mean, std = features[train].mean(0), features[train].std(0).clamp(min=1e-6)
        x_train, x_test = (features[train] - mean) / std, (features[test] - mean) / std
        torch.manual_seed(seed + k)
        head = torch.nn.Linear(features.shape[1], classes)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-3)
        for _ in range(200):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(x_train), y[train]).backward()
            optimizer.step()
        with torch.no_grad():
            correct += (head(x_test).argmax(-1) == y[test]).sum().item()
    return correct / len(y), chance
