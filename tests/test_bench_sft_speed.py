"""scripts/bench/sft_speed.py runs on CPU with the tiny shape: plain HF + PEFT and Wenmai on the same data and seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_module():
    spec = importlib.util.spec_from_file_location("sft_speed", ROOT / "scripts" / "bench" / "sft_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(monkeypatch, capsys, tmp_path, *args: str) -> tuple[list[dict], str]:
    monkeypatch.setattr(sys, "argv", ["sft_speed.py", "--shape", "tiny", "--workdir", str(tmp_path), *args])
    bench_module().main()
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], out


def test_lora_benchmark_runs_baseline_and_wenmai_on_cpu_with_equal_losses(monkeypatch, capsys, tmp_path):
    rows, out = run(
        monkeypatch, capsys, tmp_path, "--workload", "lora", "--steps", "2", "--warmup", "1", "--lengths", "mixed"
    )
    by_name = {r["config"]: r for r in rows}
    assert list(by_name) == ["hf-gc-b4", "hf-liger-gc-b4", "hf-nogc-b2", "wenmai", "wenmai-max"]
    assert "CUDA" in by_name["hf-liger-gc-b4"]["skipped"]
    for name in ("hf-gc-b4", "hf-nogc-b2", "wenmai"):
        assert by_name[name]["tokens_per_s"] > 0 and len(by_name[name]["losses"]) == 3
    wenmai = by_name["wenmai"]
    assert wenmai["plan"]["padding_free"] and (wenmai["micro_batch"], wenmai["accumulation"]) == (4, 1)
    assert (
        wenmai["max_loss_diff"] < 1e-3
    )  # same data, same seed, same losses: speed that changes the result does not count
    assert by_name["hf-nogc-b2"]["max_loss_diff"] < 1e-3
    assert "| wenmai | 4 x 1 |" in out and "| setting |" in out


def test_qlora_benchmark_on_cpu_says_what_it_needs(monkeypatch, capsys, tmp_path):
    rows, out = run(monkeypatch, capsys, tmp_path, "--workload", "qlora")
    assert [r["config"] for r in rows] == ["hf-qlora-naive-b1", "wenmai-qlora"]
    assert all(r["skipped"] == "nf4 needs a CUDA GPU and bitsandbytes" for r in rows)


def test_each_configuration_can_run_in_its_own_process(monkeypatch, capsys, tmp_path):
    """The GPU path: a worker process per configuration (a clean peak), its result read back."""
    rows, _ = run(monkeypatch, capsys, tmp_path, "--configs", "wenmai", "--steps", "1", "--warmup", "1", "--isolate")
    assert [r["config"] for r in rows] == ["wenmai"]
    assert rows[0]["tokens_per_s"] > 0 and len(rows[0]["losses"]) == 2, rows
