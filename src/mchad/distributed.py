"""Several processes (DDP, ``trainer.devices=N``, ``num_nodes``, torchrun, SLURM): who writes,
how the data are split and how test scores are joined.

* One process writes: the global rank 0. Before the trainer exists the rank comes from the
  launcher's environment, as Lightning reads it (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``);
  afterwards ``trainer.is_global_zero``. A process started alone is rank 0 without importing
  Lightning (:func:`launch_rank`): a run's config mistakes are reported before that import.
* Training: ``datamodule.batch_size`` is the *global* batch. Every global batch of the seeded
  permutation is split into ``world_size`` equal parts, one per rank, so the ranks together
  take the same batches in the same order as one process (see
  :class:`mchad.data.loaders.TensorBatchLoader`).
* Validation and testing: each rank scores a contiguous part of each set;
  :func:`gather_rows` joins the parts in rank order, i.e. the set's order, on every rank.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

#: where Lightning reads a launched process's global rank from when it is imported
#: (``lightning_fabric.utilities.rank_zero._get_rank``; tests/test_ddp.py holds the two together)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when started alone); valid before
    any trainer exists. Lightning reads it from the environment when it is imported; before
    that import, a process without those variables is rank 0 without it (the import is 2.6 s
    of CPU on 2 cores, more than half of what a run that stops at a config mistake spent)."""
    if "pytorch_lightning" not in sys.modules and not any(name in os.environ for name in RANK_VARIABLES):
        return 0
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_launch_rank_zero() -> bool:
    return launch_rank() == 0


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous part of ``n`` items: parts differ in size
    by at most one, the first ``n % world_size`` ranks take one more (as ``torch.tensor_split``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def distributed_world() -> int:
    """The size of torch.distributed's default group, 1 when none is initialised."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes in place (a no-op in one process).

    For statistics inside a method (II's running centres), which has no trainer at hand;
    Lightning initialised the default process group, which this uses."""
    import torch

    if distributed_world() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def gather_rows(strategy, tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (rows may differ in number) concatenated in rank order, on every
    rank. Lightning's ``all_gather`` needs equal shapes: rows are padded to the longest part
    and the padding dropped again."""
    import torch

    world_size = getattr(strategy, "world_size", 1)
    if world_size == 1:
        return tensor
    count = torch.tensor([len(tensor)], dtype=torch.long, device=tensor.device)
    counts = strategy.all_gather(count).view(-1).tolist()
    longest = max(counts)
    padded = tensor
    if len(tensor) < longest:
        pad = torch.zeros((longest - len(tensor), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded = torch.cat([tensor, pad])
    gathered = strategy.all_gather(padded.contiguous())  # (world_size, longest, ...)
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(counts)])
