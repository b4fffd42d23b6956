"""scripts/bench/gpu_owed.sh: the owed GPU figures in one command and one table (harness checked on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CANNED = Path(__file__).parent / "data" / "gpu_owed"  # what `gpu_owed.sh --tiny` wrote on a CPU machine

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import owed_table  # noqa: E402


def test_the_table_names_each_figure_its_reference_and_what_did_not_finish(tmp_path):
    folder = tmp_path / "owed"
    shutil.copytree(CANNED, folder)
    gpu_row = {
        "config": "zero3",
        "shape": "1b",
        "quantization": "nf4",
        "peak_bytes": 3 * 1024**3,
        "estimate_bytes": int(3.3 * 1024**3),
        "estimate_over_measured": 1.1,
    }
    with (folder / "qlora_zero3.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(gpu_row) + "\n")
    (folder / "sft_qlora_8b.status.json").write_text(
        '{"part": "sft_qlora_8b", "exit": 124, "seconds": 130, "box": 130}'
    )
    table = owed_table.main(folder)
    lines = table.splitlines()
    assert lines[0] == "| figure owed | Wenmai | reference | ratio |"
    assert (
        "| zero3 (nf4, 1b) peak memory | 3.00 GiB (GPU peak) | pre-flight estimate 3.30 GiB | estimate / measured 1.1 |"
        in lines
    )
    assert "| plain (none, tiny) peak memory | 0.64 GiB (host max RSS) |" in table
    [wenmai_sft] = [line for line in lines if line.startswith("| sft_lora_tiny: wenmai tokens/s")]
    assert "| hf-gc-b4 447.4 | 0.884x" in wenmai_sft  # Wenmai against plain HF + PEFT (the first configuration)
    assert "| sft_lora_tiny: hf-liger-gc-b4 | skipped: Liger needs a CUDA GPU" in table
    [dpo] = [line for line in lines if line.startswith("| dpo (tiny): wenmai pairs/s")]
    assert "| trl_defaults 1.241 | 0.19x |" in dpo
    assert "sft_qlora_8b ran out of its 130 s box" in lines[-1] and "dpo_tiny ok, 121 s" in lines[-1]


@pytest.mark.slow
def test_gpu_owed_runs_every_part_on_the_tiny_shapes(tmp_path):
    done = subprocess.run(
        ["bash", "scripts/bench/gpu_owed.sh", "--tiny", "--out", str(tmp_path / "owed")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "owed" / "owed.md").read_text(encoding="utf-8")
    assert "Parts: dpo_tiny ok" in table and "qlora_zero3 ok" in table and "sft_lora_tiny ok" in table
    assert "| sft_lora_tiny: wenmai tokens/s |" in table and "| dpo (tiny): wenmai pairs/s (steady) |" in table
