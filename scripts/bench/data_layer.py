"""Throughput and memory of the data layer (read -> policy -> PII scrub -> exact + near dedup) on a generated JSONL.

    python scripts/bench/data_layer.py --size-mb 1024            # the 1 GB figure (generates /tmp/wenmai-bench-1024mb.jsonl)
    python scripts/bench/data_layer.py --size-mb 64 --stages     # a smaller file, each step's cost separately

The file holds chat records built from clauses of the shipped sample data (half Chinese, half English,
~0.5 KB each); 3% carry personal data, 8% repeat an earlier record exactly and 4% are reworded copies
(one clause replaced). One process does the work (dedup is sequential by
nature); peak memory is the process's maximum resident set size. The dedup index's memory is the resident set
after the full pass minus before it, read while the bench still holds the index (the layer frees it when the
pass ends; an earlier version read it after that and reported what the allocator had not returned, 235 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import resource
import time
from pathlib import Path

from finetune.data import layer
from finetune.data.layer import DatasetReport, stream_dataset
from finetune.recipe import DatasetSection
from finetune.recipe.data_policy import DataPolicy

ROOT = Path(__file__).resolve().parents[2]
PII = [
    "联系电话13812345678。",
    "Email the donor at li.ming@example.com. ",
    "身份证号11010519491231002X。",
    "Call 010-65131892. ",
]


def clause_pool() -> dict[str, list[str]]:
    """Clauses of the shipped sample data, by language: realistic text, varied enough that records differ."""
    pool: dict[str, list[str]] = {"zh": [], "en": []}
    for name in ("culture_sft.jsonl", "culture_instructions.jsonl"):
        for line in (ROOT / "recipes" / "data" / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts = [m["content"] for m in record.get("messages", [])] + [
                record.get(k, "") for k in ("instruction", "input", "output")
            ]
            for text in texts:
                pool[record["lang"]] += [c for c in re.split(r"(?<=[。！？；，.!?;,])\s*", text) if len(c) > 3]
    return pool


def generate(path: Path, size_mb: int, seed: int = 0) -> int:
    """Write about `size_mb` MB of chat records; returns the record count."""
    rng = random.Random(seed)
    pool = clause_pool()
    target, written, count, kept = size_mb << 20, 0, 0, []
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            roll = rng.random()
            if kept and roll < 0.08:
                record = rng.choice(kept)  # an exact repeat
            else:
                lang = "zh" if rng.random() < 0.5 else "en"
                parts = rng.choices(pool[lang], k=rng.randint(4, 9 if lang == "zh" else 6))
                if kept and roll < 0.12:  # a reworded copy: one clause replaced
                    parts = [*rng.choice(kept)["parts"]]
                    parts[rng.randrange(len(parts))] = rng.choice(pool[lang])
                answer = "".join(parts) + (rng.choice(PII) if rng.random() < 0.03 else "")
                question = rng.choice(pool[lang])
                record = {
                    "id": f"b{count}",
                    "parts": parts,
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                }
                if len(kept) < 5000:
                    kept.append(record)
                elif rng.random() < 0.05:
                    kept[rng.randrange(len(kept))] = record
            line = json.dumps({k: v for k, v in record.items() if k != "parts"}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            count += 1
    return count


HELD: list = []  # the deduplicators of the passes, kept alive after each pass to measure them


class HeldDeduplicator(layer.Deduplicator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        HELD.append(self)


def run(path: Path, policy: DataPolicy, max_records: int | None = None) -> tuple[DatasetReport, float, float]:
    """The report, wall seconds and CPU seconds of one pass (CPU time is what a loaded, shared machine distorts least)."""
    report = DatasetReport(name="bench", path="", format="")
    start, cpu = time.perf_counter(), time.process_time()
    section = DatasetSection(path=str(path), format="chat", max_records=max_records)
    for _ in stream_dataset("bench", section, policy, report):
        pass
    return report, time.perf_counter() - start, time.process_time() - cpu


def rates(label: str, records: int, size: int, wall: float, cpu: float) -> str:
    return (
        f"{label:28s} {records / wall:9,.0f} records/s {size / wall / 1e6:6.1f} MB/s   "
        f"per CPU second: {records / cpu:9,.0f} records {size / cpu / 1e6:6.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--file", type=Path, default=None, help="use this JSONL instead of generating one")
    parser.add_argument("--stages", action="store_true", help="also time read only, +scrub, +exact dedup")
    args = parser.parse_args()
    layer.Deduplicator = HeldDeduplicator  # stream_dataset builds its index with this: the bench keeps it alive
    path = args.file or Path(f"/tmp/wenmai-bench-{args.size_mb}mb.jsonl")
    if not path.exists():
        t = time.perf_counter()
        n = generate(path, args.size_mb)
        print(f"generated {path} ({n:,} records) in {time.perf_counter() - t:.0f} s")
    size = path.stat().st_size
    full = DataPolicy.model_validate({"dedup": {"exact": True, "near": True}})
    steps = (
        [
            ("read + validate + policy", {"pii": {"action": "off"}}),
            ("+ PII scrub", {}),
            ("+ exact dedup", {"dedup": {"exact": True}}),
        ]
        if args.stages
        else []
    )
    for label, options in steps:
        report, wall, cpu = run(path, DataPolicy.model_validate(options))
        HELD.clear()
        print(rates(label, report.records_read, size, wall, cpu), flush=True)
    run(path, full, max_records=1000)  # imports and caches the first pass loads are not the index
    HELD.clear()
    gc.collect()
    base_mb = _rss_mb()
    report, wall, cpu = run(path, full)
    live_mb = _rss_mb()  # the index is still held (HELD)
    HELD.clear()
    gc.collect()
    freed_mb = _rss_mb()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(rates("scrub + exact + near dedup", report.records_read, size, wall, cpu))
    print(
        f"{size / 1e6:,.0f} MB, {report.records_read:,} records in {wall:,.0f} s ({cpu:,.0f} s CPU); peak RSS {peak_mb:,.0f} MB"
    )
    print(f"kept {report.kept:,}; duplicates {report.duplicates}; personal data {report.pii_found}")
    held = (live_mb - base_mb) * (1 << 20)
    print(
        f"dedup index, live: {held / report.records_read:,.0f} bytes per record read, "
        f"{held / report.kept:,.0f} per kept record (resident set after the pass, index still held, minus before it); "
        f"after it is freed {(freed_mb - base_mb) * (1 << 20) / report.records_read:,.0f} bytes per record stay resident"
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


if __name__ == "__main__":
    main()
