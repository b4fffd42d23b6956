"""Remove noise and subjectivity from expert feedback.

`clean` measures how well the raters agree (Krippendorff's alpha per dimension), calibrates each rater's offset and
scale against the others, lists raters whose scores are mostly noise, holds back items the experts disagree on (or
flagged), counts A/B votes and, given a teacher (a reward model's scores), lists the units where teacher and experts
part ways. It changes nothing in the store: the `Cleaning` it returns says what an export keeps and how it scores it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from pydantic import BaseModel, ConfigDict

from finetune.errors import WenmaiError
from finetune.recipe.review import ReviewCleaning
from finetune.review.schema import Item, Review

Cell = tuple[int, str, str]  # (item id, answer label, dimension)
SCORE_RANGE = (1, 5)
MIN_CELLS = 3  # fewer overlapping cells than this: no scale estimate, never listed as noisy
SCALE_RANGE = (0.25, 4.0)
OFFSET_ROUNDS = 4  # re-estimations of offsets against offset-corrected medians (see _estimate)
ALPHA_GRID = 0.1  # calibrated scores are rounded to this before alpha: krippendorff's memory grows with V²


class RaterStats(BaseModel):
    """One rater against the others: `calibrated = (score - offset - center) / scale + center`."""

    offset: float = 0.0
    scale: float = 1.0
    center: float = 0.0
    deviation: float | None = None
    cells: int = 0
    noisy: bool = False


class Disagreement(BaseModel):
    """A unit where the teacher's and the experts' standardised scores differ by `gap` standard deviations."""

    item_id: int
    answer: str
    dimension: str
    teacher: float
    expert: float
    gap: float


class Cleaning(BaseModel):
    """What cleaning found and decided; `calibrated`, `kept` and `used` answer an export's questions."""

    model_config = ConfigDict(extra="forbid")
    dimensions: list[str]
    options: ReviewCleaning
    alpha: dict[str, dict[str, float | None]]  # {dimension: {"before": alpha, "after": alpha}}; None: undefined
    raters: dict[str, RaterStats]
    noisy_raters: list[str]
    held_back: dict[int, list[str]]
    votes: dict[int, dict[str, int]]
    disagreements: list[Disagreement]
    kept_items: list[int]
    items: int
    reviews: int
    reviews_used: int

    def dropped(self, reviewer: str) -> bool:
        """Whether the reviewer's scores and votes are left out (noisy, with drop_noisy_raters)."""
        stats = self.raters.get(reviewer)
        return stats is None or (stats.noisy and self.options.drop_noisy_raters)

    def calibrated(self, review: Review, answer: str, dimension: str) -> float | None:
        """The review's score on (answer, dimension) after calibration; None if absent or the rater is dropped."""
        score = review.scores.get(answer, {}).get(dimension)
        if score is None or dimension not in self.dimensions or self.dropped(review.reviewer):
            return None
        if not self.options.calibrate:
            return float(score)
        return _apply(self.raters[review.reviewer], score)

    def majority(self, item_id: int) -> str | None:
        """The answer ("A"/"B") with strictly more votes than the other, else None; "tie" votes count for neither."""
        votes = self.votes.get(item_id)
        if not votes or votes["A"] == votes["B"]:
            return None
        return "A" if votes["A"] > votes["B"] else "B"

    def kept(self, item_id: int) -> bool:
        """Whether the item goes into an export (it is not held back)."""
        return item_id not in self.held_back

    def used(self, review: Review) -> bool:
        """Whether an export reads this review: its item is kept and its rater is not dropped."""
        return self.kept(review.item_id) and not self.dropped(review.reviewer)


