"""Data-parallel training with PyTorch DistributedDataParallel, launched by ``torchrun``.

    torchrun --nproc_per_node=2 -m training --corpus lyrics.txt --out runs/lyrics
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m training ...              # one line per node

The lab's ``batch_size`` rows are the global batch: each of the N processes (ranks) trains
``batch_size / N`` of them, keeps the hidden state of its own rows, and DDP averages the
gradients, so a step is the step one process would take on the whole batch. Every rank holds
the same weights and computes the same validation perplexity, so they take the same decisions
(LR schedule, early stopping, best checkpoint) without talking; only stops (Ctrl-C, budget) are
agreed on each step. Only rank 0 writes the run folder. ``gloo`` is used on CPUs, ``nccl`` on
GPUs (one per rank: ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from model_store import checkpoint


class DistributedError(RuntimeError):
    """A launch that cannot work (e.g. rows that do not split evenly across ranks)."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's share of the ``batch_size`` parallel rows."""
        if batch_size % self.world_size:
            raise DistributedError(
                f"--batch-size {batch_size} does not split over {self.world_size} processes; "
                "use a multiple of the process count"
            )
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop every rank agrees on)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, tensor: Tensor, dim: int) -> Tensor:
        """Every rank's ``tensor`` joined along ``dim``, in rank order (on this rank's device)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", self.local_rank)
            if dist.get_backend() == "nccl"
            else (torch.device("cpu"))
        )


def setup(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), checkpoint.pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda:"):
        raise DistributedError("under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = checkpoint.pick_device("cpu" if device_name == "auto" else device_name)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10)
    )
    return DistContext(rank, world_size, local_rank), device


def teardown(ctx: DistContext, clean: bool) -> None:
    """Leave the process group. After a clean run every rank waits for the others first:
    destroying the group while a peer still works aborts the process (gloo). The DDP wrapper
    must be gone by then (collected here): one left to the interpreter's exit destroys the
    group's worker threads unjoined, and the process aborts ("terminate called without an
    active exception")."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        if clean:
            dist.barrier()
        dist.destroy_process_group()
