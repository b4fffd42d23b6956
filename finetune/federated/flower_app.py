"""The objects `flwr run` and the SuperNodes load (`finetune.federated.flower_app:server` / `:client`); their
settings come from Flower's context (the run config's `run-dir`, each SuperNode's `--node-config`)."""

from finetune.federated.apps import client_app, server_app

server = server_app()
client = client_app()
