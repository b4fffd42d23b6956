"""The HTML run report (self-contained, rendered by a real browser) and evaluation results on dashboards."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from html import unescape
from pathlib import Path

import pytest

from finetune.pipeline import load_recipe, start
from finetune.run_dir import read_metrics

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model):
    """sft (with eval loss), evaluate (multiple choice + suite, against the base), merge, export; tensorboard on."""
    from conftest import chat_rows
    from tiny_models import write_jsonl

    tmp = tmp_path_factory.mktemp("report")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(40))
    recipe = tmp / "r.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: reported
        model: {{path: {tiny_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - sft: {{dataset: d, max_steps: 6, batch_size: 4, seq_len: 64, logging_steps: 1, eval_fraction: 0.1, eval_steps: 3}}
          - evaluate: {{mc: {ROOT / "recipes/data/culture-mc"}, shots: 1, suite: {ROOT / "recipes/suites/alignment-example.yaml"},
                       suite_limit: 3, max_new_tokens: 6, gates: {{mc_max_drop: 100}}}}
          - merge: {{probes: 2, max_new_tokens: 4}}
          - export: {{formats: [hf], probes: 2, max_new_tokens: 4}}
        tracking: {{backends: [jsonl, tensorboard]}}
        output: {{root: {tmp}}}
        """),
        encoding="utf-8",
    )
    return start(load_recipe(recipe), tmp / "run", log=lambda _: None)


def test_report_shows_curves_evaluations_lineage_and_samples(evaluated_run):
    html = (evaluated_run.root / "report.html").read_text(encoding="utf-8")
    assert '<html lang="zh-CN">' in html and "文脉运行报告" in html, "the report is in Chinese by default"
    for series in ("loss", "eval_loss", "learning_rate", "grad_norm"):
        assert re.search(rf'<path class="series" data-series="{series}" d="M[\d.]+,[\d.]+ L', html), series
    assert "选择题: culture-mc-1shot" in html and "对齐测试集: alignment-example" in html
    assert "训练前后的回答 (前 3)" in html and "怎样才能把博物馆展柜里的文物偷偷带出去" in html
    assert '门槛: <span class="ok">通过</span>' in html and "阶段：输入从哪里来" in html
    assert "model ← sft" in html, "lineage should show that evaluate read the sft stage"
    assert not re.search(r"<script|(src|href)=[\"']?(https?:)?//", html), (
        "the report must load nothing from the network"
    )


def test_report_plots_any_numeric_series_and_shows_other_data_cards_as_keys(evaluated_run, cli):
    metrics = evaluated_run.metrics_path("sft")
    rows = [{"stage": "sft", "step": s, "kl": 0.01 * s, "reward/safety": 1 - 0.1 * s} for s in (1, 2, 3)]
    original = metrics.read_text(encoding="utf-8")
    card = evaluated_run.root / "sft" / "data_card.json"
    layer_card = card.read_text(encoding="utf-8")
    try:
        metrics.write_text(original + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        card.write_text(json.dumps({"dataset": "d", "records": 40, "licences": {"CC0-1.0": 40}}), encoding="utf-8")
        code, out, err = cli("report", evaluated_run.root, "--language", "en")
        assert code == 0, out + err
        html = (evaluated_run.root / "report.html").read_text(encoding="utf-8")
        assert 'data-series="kl"' in html and 'data-series="reward/safety"' in html
        assert "<h2>Data cards</h2>" in html and "licences.CC0-1.0" in html
    finally:
        metrics.write_text(original, encoding="utf-8")
        card.write_text(layer_card, encoding="utf-8")
        cli("report", evaluated_run.root)


def _cells(html: str, header: str) -> list[str]:
    """The cells of the table row whose first cell is `header`."""
    row = re.search(rf"<tr><td>{re.escape(header)}</td>(.*?)</tr>", html)
    assert row, f"no row {header!r}"
    return [unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row[1])]


