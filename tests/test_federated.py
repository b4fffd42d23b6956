"""Federated LoRA on Flower: the recipe section, what travels, the average, the run folder (tiny model, simulation)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from finetune.errors import ConfigError, WenmaiError

ROOT = Path(__file__).resolve().parent.parent
MUSEUMS = ROOT / "recipes" / "data" / "museums"
CLIENT_RECORDS = {"palace": 30, "poetry": 40, "heritage": 50}  # different sizes: the average must follow them


def federated_recipe(model: Path, root: Path, clients=CLIENT_RECORDS, **federated) -> str:
    files = {"palace": "palace_museum", "poetry": "poetry_museum", "heritage": "heritage_museum"}
    data = "\n".join(
        f"  {name}: {{path: {MUSEUMS / files[name]}.jsonl, format: chat, max_records: {n}, defaults: {{licence: CC0-1.0}}}}"
        for name, n in clients.items()
    )
    settings = {"rounds": 3, "local_steps": 3, **federated}
    extra = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in settings.items())
    listed = ", ".join(f"{{name: {n}, dataset: {n}}}" for n in clients)
    return (
        textwrap.dedent(f"""\
        name: fed
        model: {{path: {model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
        """)
        + data
        + textwrap.dedent(f"""
        stages:
          - sft: {{dataset: {next(iter(clients))}, max_steps: 3, batch_size: 4, seq_len: 64, logging_steps: 1,
                   learning_rate: 1.0e-2, warmup: 0, eval_fraction: 0.2}}
        output: {{root: {root}}}
        federated:
        """)
        + extra
        + f"  clients: [{listed}]\n"
    )


def load(path: Path):
    from finetune.pipeline import load_recipe

    return load_recipe(path)


def problems_of(write_recipe, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(write_recipe(text))
    return str(err.value)


# --- the recipe section ------------------------------------------------------------------------------------------


def test_rounds_zero_is_refused(write_recipe, tiny_model, tmp_path):
    message = problems_of(write_recipe, federated_recipe(tiny_model, tmp_path, rounds=0))
    assert "federated.rounds" in message and "greater than or equal to 1" in message


def test_strategy_typo_gets_did_you_mean(write_recipe, tiny_model, tmp_path):
    message = problems_of(write_recipe, federated_recipe(tiny_model, tmp_path, strategy="fedprx"))
    assert "federated.strategy" in message and "did you mean fedprox?" in message


def test_combinations_flower_cannot_run_are_refused(write_recipe, tiny_model, tmp_path):
    dp = {"noise_multiplier": 0.5, "clipping_norm": 1.0}
    message = problems_of(
        write_recipe, federated_recipe(tiny_model, tmp_path, strategy="fedadam", differential_privacy=dp)
    )
    assert "federated.differential_privacy" in message and "FedAdam" in message
    message = problems_of(write_recipe, federated_recipe(tiny_model, tmp_path, secure_aggregation=True))
    assert "federated.secure_aggregation" in message and "legacy" in message
    message = problems_of(write_recipe, federated_recipe(tiny_model, tmp_path, fraction=0.5, differential_privacy=dp))
    assert "federated.fraction" in message
    message = problems_of(write_recipe, federated_recipe(tiny_model, tmp_path, proximal_mu=0.1))
    assert "federated.proximal_mu" in message and "fedprox" in message


def test_client_dataset_must_exist_and_names_be_unique(write_recipe, tiny_model, tmp_path):
    text = federated_recipe(tiny_model, tmp_path).replace(
        "{name: poetry, dataset: poetry}", "{name: palace, dataset: poems}"
    )
    message = problems_of(write_recipe, text)
    assert "federated.clients[1].dataset" in message and "'poems' is not in `data`" in message
    assert "federated.clients[1].name" in message and "listed twice" in message


def test_unknown_client_name_is_refused_with_the_known_names(write_recipe, tiny_model, tmp_path):
    from finetune.federated.apps import ClientSettings

    path = write_recipe(federated_recipe(tiny_model, tmp_path))
    with pytest.raises(WenmaiError) as err:
        ClientSettings(str(path), str(tmp_path / "client"), name="poety").load(None)
    assert "unknown client 'poety'" in str(err.value) and "did you mean poetry?" in str(err.value)


def server_only(text: str) -> str:
    """The server's recipe: the clients by name, no `data`, no dataset in the stage or the client entries."""
    text = text[: text.index("data:")] + text[text.index("\nstages:") + 1 :]
    text = text.replace("dataset: palace, max_steps", "max_steps")
    for name in CLIENT_RECORDS:
        text = text.replace(f"{{name: {name}, dataset: {name}}}", f"{{name: {name}}}")
    assert "dataset" not in text and "data:" not in text
    return text


def test_the_servers_recipe_names_clients_and_no_data(write_recipe, tiny_model, tmp_path, cli):
    server = write_recipe(server_only(federated_recipe(tiny_model, tmp_path / "runs")))
    code, out, err = cli("validate", server)
    assert code == 0 and "recipe is valid" in out, err
    # `wenmai run` on it would train the sft stage here, on nothing: refused before a run folder exists
    code, _, err = cli("run", server)
    assert code == 2 and "names no dataset" in err and "wenmai federate server" in err
    assert not (tmp_path / "runs").exists()
    # a client whose recipe is the server's has no data to train on: refused with the fix
    from finetune.federated.local import client_dataset

    with pytest.raises(WenmaiError) as err_info:
        client_dataset(load(server).recipe, "poetry")
    assert "client 'poetry' has no data" in str(err_info.value) and "`dataset`" in str(err_info.value)
    # and a plain recipe without a dataset is refused as before, with the stage named
    plain = federated_recipe(tiny_model, tmp_path).replace("dataset: palace, max_steps", "max_steps")
    message = problems_of(write_recipe, plain[: plain.index("federated:")])
    assert "stages[0].sft" in message and "needs `dataset`" in message


def test_shipped_museum_recipe_validates(cli):
    code, out, err = cli("validate", ROOT / "recipes" / "federated-museums.yaml", "--full")
    assert code == 0, err
    assert "federated:" in out and "heritage" in out and "recipe is valid" in out


# --- what travels ------------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes(tiny_model):
    from finetune import model as model_path
    from finetune.federated.lora import load_lora_state, lora_state
    from finetune.recipe import LoraSection, ModelSection

    section = ModelSection(path=str(tiny_model))
    source = model_path.resolve_source(section)
    server = model_path.attach_new_adapter(model_path.load_model(section, source), LoraSection(r=4, alpha=8))
    client = model_path.attach_new_adapter(model_path.load_model(section, source), LoraSection(r=8, alpha=16))
    state = lora_state(server)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    with pytest.raises(WenmaiError) as err:
        load_lora_state(client, state, "the server's adapter", "this client's recipe")
    message = str(err.value)
    assert "(4, 32)" in message and "(8, 32)" in message and "lora.r" in message


# --- simulation on the tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_museums(tiny_model, tmp_path_factory):
    """Three clients, three rounds of fedavg, every reply the server received kept."""
    from finetune.federated.simulate import simulate

    folder = tmp_path_factory.mktemp("fed3")
    path = folder / "recipe.yaml"
    path.write_text(federated_recipe(tiny_model, folder / "runs"), encoding="utf-8")
    replies = []
    run_dir = simulate(load(path), run_dir_path=folder / "run", observe=replies.append, log=lambda _: None)
    return run_dir, replies


def test_simulation_loss_falls_across_rounds(three_museums):
    run_dir, _ = three_museums
    state = json.loads((run_dir.root / "sft" / "federated.json").read_text())
    rounds = state["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    assert set(rounds[0]["clients"]) == set(CLIENT_RECORDS)
    status = json.loads((run_dir.root / "sft" / "status.json").read_text())
    assert status["state"] == "done" and status["outputs"]["adapter"] == "adapter"


def test_average_weights_follow_example_counts(three_museums):
    """Round 1's global adapter is the mean of the three updates weighted by each client's example count."""
    import torch
    from safetensors.torch import load_file

    run_dir, replies = three_museums
    round_one = [r for r in replies if r.metadata.message_type == "train"][:3]
    counts = {str(r.content["client"]["name"]): int(r.content["metrics"]["num-examples"]) for r in round_one}
    # each client counts what passed its data layer, less its held-out 20%: three different weights
    assert set(counts) == set(CLIENT_RECORDS) and len(set(counts.values())) == 3
    assert counts["palace"] < counts["poetry"] < counts["heritage"]
    total = sum(counts.values())
    expected = {}
    for reply in round_one:
        weight = counts[str(reply.content["client"]["name"])] / total
        for key, tensor in reply.content["arrays"].to_torch_state_dict().items():
            expected[key] = expected.get(key, 0) + weight * tensor.double()
    saved = load_file(str(run_dir.root / "sft" / "rounds" / "round-0001" / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(expected)
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=1e-5, atol=1e-7)
    unweighted = {k: sum(r.content["arrays"].to_torch_state_dict()[k].double() for r in round_one) / 3 for k in saved}
    assert any(not torch.allclose(saved[k].double(), unweighted[k], atol=1e-7) for k in saved)


def test_replies_hold_only_lora_tensors_counts_and_metrics(three_museums):
    _, replies = three_museums
    assert len(replies) == 3 * 3 * 2  # 3 rounds x 3 clients x (train + evaluate)
    for reply in replies:
        records = dict(reply.content.items())
        kind = reply.metadata.message_type
        assert set(records) == ({"arrays", "metrics", "client"} if kind == "train" else {"metrics", "client"})
        assert dict(records["client"]) == {"name": str(records["client"]["name"])}
        metrics = dict(records["metrics"])
        assert all(isinstance(v, int | float) for v in metrics.values())
        allowed = (
            {"num-examples", "uniform-weight", "train-loss", "steps"}
            if kind == "train"
            else {"num-examples", "uniform-weight", "eval-loss"}
        )
        assert set(metrics) == allowed
        if kind == "train":
            arrays = records["arrays"].to_torch_state_dict()
            assert arrays and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in arrays)
            assert all(t.is_floating_point() for t in arrays.values())  # never token ids


def test_run_folder_holds_a_standard_adapter_per_round_and_lineage_without_data(three_museums, tiny_model):
    from finetune import model as model_path
    from finetune.recipe import ModelSection

    run_dir, _ = three_museums
    stage = run_dir.root / "sft"
    for number in (1, 2, 3):
        assert (stage / "rounds" / f"round-{number:04d}" / "adapter" / "adapter_config.json").is_file()
    section = ModelSection(path=str(tiny_model))
    model = model_path.load_adapter(
        model_path.load_model(section, model_path.resolve_source(section)), stage / "adapter", trainable=False
    )
    assert sum(1 for n, _ in model.named_parameters() if "lora_B" in n) > 0
    lineage = json.loads((run_dir.root / "lineage.json").read_text())
    assert lineage["federated"]["clients"] == list(CLIENT_RECORDS)
    assert [r["round"] for r in lineage["federated"]["rounds"]] == [1, 2, 3]
    assert lineage["data"] == {}
    text = json.dumps(lineage)
    assert "museum.jsonl" not in text and "Forbidden City" not in text
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["bytes"] > 0 for m in metrics)
    report = (run_dir.root / "report.html").read_text(encoding="utf-8")
    assert "联邦训练" in report and "留出集损失" in report  # the report is in Chinese by default
    assert all(name in report for name in CLIENT_RECORDS)


def test_one_round_one_client_fedavg_equals_local_training(tiny_model, tmp_path):
    """With one client and one round, the global adapter is exactly what that client trained locally."""
    import torch
    from safetensors.torch import load_file

    from finetune.federated.local import federated_stage, load_local_data, train_round
    from finetune.federated.server import GlobalAdapter
    from finetune.federated.simulate import simulate

    path = tmp_path / "recipe.yaml"
    path.write_text(federated_recipe(tiny_model, tmp_path / "runs", rounds=1), encoding="utf-8")
    loaded = load(path)
    run_dir = simulate(loaded, clients=1, run_dir_path=tmp_path / "run", log=lambda _: None)
    saved = load_file(str(run_dir.root / "sft" / "adapter" / "adapter_model.safetensors"))

    recipe = load(path).recipe
    start = GlobalAdapter(recipe, tmp_path / "start").state
    data = load_local_data(recipe, "palace", tmp_path / "local")
    local, _ = train_round(
        recipe, data, start, steps=3, seed=federated_stage(recipe).seed + 1, folder=tmp_path / "local"
    )
    assert set(saved) == set(local)
    for key, tensor in local.items():
        torch.testing.assert_close(saved[key].float(), tensor, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(local[k], start[k]) for k in local)  # it did train


def test_differential_privacy_clips_updates_and_reports_flowers_epsilon(tiny_model, tmp_path):
    """Client-side fixed clipping: every update that arrives is within the clipping norm; the epsilon in the run
    folder is what Flower's RDP accountant gives for the settings (2 clients, every round, 2 releases)."""
    import torch
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    from finetune.federated.server import GlobalAdapter
    from finetune.federated.simulate import simulate

    dp = {"clipping": "client", "noise_multiplier": 0.8, "clipping_norm": 0.01, "delta": 1e-5}
    path = tmp_path / "recipe.yaml"
    clients = {"palace": 20, "poetry": 20}
    path.write_text(
        federated_recipe(tiny_model, tmp_path / "runs", clients=clients, rounds=2, differential_privacy=dp),
        encoding="utf-8",
    )
    replies = []
    run_dir = simulate(load(path), run_dir_path=tmp_path / "run", observe=replies.append, log=lambda _: None)

    start = GlobalAdapter(load(path).recipe, tmp_path / "start").state
    first = [r for r in replies if r.metadata.message_type == "train"][:2]
    for reply in first:
        update = reply.content["arrays"].to_torch_state_dict()
        norm = torch.sqrt(sum(((update[k] - start[k]) ** 2).sum() for k in start))
        assert norm <= dp["clipping_norm"] * 1.0001
        assert norm >= dp["clipping_norm"] * 0.99  # clipped down to the norm: the raw update was larger

    rounds = json.loads((run_dir.root / "sft" / "federated.json").read_text())["rounds"]
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=2,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.8, sample_size=2, population_size=2), count=2)
    assert rounds[-1]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert rounds[0]["epsilon"] < rounds[-1]["epsilon"]  # it accumulates
    status = json.loads((run_dir.root / "sft" / "status.json").read_text())
    assert status["summary"]["epsilon"] == rounds[-1]["epsilon"]


def fake_message(kind: str, content, error: str | None = None, node: int = 1):
    from types import SimpleNamespace

    return SimpleNamespace(
        metadata=SimpleNamespace(message_type=kind, src_node_id=node),
        content=content,
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
    )


def test_the_server_refuses_strangers_and_wrong_shapes_and_fails_below_min_clients():
    from types import SimpleNamespace

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from finetune.federated.server import RecordingGrid
    from finetune.recipe import FederatedSection

    expected = {"layer.lora_A.weight": torch.zeros(2, 3)}

    def reply(name: str, tensor, node: int):
        records = {
            "arrays": ArrayRecord({"layer.lora_A.weight": tensor}),
            "metrics": MetricRecord({"num-examples": 3, "train-loss": 1.0}),
            "client": ConfigRecord({"name": name}),
        }
        return fake_message("train", RecordDict(records), node=node)

    sent = [fake_message("train", RecordDict({"arrays": ArrayRecord(expected)}))] * 3
    good, stranger = reply("a", torch.ones(2, 3), 1), reply("c", torch.ones(2, 3), 2)
    wrong_shape, lost = reply("b", torch.ones(4, 3), 3), fake_message("train", None, "Node Unavailable", node=4)

    section = FederatedSection(clients=[{"name": "a"}, {"name": "b"}], min_clients=1)
    grid = SimpleNamespace(send_and_receive=lambda messages, timeout=None: [good, stranger, wrong_shape])
    recorder = RecordingGrid(grid, section, expected, None)
    assert recorder.send_and_receive(sent, timeout=1) == [good]
    failures = " | ".join(recorder.take().failures)
    assert "calls itself 'c', which is not in federated.clients (a, b)" in failures
    assert "(4, 3)" in failures and "(2, 3)" in failures

    section = FederatedSection(clients=[{"name": "a"}, {"name": "b"}])  # min_clients: every client
    grid = SimpleNamespace(send_and_receive=lambda messages, timeout=None: [good, lost])
    with pytest.raises(WenmaiError) as err:
        RecordingGrid(grid, section, expected, None).send_and_receive(sent[:2], timeout=1)
    assert "only 1 of 2 clients" in str(err.value) and "min_clients" in str(err.value)
    assert "Node Unavailable" in str(err.value)


def test_cli_refuses_bad_client_counts_names_and_plain_remote_addresses(cli, write_recipe, tiny_model, tmp_path):
    path = write_recipe(federated_recipe(tiny_model, tmp_path / "runs"))
    code, _, err = cli("federate", "simulate", path, "--clients", "5")
    assert code == 2 and "--clients 5" in err and "give 1 to 3" in err
    code, _, err = cli("federate", "client", path, "--name", "poety", "--superlink", "127.0.0.1:9")
    assert code == 2 and "unknown client 'poety'" in err and "did you mean poetry?" in err
    code, _, err = cli("federate", "client", path, "--name", "poetry", "--superlink", "192.0.2.7:9092")
    assert code == 2 and "only over TLS" in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing half-written


def test_fedprox_proximal_term_keeps_the_update_near_the_global_adapter(write_recipe, tiny_model, tmp_path):
    """Our trainer adds (mu/2)|w - w_global|^2: with a large mu the local update moves the LoRA tensors less."""
    import torch

    from finetune.federated.local import load_local_data, train_round
    from finetune.federated.server import GlobalAdapter, build_strategy

    recipe = load(write_recipe(federated_recipe(tiny_model, tmp_path / "runs", strategy="fedprox"))).recipe
    start = GlobalAdapter(recipe, tmp_path / "start").state
    data = load_local_data(recipe, "palace", tmp_path / "local")

    def moved(mu: float) -> float:
        state, _ = train_round(recipe, data, start, steps=3, seed=1, folder=tmp_path / "local", proximal_mu=mu)
        return float(torch.sqrt(sum(((state[k] - start[k]) ** 2).sum() for k in start)))

    assert moved(500.0) < 0.5 * moved(0.0)
    strategy = build_strategy(recipe.federated, has_eval=True, state={"rounds": []})
    assert type(strategy).__name__ == "FedProx" and strategy.proximal_mu == recipe.federated.proximal_mu


def test_fedadam_is_flowers_with_the_recipes_server_learning_rate(write_recipe, tiny_model, tmp_path):
    from finetune.federated.server import build_strategy

    text = federated_recipe(tiny_model, tmp_path / "runs", strategy="fedadam", server_learning_rate=0.05, tau=0.01)
    section = load(write_recipe(text)).recipe.federated
    strategy = build_strategy(section, has_eval=False, state={"rounds": []})
    assert type(strategy).__name__ == "FedAdam" and (strategy.eta, strategy.tau) == (0.05, 0.01)
    assert strategy.min_train_nodes == 3 and strategy.weighted_by_key == "num-examples"


def test_compare_evaluates_global_local_only_and_centralised_on_every_clients_split(write_recipe, tiny_model, tmp_path):
    from finetune.federated.compare import compare
    from finetune.federated.server import GlobalAdapter
    from finetune.report import render_report
    from finetune.run_dir import RunDir, atomic_write_json

    loaded = load(write_recipe(federated_recipe(tiny_model, tmp_path / "runs", rounds=1, local_steps=1)))
    run_dir = RunDir.create(tmp_path / "runs", "fed", tmp_path / "run")
    run_dir.recipe_path.write_text(loaded.to_yaml(), encoding="utf-8")
    start = GlobalAdapter(loaded.recipe, run_dir.root / "sft")
    start.save_round(1, start.state)  # a global adapter equal to the start: as good as the base
    atomic_write_json(
        run_dir.lineage_path,
        {"stages": [{"name": "sft", "kind": "sft", "state": "done"}], "federated": {"strategy": "fedavg"}},
    )

    result = compare(run_dir, log=lambda _: None)
    labels = {"base", "global", "local:palace", "local:poetry", "local:heritage", "centralised"}
    assert set(result["eval_loss"]) == set(CLIENT_RECORDS) and set(result["mean"]) == labels
    assert (result["steps_local"], result["steps_centralised"]) == (1, 3)
    for row in result["eval_loss"].values():
        assert row["global"] == pytest.approx(row["base"], abs=1e-5)  # LoRA B starts at zero
        assert row["centralised"] < row["base"]  # three steps on the pooled data at lr 1e-2 help every split
    assert json.loads((run_dir.root / "sft" / "comparison.json").read_text())["mean"] == result["mean"]
    assert "Held-out loss on each client" in render_report(run_dir, language="en")
    assert "各参与方留出集上的损失" in render_report(run_dir)
