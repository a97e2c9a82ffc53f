"""Data-parallel training on ``torch.distributed`` (processes started by ``torchrun``).

Every rank holds the whole model and reads the same shuffled global batches; each trains on its slice of
every batch (``shard``) and the gradients are summed across ranks, each rank's loss weighted by its share
of the batch, so the update is the one a single process makes on the global batch (up to the order of
floating-point sums). Methods' hooks see the averaged gradient in ``after_backward``; decisions made from
parameters (BSQ / MSQ / CSQ precision, pruning schedules) are therefore the same on every rank, a method
whose state comes from its own slice of the batch averages it with ``average`` (MSQ's Hessian traces,
SharpBalance's SGD-part gradients), and ``check_in_step`` stops the run if the ranks' weights ever differ.

Why not the ``DistributedDataParallel`` wrapper: methods call the model several times per step (attacks,
SAM's two passes, per-sample sharpness), take ``torch.autograd.grad`` of inner losses, and replace layers
mid-training (pruning, BSQ's re-quantization). DDP's reducer assumes one forward and one backward per step
over a fixed parameter set; the all-reduce here makes no such assumption and is what DDP does underneath.

Backend: gloo (bitsmith's training loop runs on CPUs; nccl needs the model on GPUs). Batch norm statistics
are per rank, as under DDP without ``SyncBatchNorm`` (which PyTorch runs on GPUs only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

TIMEOUT = timedelta(minutes=10)  # a rank that dies: the others stop with an error after this at the latest
_step_weight = 1.0  # this rank's share of the batch being trained (set by the training loop)


@dataclass(frozen=True)
class World:
    """This process's rank and the number of processes (1 without ``torch.distributed``)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and reports."""
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join_from_env() -> World:
    """Join the gloo process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1). One
    process: nothing to join."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return world()
    dist.init_process_group("gloo", timeout=TIMEOUT)
    return world()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_size(batch_size: int, size: int) -> None:
    if batch_size % size:
        raise ValueError(
            f"train.batch_size {batch_size} is not a multiple of the {size} processes: every process trains on an "
            f"equal share of each batch; make batch_size a multiple of {size} or change --nproc"
        )


def check_process_count(count: int, cores: int) -> None:
    """``--nproc`` starts its processes on this machine: more than its cores only wait on each other (each
    also loads the model and the data), so it is refused before any starts."""
    if count > cores:
        raise ValueError(f"--nproc {count}: this machine has {cores} CPU core(s); more processes than cores only "
                         f"slow each other down: use --nproc {cores} or fewer")  # fmt: skip


def shard(batch: tuple[Tensor, Tensor], at: World) -> tuple[tuple[Tensor, Tensor], float]:
    """This rank's slice of a global batch and its share of it (a batch smaller than the world: every rank
    trains on all of it, each with an equal share, which averages to the same gradient)."""
    global _step_weight
    x, y = batch
    if at.size == 1:
        _step_weight = 1.0
    elif len(y) < at.size:
        _step_weight = 1.0 / at.size
    else:
        index = torch.tensor_split(torch.arange(len(y)), at.size)[at.rank]
        x, _step_weight = x[index], len(index) / len(y)
        y = y[index]
    return (x, y), _step_weight


def step_weight() -> float:
    """This rank's share of the batch now being trained (1.0 in one process)."""
    return _step_weight


def average(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Batch-weighted average over ranks of per-rank statistics (each rank's value weighted by its share of the
    batch; in one process the tensors themselves)."""
    if world().size == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]) * step_weight()
    dist.all_reduce(flat)
    return [
        part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def batch_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """The range over every rank's slice of the batch of a per-batch (dynamic) min / max."""
    if world().size == 1:
        return lo, hi
    lo, hi = lo.clone(), hi.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


def sum_gradients(model: nn.Module) -> None:
    """Sum every parameter's gradient over ranks (each rank's loss was already weighted by its share), in one
    collective. Ranks whose gradients differ in shape stop with an error instead of hanging."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sizes = torch.tensor([sum(g.numel() for g in grads)], dtype=torch.float64)
    low, high = sizes.clone(), sizes.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(
            f"rank {world().rank}: the ranks' gradients differ in size ({int(low.item())} vs {int(high.item())} "
            "values): a method changed the model on one rank only"
        )
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))


def broadcast_state(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does when it wraps a model)."""
    for tensor in model.state_dict().values():
        if isinstance(tensor, Tensor):
            dist.broadcast(tensor, src=0)


def check_in_step(model: nn.Module) -> None:
    """Stop with an error if the ranks' weights differ (a method decided differently on some rank)."""
    values = [p.detach().double() for p in model.parameters()]
    digest = torch.stack([sum((v * (i + 1)).sum() for i, v in enumerate(values)), torch.tensor(float(len(values)))])
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"rank {world().rank}: the processes' weights differ after this epoch; a method's state depends on "
            "the rank's slice of the data without averaging it (bitsmith.distributed.average)"
        )


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def sum_counts(values: Sequence[float]) -> list[float]:
    """Sum plain numbers (losses, counts) over ranks."""
    if world().size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