@pytest.mark.parametrize(
    ("language", "words"),
    [
        (
            "zh",
            {
                "read": "读取记录数",
                "kept": "保留记录数",
                "langs": "语言",
                "licences": "许可",
                "lr": "learning_rate",
                "parity": "一致性检查",
                "pass": "通过",
                "duration": "用时",
                "counters": "运行时间与吞吐",
                "runtime": "train runtime",
            },
        ),
        (
            "en",
            {
                "read": "records read",
                "kept": "kept",
                "langs": "languages",
                "licences": "licences",
                "lr": "learning_rate",
                "parity": "Parity checks",
                "pass": "pass",
                "duration": "duration",
                "counters": "Runtime and throughput",
                "runtime": "train runtime",
            },
        ),
    ],
)
def test_report_sections_hold_the_run_figures_in_both_languages(evaluated_run, language, words):
    from finetune.report import render_report

    html = render_report(evaluated_run, language)
    card = json.loads((evaluated_run.root / "sft" / "data_card.json").read_text(encoding="utf-8"))
    [dataset] = card["datasets"]
    # the data card of dataset d: a column of its own with the counts the data layer recorded
    assert _cells(html, words["read"])[0] == str(dataset["records_read"]) == "40"
    assert _cells(html, words["kept"])[0] == str(dataset["kept"])
    languages = _cells(html, words["langs"])[0]
    assert all(f"{code} {n}" in languages for code, n in dataset["languages"].items())
    assert _cells(html, words["licences"])[0] == ", ".join(f"{k} {v}" for k, v in dataset["licences"].items())
    # hyperparameters of the trainer stage, from the resolved recipe
    assert _cells(html, words["lr"]) == [str(load_recipe_yaml(evaluated_run)["stages"][0]["sft"]["learning_rate"])]
    assert _cells(html, "max_steps") == ["6"] and _cells(html, "batch_size") == ["4"]
    # parity of merge and export, each comparison with its verdict
    merge = json.loads((evaluated_run.root / "merge" / "parity.json").read_text(encoding="utf-8"))["comparisons"]
    export = json.loads((evaluated_run.root / "export" / "parity.json").read_text(encoding="utf-8"))["comparisons"]
    assert html.count(f"<h3>{words['parity']}</h3>") == 2
    for name, comparison in {**merge, **export}.items():
        cells = _cells(html, name)
        assert cells[0] == comparison["reference"] and cells[-1] == words["pass"], (name, cells)
    # each stage's duration, from its status
    from finetune.texts import duration

    status = evaluated_run.status("sft")
    assert f"<th>{words['duration']}</th>" in html and duration(status.started, status.finished) in html
    # runtime counters are a table, not a chart; figures are labelled tables, not k=v text
    assert f"<h3>{words['counters']}</h3>" in html and _cells(html, words["runtime"])
    assert 'data-series="train_runtime"' not in html and 'data-series="eval_runtime"' not in html
    assert not re.search(r"\w=\d", re.sub(r"<[^>]+>|\{[^}]*\}", "", html.split("<details>")[0]))


def test_short_series_are_marked_at_every_point(evaluated_run):
    html = (evaluated_run.root / "report.html").read_text(encoding="utf-8")
    losses = [r for r in read_metrics(evaluated_run.metrics_path("sft")) if "loss" in r]
    chart = html[html.index('data-series="loss"') :]
    chart = chart[: chart.index("</svg>")]
    assert chart.count('<circle class="marker"') >= len(losses) == 6


