"""What this machine offers for training: its GPUs (the smallest counts) and free host memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """What this machine offers (the smallest GPU counts: every rank must fit)."""

    cuda: bool = False
    gpus: int = 0
    gpu_name: str | None = None
    gpu_memory: int = 0  # bytes
    bf16: bool = True  # assumed when planning on a machine without GPUs
    host_available: int = 0  # bytes


def detect() -> Hardware:
    """This machine's GPUs and free host memory."""
    import psutil
    import torch

    host = psutil.virtual_memory().available
    if not torch.cuda.is_available():
        return Hardware(host_available=host)
    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    smallest = min(props, key=lambda p: p.total_memory)
    return Hardware(
        cuda=True,
        gpus=count,
        gpu_name=smallest.name,
        gpu_memory=smallest.total_memory,
        bf16=torch.cuda.is_bf16_supported(),
        host_available=host,
    )
