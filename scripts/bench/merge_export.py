"""Merge + export figures for the quickstart model: parity (max |logit diff|, greedy agreement) and wall time.

    python scripts/bench/merge_export.py                       # runs recipes/quickstart.yaml end to end
    python scripts/bench/merge_export.py --run-dir runs/qs     # reuses a run's training, redoes merge + export
    python scripts/bench/merge_export.py --run-dir runs/qs --llama-cpp /path/to/llama.cpp
        # also converts the HF export with llama.cpp's convert_hf_to_gguf.py and compares the GGUF files
        # tensor by tensor with Wenmai's (needs that checkout and sentencepiece; nothing is downloaded)

Prints a Markdown table for the README. Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="A quickstart run whose sft stage is done (default: a new run).")
    parser.add_argument("--llama-cpp", type=Path, help="A llama.cpp checkout to compare GGUF files against.")
    args = parser.parse_args()

    wenmai = [sys.executable, "-m", "finetune.cli"]
    started = time.perf_counter()
    if args.run_dir is None:
        run_dir = ROOT / "runs" / f"bench-merge-export-{datetime.now():%Y%m%d-%H%M%S}"
        _call(wenmai + ["run", str(ROOT / "recipes" / "quickstart.yaml"), "--run-dir", str(run_dir)])
    else:
        run_dir = args.run_dir
        _call(wenmai + ["merge", str(run_dir), "--force"])
        _call(wenmai + ["export", str(run_dir), "--format", "hf,gguf", "--gguf-types", "f16,q8_0", "--force"])
    total = time.perf_counter() - started

    merge = json.loads((run_dir / "merge" / "parity.json").read_text(encoding="utf-8"))
    export = json.loads((run_dir / "export" / "parity.json").read_text(encoding="utf-8"))
    print(f"run folder: {run_dir}  (whole command: {total:.0f} s)\n")
    print("| model | compared with | max abs logit diff | mean KL | top-1 agreement | greedy agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for report in (merge, export):
        for name, c in report["comparisons"].items():
            print(
                f"| {name} | {c['reference']} | {c['max_abs_logit_diff']:.3g} | {c['mean_kl']:.3g} | "
                f"{c['top1_agreement']:.1%} | {c['greedy_agreement']:.0%} ({c['probes']} probes) |"
            )
    print()
    for stage in ("sft", "merge", "export"):
        status = json.loads((run_dir / stage / "status.json").read_text(encoding="utf-8"))
        print(f"- {stage}: {_seconds(status):.0f} s wall ({status['started']} → {status['finished']})")
    if args.llama_cpp is not None:
        compare_with_llama_cpp(run_dir / "export" / "model", args.llama_cpp)


def compare_with_llama_cpp(export_dir: Path, llama_cpp: Path) -> None:
    """Convert the HF export with llama.cpp's converter and compare every tensor and key with Wenmai's files."""
    import numpy as np
    from gguf import GGUFReader

    for ours in sorted(export_dir.glob("*.gguf")):
        gguf_type = ours.stem.rsplit("-", 1)[-1].lower()
        theirs = export_dir.parent / f"llama-cpp-{gguf_type}.gguf"
        _call(
            [
                sys.executable,
                str(llama_cpp / "convert_hf_to_gguf.py"),
                str(export_dir),
                "--outfile",
                str(theirs),
                "--outtype",
                gguf_type,
            ]
        )
        a, b = GGUFReader(ours), GGUFReader(theirs)
        ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        same = [
            n
            for n in ta
            if n in tb
            and ta[n].tensor_type == tb[n].tensor_type
            and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
        ]
        keys = sorted(set(a.fields) ^ set(b.fields))
        print(f"- {ours.name} vs llama.cpp: {len(same)}/{len(tb)} tensors identical; keys in one file only: {keys}")
        theirs.unlink()


def _seconds(status: dict) -> float:
    parse = lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    return (parse(status["finished"]) - parse(status["started"])).total_seconds()


def _call(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    main()