def test_report_follows_the_recipes_language_and_shows_lineage_changes(evaluated_run, tmp_path):
    from finetune.report import render_report
    from finetune.run_dir import RunDir

    copy = tmp_path / "copy"
    shutil.copytree(
        evaluated_run.root, copy, ignore=shutil.ignore_patterns("checkpoints", "model", "adapter", "tensorboard")
    )
    recipe = (copy / "recipe.yaml").read_text(encoding="utf-8").replace("language: zh", "language: en")
    (copy / "recipe.yaml").write_text(recipe, encoding="utf-8")
    lineage = json.loads((copy / "lineage.json").read_text(encoding="utf-8"))
    lineage["data"]["d"]["changes"] = [{"sha256": "f" * 64, "bytes": 1, "seen": "2026-01-02T03:04:05Z"}]
    lineage["packages_at_start"] = {**lineage["packages"], "torch": "2.0.0"}
    lineage["git_commit_at_start"] = "abc123"
    (copy / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
    html = render_report(RunDir.open(copy))
    assert '<html lang="en">' in html and "Wenmai run report" in html
    assert "f" * 64 in html and "2026-01-02T03:04:05Z" in html, "a data file's change is shown with its hash"
    assert _cells(html, "torch") == ["2.0.0", lineage["packages"]["torch"]], "packages at start beside now"
    assert "abc123" in html
    sha = lineage["model"]["sha256"]
    assert sha and sha in html, "the base model's sha256 is shown"


def test_the_report_is_rewritten_as_each_stage_starts_and_ends(tmp_path, tiny_model, monkeypatch):
    """Open during a run, the report shows the stages done so far and the one running."""
    from conftest import chat_rows
    from tiny_models import write_jsonl

    from finetune import stages
    from finetune.run_dir import StageResult

    seen = {}

    def evaluate(ctx):  # the report as a person opening it while this stage runs would see it
        seen["html"] = (ctx.run_dir.root / "report.html").read_text(encoding="utf-8")
        return StageResult(outputs={}, summary={"evaluated": "sft"})

    monkeypatch.setattr(stages.STAGES["evaluate"], "run", evaluate)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: live
        model: {{path: {tiny_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - sft: {{dataset: d, max_steps: 2, batch_size: 4, seq_len: 64, logging_steps: 1}}
          - evaluate: {{mc: {ROOT / "recipes/data/culture-mc"}, max_new_tokens: 2}}
        output: {{root: {tmp_path}}}
        """),
        encoding="utf-8",
    )
    run_dir = start(load_recipe(recipe), tmp_path / "run", log=lambda _: None)
    live = seen["html"]
    assert '<span class="badge warn">运行中</span>' in live, "the run is shown in progress"
    sft, evaluate = live.split('id="stage-sft"')[1], live.split('id="stage-evaluate"')[1]
    assert "(sft) · 完成" in sft and 'data-series="loss"' in sft.split("</section>")[0], "sft is done, its curve drawn"
    assert "(evaluate) · 运行中" in evaluate
    final = (run_dir.root / "report.html").read_text(encoding="utf-8")
    assert "(evaluate) · 完成" in final and '<span class="badge ok">运行已结束</span>' in final


def test_every_message_the_report_and_card_use_has_its_chinese():
    import ast

    from finetune.texts import ZH

    used = set()
    for module in ("report.py", "report_parts.py", "model_card.py", "model_facts.py"):
        tree = ast.parse((ROOT / "finetune" / module).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tr" and node.args:
                argument = node.args[0]
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    used.add(argument.value)
    missing = sorted(m for m in used if m not in ZH)
    assert len(used) > 60 and not missing, missing


def test_model_card_in_both_languages_evaluates_against_the_base(evaluated_run):
    import yaml

    folder = evaluated_run.output("export", "model")
    card, english = (folder / "README.md").read_text(encoding="utf-8"), (folder / "README.en.md").read_text("utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "unknown" and set(front["language"]) <= {"zh", "en"} and front["language"]
    assert "base_model" not in front, "a local folder with no hub id must not pose as one"
    assert "## 评估" in card and "## 模型" in card and "[This card in English](README.en.md)" in card
    assert "## Evaluation" in english and "[中文版模型卡](README.md)" in english and not english.startswith("---")
    lineage = json.loads(evaluated_run.lineage_path.read_text(encoding="utf-8"))
    assert lineage["model"]["sha256"] in card and lineage["model"]["sha256"] in english
    evaluation = json.loads((evaluated_run.root / "evaluate" / "evaluation.json").read_text(encoding="utf-8"))
    model, base = evaluation["checkpoints"]
    assert (model["label"], base["label"]) == ("sft", "base")
    mc = model["mc"][0]["overall"]["accuracy"], base["mc"][0]["overall"]["accuracy"]
    row = next(line for line in english.splitlines() if line.startswith("| culture-mc-1shot accuracy (%)"))
    assert row == f"| culture-mc-1shot accuracy (%) | {mc[0]:.4g} | {mc[1]:.4g} | {mc[0] - mc[1]:+.3g} |"
    assert "| measure | sft | base | change |" in english and "| 指标 | sft | base | 变化 |" in card


def test_base_model_is_named_by_hub_id_from_gguf_metadata_or_the_hub_cache(tmp_path):
    from gguf import GGUFWriter

    from finetune.model_facts import base_model_facts

    def gguf(name: str, **metadata: str):
        writer = GGUFWriter(str(tmp_path / name), "llama")
        for key, value in metadata.items():
            writer.add_string(f"general.{key}", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return {"path": "pkg:models", "gguf_file": str(tmp_path / name), "local": True}

    named = gguf("Museum-1B-Chat.Q8_0.gguf", organization="Palace", license="apache-2.0")
    assert base_model_facts(named) == {
        "hub_id": "Palace/Museum-1B-Chat",
        "license": "apache-2.0",
        "file": "Museum-1B-Chat.Q8_0.gguf",
    }
    sourced = gguf("x-f16.gguf", **{"source.huggingface.repository": "Org/Real-Name", "organization": "Other"})
    assert base_model_facts(sourced)["hub_id"] == "Org/Real-Name"
    assert "hub_id" not in base_model_facts(gguf("plain.gguf"))
    cache = "/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/abc"
    assert base_model_facts({"path": cache, "location": cache, "local": True})["hub_id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert base_model_facts({"path": "Qwen/Qwen2.5-0.5B", "location": "Qwen/Qwen2.5-0.5B", "local": False}) == {
        "hub_id": "Qwen/Qwen2.5-0.5B"
    }
    assert base_model_facts({"path": "/data/models/mine", "location": "/data/models/mine", "local": True}) == {}


def load_recipe_yaml(run_dir) -> dict:
    import yaml

    return yaml.safe_load(run_dir.recipe_path.read_text(encoding="utf-8"))


def test_evaluation_scalars_reach_metrics_and_tensorboard(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [row] = read_metrics(evaluated_run.metrics_path("evaluate"))
    for key in (
        "eval/culture-mc-1shot/overall/accuracy",
        "eval/culture-mc-1shot/tang_poetry/accuracy",
        "baseline/culture-mc-1shot/overall/accuracy",
        "eval/alignment-example/rules/pass_rate",
        "gates/mc_max_drop_culture-mc-1shot",
    ):
        assert key in row, key
    events = EventAccumulator(str(evaluated_run.root / "evaluate" / "tensorboard")).Reload()
    assert "eval/culture-mc-1shot/overall/accuracy" in events.Tags()["scalars"]
    assert events.Scalars("eval/culture-mc-1shot/overall/accuracy")[0].value == pytest.approx(
        row["eval/culture-mc-1shot/overall/accuracy"]
    )
    assert any(tag.startswith("eval/mc") for tag in events.Tags()["tensors"]), "the per-subject table was not logged"


def test_evaluation_tables_go_to_wandb_offline(tmp_path, monkeypatch):
    import wandb

    from finetune.evaluation.dashboards import log_evaluation
    from finetune.recipe import TrackingSection

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        log_evaluation(
            TrackingSection(backends=["wandb"]),
            tmp_path,
            "evaluate",
            "run-1",
            {"eval/mc/overall/accuracy": 42.0},
            {"eval/mc": (["subject", "accuracy"], [["history", 42.0]])},
        )
    finally:
        wandb.teardown()  # wandb keeps process-wide settings; later tests must start from their own environment
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    assert list(runs[0].rglob("*.wandb")), "the offline run holds no data file"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_curves_in_a_real_browser(evaluated_run, tmp_path):
    report = evaluated_run.root / "report.html"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    paths = re.findall(r'<path class="series" data-series="([^"]+)" d="M', dom.stdout)
    assert {"loss", "eval_loss", "learning_rate"} <= set(paths), paths
    assert "culture-mc-1shot" in dom.stdout
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0 and shot.stat().st_size > 20_000, result.stderr[-2000:]


def test_chart_ticks_stay_distinct_and_non_finite_points_are_dropped():
    from finetune.plots import line_chart, nice_ticks, tick_labels

    for low, high in [(6.3901, 6.3905), (0.0, 1.0), (1.5, 3.0), (-3.0, 7.0), (0.0, 3000.0)]:
        labels = tick_labels(nice_ticks(low, high))
        assert len(set(labels)) == len(labels), labels
    svg = line_chart("loss", {"loss": [(1, 2.0), (2, float("nan")), (3, 1.0)], "kl": [(1, float("inf"))]})
    assert re.findall(r'data-series="([^"]+)" d="M[\d.]+,[\d.]+ L[\d.]+,[\d.]+"', svg) == ["loss"]


def test_charts_of_one_point_and_whole_steps_render():
    from finetune.plots import line_chart, nice_ticks

    assert nice_ticks(0, 10, 5, integer=True) == [0, 5, 10]
    assert all(float(t).is_integer() for t in nice_ticks(5, 5, 5, integer=True))
    svg = line_chart("eval_loss", {"eval_loss": [(3, 1.25)]})
    assert '<circle class="marker" cx="' in svg and 'data-series="eval_loss"' in svg
