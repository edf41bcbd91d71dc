"""Training on several processes with torchrun and DistributedDataParallel.

    torchrun --standalone --nproc_per_node 2 -m dart_ee train --config configs/cifar10_alexnet.yaml

One process per device: gloo on CPUs, NCCL on GPUs (torchrun sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``). The result does not depend on how many processes share the work:

- the config's batch size is the *global* one; every process draws the same permutation and the same
  augmentation for the whole global batch, then trains on its own contiguous share of it;
- BatchNorm statistics are reduced over all processes (``SyncBatchNorm``: torch's on GPUs, the one here
  on CPUs, where torch's refuses to run), so each process normalises as one process would;
- DDP averages the gradients, so the update is the one of the global batch.

Dropout draws its masks per process, so models with dropout (AlexNet, VGG-16) agree with a single
process in distribution, not bit for bit. Every exit head stays in the loss, a zero-weight one
multiplied by zero, so every parameter gets a gradient in every step and DDP neither waits for a
gradient that never comes nor skips one. Rank 0 alone writes the run folder (atomically) and logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dart_ee.core.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Where this process stands, from torchrun's environment variables."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    """Whether this process writes: rank 0, or the only process."""
    return world().main


def start(device_type: str) -> World:
    """Join the process group when torchrun started several processes (gloo on CPU, NCCL on CUDA)."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return w


@contextmanager
def session() -> Iterator[None]:
    """Leave the process group, if the command joined one, when it ends (also on an error). A process that exits
    with gloo's threads still running can abort in their destructor ("terminate called without an active
    exception") after its work is done. No barrier first: the other ranks may be gone, or (``dart-ee run``) rank 0
    may still be busy with the steps after training, which use no group."""
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all processes (``t`` itself with one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def local_share(batch_size: int, w: World) -> slice:
    """This process's contiguous share of a global batch."""
    if batch_size % w.size:
        raise ConfigError(f"train.batch_size={batch_size} does not divide among {w.size} processes; choose a multiple "
                          f"of {w.size} (it is the global batch, split evenly)")
    n = batch_size // w.size
    return slice(w.rank * n, (w.rank + 1) * n)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on CPUs (gloo), where torch's SyncBatchNorm refuses to run: the batch's
    sums are reduced over all processes with a differentiable all-reduce, so statistics and gradients are
    those of the global batch. Same parameters, buffers and state keys as BatchNorm1d/2d."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        # two passes, as BatchNorm itself: E[x^2] - E[x]^2 would cancel catastrophically where the mean is large
        stats = all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // c)]))
        n = stats[-1]
        mean = stats[:c] / n
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Every BatchNorm layer of ``module`` replaced by a synchronised one with the same parameters, buffers and state
    keys: torch's ``SyncBatchNorm`` on GPUs, the one here on CPUs."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        return out
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child, device_type))
    return module


def wrap(model: nn.Module, w: World, device: torch.device) -> nn.Module:
    """DDP over ``model`` when several processes train, its BatchNorm layers first replaced, in place, by
    synchronised ones (create the optimiser after this); ``model`` itself otherwise."""
    if w.size == 1:
        return model
    sync_batchnorm(model, device.type).to(device)
    ids = [device.index] if device.type == "cuda" else None
    # every parameter gets a gradient in every step (zero-weight exits are multiplied by zero, not left out),
    # so DDP need not search the graph for unused ones
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

