"""Federated LoRA across institutions on Flower: the data never leaves each institution.

- `lora`: the tensors that travel (LoRA A/B only) and their shape checks
- `local`: a client's own data through the data layer, one round of local SFT, held-out loss
- `server`: the strategy (FedAvg / FedProx / FedAdam, DP fixed clipping) over the run folder, round by round
- `apps`: Wenmai's Flower ClientApp and ServerApp (Message API); `flower_app`: the objects `flwr run` loads
- `record`: lineage (clients and rounds, no data) and report; `simulate` and `deploy`: the `wenmai federate` commands
"""