def clean(
    items: list[Item],
    reviews: list[Review],
    dimensions: list[str],
    options: ReviewCleaning,
    teacher: dict[tuple[int, str], dict[str, float]] | None = None,
) -> Cleaning:
    """Calibrate raters, find noisy ones, hold back disputed or flagged items and measure agreement before/after."""
    known = {item.id: item for item in items}
    by_version = sorted((r for r in reviews if r.item_id in known), key=lambda r: r.version)
    reviews = list({(r.item_id, r.reviewer): r for r in by_version}.values())  # one per (item, reviewer): the latest
    cells = _cells(known, reviews, dimensions)
    raters = sorted({review.reviewer for review in reviews})

    stats = _find_noisy(cells, raters, options.max_rater_deviation)
    noisy = [rater for rater in raters if stats[rater].noisy]
    kept_raters = [rater for rater in raters if not (options.drop_noisy_raters and rater in noisy)]
    kept_set = set(kept_raters)

    kept_cells = {
        cell: {
            r: _apply(stats[r], score) if options.calibrate else float(score)
            for r, score in scores.items()
            if r in kept_set
        }
        for cell, scores in cells.items()
    }
    held_back = _held_back(known, reviews, kept_cells, kept_set, options)
    kept_items = [item.id for item in items if item.id not in held_back]
    kept_ids = set(kept_items)
    alpha = {
        dimension: {
            "before": _alpha(cells, dimension, raters, None),
            "after": _alpha(kept_cells, dimension, kept_raters, kept_ids),
        }
        for dimension in dimensions
    }
    votes = {item.id: {"A": 0, "B": 0, "tie": 0} for item in items if len(item.answers) == 2}
    for review in reviews:
        if review.item_id in votes and review.choice and review.reviewer in kept_set:
            votes[review.item_id][review.choice] += 1
    disagreements = _teacher_check(kept_cells, dimensions, teacher, options.teacher_gap) if teacher else []
    return Cleaning(
        dimensions=list(dimensions),
        options=options,
        alpha=alpha,
        raters=stats,
        noisy_raters=noisy,
        held_back=held_back,
        votes=votes,
        disagreements=disagreements,
        kept_items=kept_items,
        items=len(items),
        reviews=len(reviews),
        reviews_used=sum(1 for r in reviews if r.item_id in kept_ids and r.reviewer in kept_set),
    )


def render_markdown(cleaning: Cleaning, title: str) -> str:
    """A readable cleaning report: kept and held-back items, agreement, rater calibration, teacher disagreements."""
    options, held = cleaning.options, cleaning.held_back
    lines = [
        f"# {title}",
        "",
        f"{cleaning.items} items, {cleaning.reviews} reviews: {len(cleaning.kept_items)} items kept, "
        f"{len(held)} held back; {cleaning.reviews_used} reviews used. "
        f"Scores are {'calibrated per rater' if options.calibrate else 'not calibrated (raw)'}.",
    ]
    if cleaning.noisy_raters:
        fate = "left out" if options.drop_noisy_raters else "listed, still used"
        lines.append(
            f"Noisy raters ({fate}; deviation > {options.max_rater_deviation:g}): {', '.join(cleaning.noisy_raters)}."
        )
    lines += ["", "## Agreement (Krippendorff's alpha, interval)", ""]
    rows = [[dim, _number(a["before"]), _number(a["after"])] for dim, a in cleaning.alpha.items()]
    lines += _table(["dimension", "before", "after"], rows)
    lines += ["", "Before: raw scores, all raters, all items. After: calibrated scores, kept raters, kept items."]
    lines += ["", "## Held back", ""]
    lines += [f"- item {item_id}: {'; '.join(reasons)}" for item_id, reasons in sorted(held.items())]
    lines += [] if held else ["No item held back."]
    lines += ["", "## Rater calibration", ""]
    rows = [
        [rater, r.cells, f"{r.offset:+.2f}", f"{r.scale:.2f}", _number(r.deviation), "yes" if r.noisy else "no"]
        for rater, r in cleaning.raters.items()
    ]
    lines += _table(["rater", "cells", "offset", "scale", "deviation", "noisy"], rows)
    if cleaning.votes:
        majority = [cleaning.majority(item_id) for item_id in cleaning.votes]
        lines += ["", "## A/B votes", ""]
        lines.append(
            f"{len(majority)} A/B items: majority A on {majority.count('A')}, B on {majority.count('B')}, "
            f"none on {majority.count(None)}."
        )
    if cleaning.disagreements:
        lines += ["", "## Teacher disagreements, for a second look", ""]
        lines += [f"The teacher and the experts differ by more than {options.teacher_gap:g} SD (listed only).", ""]
        rows = [
            [d.item_id, d.answer, d.dimension, f"{d.teacher:.3g}", f"{d.expert:.2f}", f"{d.gap:+.2f}"]
            for d in cleaning.disagreements
        ]
        lines += _table(["item", "answer", "dimension", "teacher", "experts", "gap (SD)"], rows)
    return "\n".join(lines) + "\n"


