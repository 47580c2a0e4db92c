"""Data-parallel training through PyTorch's own engine: torchrun + DistributedDataParallel.

`torchrun --nproc_per_node=N -m fastlm.train …` sets RANK, WORLD_SIZE and LOCAL_RANK; fastlm then
joins the process group (NCCL on CUDA, gloo on the CPU). The global batch stays `--batch-size`:
rank r owns the contiguous block of rows r·B/N … (r+1)·B/N of the batchified stream and carries
their hidden state through TBPTT exactly as one process would, so the N processes together
compute what one process with batch B computes. Without torchrun every function here is a no-op.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's block of the batch's rows (`check_config` ensures the size divides them)."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def join(cuda: bool) -> World:
    """Join the torchrun process group if there is one; the world of a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(world.local_rank)
        # A rank that dies leaves the others waiting in a collective; the timeout turns that into an error.
        timeout = timedelta(seconds=float(os.environ.get("FASTLM_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return world


def leave(world: World) -> None:
    if world.enabled and dist.is_initialized():
        # DistributedDataParallel sits in reference cycles and its reducer holds the process group:
        # left to the cyclic collector it can be freed during interpreter shutdown, after the group,
        # and gloo then aborts the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_rows(tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Every rank's block of rows put back together (all ranks hold equal blocks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
