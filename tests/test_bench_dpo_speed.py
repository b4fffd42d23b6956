"""The DPO speed benchmark runs end to end on CPU (tiny shape): both configurations, JSON lines and a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dpo_speed_benchmark_compares_trl_defaults_with_wenmai_on_cpu(tmp_path):
    out = tmp_path / "speed.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench" / "dpo_speed.py"),
            "--shape",
            "tiny",
            "--steps",
            "3",
            "--batch",
            "2",
            "--warmup-steps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"trl_defaults", "wenmai"}
    for row in rows.values():
        assert row["steps"] == 3 and row["pairs"] == 6 and row["pairs_per_s"] > 0 and len(row["losses"]) == 3
    assert rows["trl_defaults"]["settings"] == {
        "gradient_checkpointing": True,
        "precompute_ref_log_probs": False,
        "use_liger_kernel": False,
        "bf16": True,
        "reference": "adapter disabled",
    }
    wenmai = rows["wenmai"]["settings"]
    assert (
        wenmai["precompute_ref_log_probs"]
        and not wenmai["gradient_checkpointing"]
        and wenmai["reference"] == "ref adapter copy"
    )
    # the table's speed-up column: wenmai's pairs/s over the TRL defaults' (not the reference row over itself)
    table = {
        cells[0]: cells
        for line in result.stdout.splitlines()
        if line.startswith("| ") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 7
    }
    ratio = rows["wenmai"]["pairs_per_s"] / rows["trl_defaults"]["pairs_per_s"]
    assert table["wenmai"][1] == "cpu" and table["wenmai"][4] == f"{ratio:.2f}x", table["wenmai"]
    assert table["trl_defaults"][4] == "1.00x"
    # both train the same zero-initialised adapter against the same reference: step 1 is log 2 for each
    assert rows["trl_defaults"]["losses"][0] == rows["wenmai"]["losses"][0] == 0.69315