def _cells(items: dict[int, Item], reviews: list[Review], dimensions: list[str]) -> dict[Cell, dict[str, int]]:
    """{(item, answer, dimension): {rater: score}}, refusing scores outside 1..5."""
    cells: dict[Cell, dict[str, int]] = defaultdict(dict)
    for review in reviews:
        labels = {answer.label for answer in items[review.item_id].answers}
        for label, scores in review.scores.items():
            for dimension, score in scores.items():
                if label not in labels or dimension not in dimensions:
                    continue
                if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
                    raise WenmaiError(
                        f"review {review.id} by {review.reviewer} on item {review.item_id}: score {score} for answer "
                        f"{label}, {dimension} is outside {SCORE_RANGE[0]}..{SCORE_RANGE[1]}; correct it in the store."
                    )
                cells[(review.item_id, label, dimension)][review.reviewer] = score
    return dict(cells)


def _find_noisy(cells: dict[Cell, dict[str, int]], raters: list[str], max_deviation: float) -> dict[str, RaterStats]:
    """Every rater's stats, noisy ones marked: list the worst rater above max_deviation, re-estimate the rest, repeat.

    One at a time, because with three raters a good rater's "others' median" is half the noisy rater's score. With
    two raters left nobody can be blamed: two raters who disagree deviate from each other equally.
    """
    remaining = list(raters)
    listed: dict[str, RaterStats] = {}
    while True:
        stats = _estimate(cells, remaining)
        above = [r for r in remaining if stats[r].cells >= MIN_CELLS and stats[r].deviation > max_deviation]
        if not above or len(remaining) < 3:
            break
        worst = max(above, key=lambda rater: stats[rater].deviation)
        listed[worst] = stats[worst].model_copy(update={"noisy": True})
        remaining.remove(worst)
    return {rater: listed.get(rater) or stats[rater] for rater in raters}


def _estimate(cells: dict[Cell, dict[str, int]], raters: list[str]) -> dict[str, RaterStats]:
    """Offset, scale and deviation of each rater against the median of the other (listed) raters.

    The others' scores are first corrected by their own offsets, re-estimated for a few rounds: with raw medians
    one lenient rater makes everyone else look strict. Offsets are centred on the median rater's.
    """
    offsets = dict.fromkeys(raters, 0.0)
    for _ in range(OFFSET_ROUNDS):
        stats = _estimate_once(cells, offsets)
        measured = [s.offset for s in stats.values() if s.cells]
        middle = float(np.median(measured)) if measured else 0.0
        offsets = {rater: s.offset - middle if s.cells else 0.0 for rater, s in stats.items()}
    return stats


def _estimate_once(cells: dict[Cell, dict[str, int]], offsets: dict[str, float]) -> dict[str, RaterStats]:
    pairs: dict[str, list[tuple[float, float]]] = {rater: [] for rater in offsets}  # (score, others' median)
    for scores in cells.values():
        present = {rater: score for rater, score in scores.items() if rater in offsets}
        if len(present) < 2:
            continue
        for rater, score in present.items():
            others = [other_score - offsets[other] for other, other_score in present.items() if other != rater]
            pairs[rater].append((score, float(np.median(others))))
    stats = {}
    for rater, rater_pairs in pairs.items():
        if not rater_pairs:
            stats[rater] = RaterStats()
            continue
        score, others = np.array(rater_pairs, dtype=float).T
        offset = float(np.mean(score - others))
        scale = 1.0
        if len(rater_pairs) >= MIN_CELLS and np.var(others) > 1e-9:
            slope = np.cov(score, others, bias=True)[0, 1] / np.var(others)
            scale = float(np.clip(slope, *SCALE_RANGE))
        deviation = float(np.mean(np.abs(score - offset - others)))
        stats[rater] = RaterStats(
            offset=offset, scale=scale, center=float(np.mean(others)), deviation=deviation, cells=len(rater_pairs)
        )
    return stats


def _apply(stats: RaterStats, score: int) -> float:
    value = (score - stats.offset - stats.center) / stats.scale + stats.center
    return float(np.clip(value, *SCORE_RANGE))


