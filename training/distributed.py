"""Data-parallel training under ``torchrun``: one process per device, gradients averaged.

    torchrun --nproc_per_node 2 -m training.cli --preset mnist --data-dir ../shared/datasets/mnist

``optim.batch_size`` is the global batch: each of the N ranks trains on its own 1/N of every
batch, and the gradients are averaged over the ranks before each optimizer step, so the update
(and the meaning of the learning rates) is that of one process with the whole batch. The latent
noise and fake labels are drawn for the whole batch from the run's stream on every rank, each
rank taking its rows, so the random streams and the checkpoint do not depend on the world size.

Synchronisation is DistributedDataParallel's (an all-reduce mean of every gradient after
backward, parameters broadcast from rank 0 at the start), done here explicitly rather than by the
DDP wrapper: a GAN step runs D several times per backward (real, fake, and WGAN-GP's
interpolates with a double backward through ``autograd.grad``), which DDP's reducer does not
support. Rank 0 alone writes checkpoints, metrics, grids and evaluations.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

#: How long a collective waits for a missing rank before the job fails with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> slice:
        """This rank's share of a global batch of ``count`` rows."""
        share = count // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def join(device_type: str) -> World:
    """The job's World from torchrun's environment, joining its process group (gloo on CPU, nccl
    on CUDA; torchrun's rendezvous, single- or multi-node, sets MASTER_ADDR/PORT, RANK, ...)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_module(module: nn.Module, world: World) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    if world.size > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def average_gradients(module: nn.Module, world: World) -> None:
    """Replace each gradient by its mean over the ranks (one all-reduce of a flat buffer)."""
    if world.size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a small tensor over the ranks (logged figures)."""
    if world.size > 1:
        dist.all_reduce(values)
        values /= world.size
    return values


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if it is true on any: a stop request must stop all ranks at one step."""
    if world.size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def leave() -> None:
    """Leave the process group once every rank is done: under torchrun a rank that exits without it
    may abort at interpreter exit (gloo's threads outlive the interpreter: "terminate called without
    an active exception"). Only at an end every rank reaches (done, stopped, diverged): after another
    error the other ranks may never reach the barrier."""
    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a rank already gone (a second signal): leave anyway
            dist.barrier()
        dist.destroy_process_group()
