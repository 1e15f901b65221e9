"""Process-group set-up for both trainers: torchrun's environment, or a single process.

`torchrun --standalone --nproc_per_node=8 -m speedrun.gpt ...` (or a multi-node
rendezvous) sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without them
the trainer runs as one process and no process group is created.  NCCL on GPUs, gloo on
the CPU.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str = "auto") -> Dist:
    """Join torchrun's process group if launched by it; pick this process's device.

    device_kind: "auto" (CUDA if available), "cuda" or "cpu"."""
    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is visible")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=datetime.timedelta(minutes=10))
    return Dist(rank, world_size, local_rank, device)


def teardown(*, clean: bool) -> None:
    """Leave the process group.  After a clean run the ranks first meet at a barrier (a rank
    tearing down while its peer still talks to it can abort in gloo's transport threads);
    after an error they do not, so a crash on one rank cannot hang the others here."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (gloo has no ReduceOp.AVG, so sum then divide); identity alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
