"""Data-parallel training through PyTorch's own engine: torchrun + DistributedDataParallel.

`torchrun --nproc_per_node=N -m fastlm.train …` sets RANK, WORLD_SIZE and LOCAL_RANK; fastlm then
joins the process group (NCCL on CUDA, gloo on the CPU). The global batch stays `--batch-size`:
rank r owns the contiguous block of rows r·B/N … (r+1)·B/N of the batchified stream and carries
their hidden state through TBPTT exactly as one process would, so the N processes together
compute what one process with batch B computes. Without torchrun every function here is a no-op.

Files belong to rank 0 (the run folder may lie on its disk alone): it alone reads checkpoints and
hands them to the others (`from_rank0`), and it alone writes. Under `torchrun --max-restarts N` a
failed rank makes torchrun stop the job and start every rank again, in the same launch
(`launch_id`): such an attempt goes on from the run's last checkpoint (fastlm/training/rundir.py).
"""
from __future__ import annotations

import gc
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from fastlm.errors import UsageError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launch: str | None = None  # under torchrun: this launch's id, the same in every attempt (`launch_id`)

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
    # A rank that dies leaves the others waiting in a collective; the timeout turns that into an error.
    timeout = timedelta(seconds=float(os.environ.get("FASTLM_DIST_TIMEOUT", "600")))
    agent_store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):  # torchrun's, kept for all attempts
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                                    is_master=False, timeout=timeout)
    launch = launch_id(agent_store) if agent_store is not None else None
    if size <= 1:
        return World(launch=launch)
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), launch)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(world.local_rank)
        backend = "nccl" if cuda else "gloo"
        if agent_store is not None:
            store = dist.PrefixStore(fresh_namespace(agent_store, world.rank, size, timeout), agent_store)
            dist.init_process_group(backend, store=store, rank=world.rank, world_size=size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return world


def launch_id(store: dist.Store) -> str:
    """An id of this torchrun launch, the same in all its attempts: torchrun's agents keep their store
    from the launch to its end, so the first rank of the first attempt to ask draws it."""
    return store.compare_set("fastlm/launch", "", uuid.uuid4().hex).decode()


def fresh_namespace(store: dist.Store, rank: int, size: int, timeout: timedelta) -> str:
    """A store prefix that this attempt of the job alone uses, the same on every rank.

    torchrun's agents keep one store for all attempts of a job, and with it the keys an earlier
    attempt's process group left: a restarted group reading them dials ranks that are gone
    (pytorch/pytorch#135712), and the restart counts torchrun hands out differ between machines.
    So rank 0 draws a fresh namespace and publishes it; every other rank says hello under the
    namespace it read, with a token of its own, and waits for rank 0's welcome of that token. A
    rank that read the last attempt's namespace is never welcomed there, and reads again.
    """
    if rank == 0:
        namespace = f"fastlm/{uuid.uuid4().hex}"
        store.set("fastlm/namespace", namespace)
        for other in range(1, size):
            store.wait([f"{namespace}/hello/{other}"], timeout)
            store.set(f"{namespace}/welcome/{store.get(f'{namespace}/hello/{other}').decode()}", b"")
        return namespace
    token, deadline = uuid.uuid4().hex, time.monotonic() + timeout.total_seconds()
    while True:
        store.wait(["fastlm/namespace"], timeout)
        namespace = store.get("fastlm/namespace").decode()
        store.set(f"{namespace}/hello/{rank}", token)
        try:
            store.wait([f"{namespace}/welcome/{token}"], timedelta(seconds=1))
            return namespace
        except dist.DistStoreError:
            if time.monotonic() > deadline:
                raise


def leave(world: World) -> None:
    if world.enabled and dist.is_initialized():
        # DistributedDataParallel sits in reference cycles and its reducer holds the process group:
        # left to the cyclic collector it can be freed during interpreter shutdown, after the group,
        # and gloo then aborts the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` run by rank 0 alone and its value handed to every rank, or the error it raised
    raised on every rank: all ranks go on from the same value (a checkpoint read from rank 0's disk)
    or stop with the same message."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (compute(), None)
        except BaseException as err:  # a Ctrl-C too: the other ranks must not wait for a value
            shared = err if isinstance(err, UsageError) else RuntimeError(f"rank 0 failed: {first_line(err)}")
            dist.broadcast_object_list([(None, shared)], src=0, device=collective_device())
            raise
    dist.broadcast_object_list(box, src=0, device=collective_device())
    value, err = box[0]
    if err is not None:
        raise err
    return value


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


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