def _held_back(
    items: dict[int, Item],
    reviews: list[Review],
    kept_cells: dict[Cell, dict[str, float]],
    kept_raters: set[str],
    options: ReviewCleaning,
) -> dict[int, list[str]]:
    """{item id: reasons} for items the kept raters dispute, too few reviewed, or someone flagged."""
    reasons: dict[int, list[str]] = defaultdict(list)
    for (item_id, label, dimension), scores in sorted(kept_cells.items()):
        if len(scores) < 2:
            continue
        low, high = round(min(scores.values())), round(max(scores.values()))  # calibration must not widen 2 to 2.01
        if high - low > options.max_spread:
            where = dimension if len(items[item_id].answers) == 1 else f"{dimension} (answer {label})"
            reasons[item_id].append(
                f"{where}: scores {low} to {high} differ by {high - low} > max_spread {options.max_spread:g}"
            )
    counts: dict[int, int] = defaultdict(int)
    flagged: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for review in reviews:
        if review.reviewer in kept_raters:
            counts[review.item_id] += 1
        # A flag is a safety signal, not a score: it holds whoever raised it, noisy rater or not.
        for flag in review.flags:
            if flag in options.hold_flags:
                flagged[review.item_id][flag].append(review.reviewer)
    for item in items.values():
        if counts[item.id] < options.min_reviews:
            plural = "review" if counts[item.id] == 1 else "reviews"
            reasons[item.id].append(f"{counts[item.id]} {plural} < min_reviews {options.min_reviews}")
        for flag, flaggers in sorted(flagged[item.id].items()):
            reasons[item.id].append(f"flagged {flag} by {', '.join(sorted(flaggers))}")
    return {item_id: reasons[item_id] for item_id in items if reasons.get(item_id)}


def _alpha(
    cells: dict[Cell, dict[str, float]], dimension: str, raters: list[str], items: set[int] | None
) -> float | None:
    """Krippendorff's alpha (interval) of one dimension, raters x (item, answer) units; None when undefined."""
    import krippendorff

    units = sorted({(i, label) for (i, label, dim) in cells if dim == dimension and (items is None or i in items)})
    if not units or not raters:
        return None
    row = {rater: index for index, rater in enumerate(raters)}
    matrix = np.full((len(raters), len(units)), np.nan)
    for column, (item_id, label) in enumerate(units):
        for rater, score in cells[(item_id, label, dimension)].items():
            if rater in row:
                matrix[row[rater], column] = np.round(score / ALPHA_GRID) * ALPHA_GRID
    if not np.any(np.sum(~np.isnan(matrix), axis=0) >= 2):
        return None
    try:
        value = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="interval"))
    except (ValueError, ZeroDivisionError):
        return None
    return value if np.isfinite(value) else None


def _teacher_check(
    kept_cells: dict[Cell, dict[str, float]],
    dimensions: list[str],
    teacher: dict[tuple[int, str], dict[str, float]],
    max_gap: float,
) -> list[Disagreement]:
    """Units whose standardised teacher and expert scores differ by more than max_gap, per dimension."""
    found: list[Disagreement] = []
    for dimension in dimensions:
        units = [
            Disagreement(
                item_id=item_id,
                answer=label,
                dimension=dimension,
                teacher=teacher[(item_id, label)][dimension],
                expert=float(np.mean(list(scores.values()))),
                gap=0.0,
            )
            for (item_id, label, dim), scores in sorted(kept_cells.items())
            if dim == dimension and scores and dimension in teacher.get((item_id, label), {})
        ]
        teacher_scores = np.array([unit.teacher for unit in units])
        expert_scores = np.array([unit.expert for unit in units])
        if len(units) < 3 or teacher_scores.std() < 1e-9 or expert_scores.std() < 1e-9:
            continue
        gaps = (teacher_scores - teacher_scores.mean()) / teacher_scores.std()
        gaps -= (expert_scores - expert_scores.mean()) / expert_scores.std()
        found += [u.model_copy(update={"gap": float(g)}) for u, g in zip(units, gaps, strict=True) if abs(g) > max_gap]
    return found


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [
        f"| {' | '.join(str(cell) for cell in row)} |" for row in rows
    ]


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
