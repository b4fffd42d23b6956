"""One markdown table from the parts `gpu_owed.sh` ran: each figure owed, Wenmai's value, the reference's, the ratio.

python scripts/bench/owed_table.py OUT_DIR    # reads OUT_DIR/<part>.jsonl and <part>.status.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 1024**3


def rows_of(folder: Path, part: str) -> list[dict]:
    path = folder / f"{part}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def status(folder: Path, part: str) -> str:
    path = folder / f"{part}.status.json"
    if not path.is_file():
        return "not run"
    s = json.loads(path.read_text(encoding="utf-8"))
    if s["exit"] == 0:
        return f"ok, {s['seconds']} s"
    if s["exit"] in (124, 137):
        return f"ran out of its {s['box']} s box"
    return f"failed (exit {s['exit']}; see {part}.err)"


def gib(value) -> str:
    return f"{value / GIB:.2f} GiB" if isinstance(value, int | float) else "—"


def memory_lines(folder: Path) -> list[str]:
    lines = []
    for r in rows_of(folder, "qlora_zero3"):
        measured = r.get("peak_bytes") or r.get("host_maxrss_bytes")
        kind = "GPU peak" if r.get("peak_bytes") else "host max RSS"
        ratio = r.get("estimate_over_measured")
        lines.append(
            f"| {r['config']} ({r.get('quantization')}, {r.get('shape')}) peak memory | {gib(measured)} ({kind}) | "
            f"pre-flight estimate {gib(r.get('estimate_bytes'))} | estimate / measured {ratio if ratio else '—'} |"
        )
    return lines


def sft_lines(folder: Path, part: str) -> list[str]:
    rows = rows_of(folder, part)
    reference = next((r for r in rows if r.get("tokens_per_s") and "speedup" not in r), None)
    lines = []
    for r in rows:
        if r is reference:
            continue
        if r.get("skipped"):
            lines.append(f"| {part}: {r['config']} | skipped: {r['skipped']} | | |")
            continue
        lines.append(
            f"| {part}: {r['config']} tokens/s | {r.get('tokens_per_s')} | "
            f"{reference['config'] if reference else 'reference'} {reference.get('tokens_per_s') if reference else '—'} | "
            f"{r.get('speedup', '—')}x; memory {r.get('memory_ratio', '—')}x; max loss diff {r.get('max_loss_diff', '—')} |"
        )
    return lines


def dpo_lines(folder: Path, part: str) -> list[str]:
    rows = rows_of(folder, part)
    base = next((r for r in rows if r.get("config") == "trl_defaults"), None)
    lines = []
    for r in rows:
        if r is base:
            continue
        ratio = f"{r['steady_pairs_per_s'] / base['steady_pairs_per_s']:.2f}x" if base else "—"
        lines.append(
            f"| dpo ({r.get('shape')}): {r['config']} pairs/s (steady) | {r.get('steady_pairs_per_s')} | "
            f"trl_defaults {base.get('steady_pairs_per_s') if base else '—'} | {ratio} |"
        )
    return lines


def main(folder: Path) -> str:
    parts = sorted(p.name.removesuffix(".status.json") for p in folder.glob("*.status.json"))
    lines = ["| figure owed | Wenmai | reference | ratio |", "| --- | --- | --- | --- |"]
    lines += memory_lines(folder)
    for part in parts:
        if part.startswith("sft_"):
            lines += sft_lines(folder, part)
        elif part.startswith("dpo_"):
            lines += dpo_lines(folder, part)
    lines.append("")
    lines.append("Parts: " + "; ".join(f"{p} {status(folder, p)}" for p in parts))
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
