"""Which process this is, and keeping processes in step: rank 0 owns the run folder, the others wait.

A launcher (torchrun, started by `wenmai launch`) tells each process its place through the environment
variables RANK, LOCAL_RANK and WORLD_SIZE; this module is the one place that reads them. A process that no
launcher started is rank 0 of a world of one, and every function here is then a no-op.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.errors import WenmaiError

if TYPE_CHECKING:
    from finetune.recipe import DistributedSection


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node
    launched: bool = False  # started by a launcher (torchrun), which sets up the process group's address

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's rank, local rank and world size, as the launcher set them."""
    return Ranks(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        launched="RANK" in os.environ and "MASTER_ADDR" in os.environ,
    )


def is_main_process() -> bool:
    """True on rank 0, the process that writes the run folder and talks to the user."""
    return current().is_main


def connect(section: DistributedSection) -> Ranks:
    """Join the process group when a launcher started several processes; pin each process to its GPU.

    Done before anything else so that rank 0 can create the run folder while the others wait at a barrier.
    DeepSpeed gets its own initialisation (it wraps torch.distributed and must know the group exists).
    """
    ranks = current()
    if section.strategy in ("deepspeed", "fsdp") and not ranks.launched:
        raise WenmaiError(
            f"distributed.strategy: {section.strategy} runs under a launcher, even on one GPU: "
            "start it with `wenmai launch RECIPE --gpus N` (or set strategy: none for `wenmai run`)"
        )
    if section.strategy == "deepspeed":
        _no_shared_memory_op_on_cpu()
    if ranks.world_size == 1:
        return ranks
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ranks.local_rank)  # quantized weights load onto the current device
    backend = "nccl" if cuda else "gloo"
    if section.strategy == "deepspeed":
        try:
            import deepspeed
        except ImportError:
            raise WenmaiError("distributed.strategy: deepspeed is not installed; pip install 'wenmai[gpu]'") from None
        deepspeed.init_distributed(dist_backend=backend)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return ranks


def _no_shared_memory_op_on_cpu() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce op; gloo does that job.

    DeepSpeed's CPU backend builds the op with torch's C++ extension loader at its first `init_distributed`
    (about 20 s with a compiler on 2 cores, and a failure without one), and a build killed half-way leaves the
    loader's lock file behind: every later run then waits on it for ever (seen in CI as ZeRO-3 runs that never
    started). DeepSpeed keeps the probe's result in `deepspeed.ops.__compatible_ops__` and says edits to it persist;
    marking the op incompatible makes `build_shm_op` return None and the backend fall back to torch.distributed.
    """
    import torch

    if torch.cuda.is_available():
        return
    try:
        import deepspeed.ops
    except ImportError:
        return  # the strategy check after this names the missing package
    compatible = deepspeed.ops.__compatible_ops__
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if current().world_size == 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` on rank 0; a function that says nothing on every other rank."""
    return log if is_main_process() else (lambda _message: None)


def quiet_other_ranks() -> None:
    """Keep the console to rank 0: other ranks show only errors (tracebacks of a failing rank still print)."""
    if is_main_process():
        return
    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "accelerate", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
