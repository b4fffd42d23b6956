"""`wenmai launch`: one process per GPU on one node or several, all writing one run folder.

The launcher is torchrun (`python -m torch.distributed.run`). It ships with PyTorch, so there is nothing
more to install or configure; it starts one process per GPU on each node from the same command line
(under SLURM: one launcher per node, its rank from SLURM_NODEID); it runs on CPU with gloo, so the
multi-process path is tested on machines without GPUs; and it leaves DeepSpeed and FSDP to the Trainer,
which gets them from the recipe through the one training-arguments builder. The `deepspeed` launcher
would add ssh/pdsh and a hostfile, and `accelerate launch` a second config file that must agree with
the recipe.

The launcher decides the run folder and passes it to every process with `--run-dir`: rank 0 creates it,
the others write nothing but their own checkpoint shards.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import WenmaiError
from finetune.recipe import Recipe
from finetune.run_dir import RunDir


@dataclass(frozen=True)
class LaunchPlan:
    """The command to run on this node, the environment it adds, and the run folder every process shares."""

    command: list[str]
    world_size: int
    gpus_per_node: int
    run_dir: Path | None  # None when resuming (the command names the folder)
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one shell line (what `--dry-run` prints)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.command)


def plan(
    recipe_path: Path | None,
    recipe: Recipe,
    gpus: int,
    nodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int = 29500,
    run_dir: Path | None = None,
    resume: Path | None = None,
    overrides: tuple[str, ...] = (),
    cpu: bool = False,
) -> LaunchPlan:
    """The torchrun command for `gpus` processes on each of `nodes` nodes, this node being `node_rank`."""
    if gpus < 1:
        raise WenmaiError(f"--gpus {gpus}: give the number of processes per node, one per GPU (at least 1)")
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise WenmaiError(f"--node-rank {node_rank} with --nodes {nodes}: node ranks go from 0 to {nodes - 1}")
    if resume is not None and run_dir is not None:
        raise WenmaiError("--run-dir and --resume cannot be combined: --resume names the folder to continue")
    if nodes > 1 and master_addr is None:
        raise WenmaiError(f"--nodes {nodes} needs --master-addr: the address of node 0, the same on every node")
    if nodes > 1 and run_dir is None and resume is None:
        raise WenmaiError(
            f"--nodes {nodes} needs --run-dir on a filesystem every node sees, the same on every node "
            "(e.g. runs/NAME-$SLURM_JOB_ID); each node would otherwise pick its own folder"
        )
    if resume is None and run_dir is None:
        run_dir = RunDir.default_path(recipe.output.root, recipe.name)

    command = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        command += ["--standalone", "--nnodes", "1"]
    else:
        command += [
            "--nnodes",
            str(nodes),
            "--node-rank",
            str(node_rank),
            "--master-addr",
            master_addr,
            "--master-port",
            str(master_port),
        ]
    command += ["--nproc-per-node", str(gpus), "-m", "finetune.cli", "run"]
    if resume is not None:
        command += ([str(recipe_path)] if recipe_path else []) + ["--resume", str(resume)]
    else:
        command += [str(recipe_path), "--run-dir", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    env = {"CUDA_VISIBLE_DEVICES": ""} if cpu else {}
    return LaunchPlan(command, gpus * nodes, gpus, run_dir, env)


def execute(launch_plan: LaunchPlan) -> None:
    """Become the launcher: signals (Ctrl-C, SLURM's SIGTERM) reach torchrun, which stops every process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(launch_plan.command[0], launch_plan.command, {**os.environ, **launch_plan.env})
