"""The data-layer benchmark reads the dedup index's memory while the index is alive, not after it was freed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_dedup_memory_figure_is_read_while_the_index_holds_every_kept_record(tmp_path, monkeypatch, capsys):
    from finetune.data import layer

    spec = importlib.util.spec_from_file_location("data_layer_bench", ROOT / "scripts" / "bench" / "data_layer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(layer, "Deduplicator", layer.Deduplicator)  # the bench swaps in its own; put it back after
    path = tmp_path / "bench.jsonl"
    bench.generate(path, 1)
    seen: list[int | None] = []  # at each memory reading: the records in the index the bench holds, if any
    rss = bench._rss_mb

    def reading() -> float:
        seen.append(len(bench.HELD[-1]._seen) if bench.HELD else None)
        return rss()

    monkeypatch.setattr(bench, "_rss_mb", reading)
    monkeypatch.setattr(sys, "argv", ["data_layer.py", "--file", str(path)])
    bench.main()
    out = capsys.readouterr().out
    kept = int(re.search(r"kept ([\d,]+);", out).group(1).replace(",", ""))
    assert kept > 1000 and seen == [None, kept, None], seen  # before the pass, with the index live, after freeing it
    assert re.search(r"dedup index, live: [\d,]+ bytes per record read, [\d,]+ per kept record", out), out
