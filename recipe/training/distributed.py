"""The trainer's process group: start-up, per-rank seed, and the few cross-rank sums and votes it needs.

Communication of the model itself lives in ``recipe/model/moe/dispatch.py`` and in DeepSpeed's engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_process_group(seed: int) -> Ranks:
    """Join the process group the launcher set up (env://), free DeepSpeed's shm names, seed this rank."""
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    ranks = Ranks(rank=dist.get_rank(), world_size=dist.get_world_size())
    release_shm_workspace(ranks.rank)
    torch.manual_seed(seed * 1000 + ranks.rank)  # per-rank stream for routing noise, if enabled
    return ranks


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A reduced copy; ``tensor`` itself is left alone."""
    reduced = tensor.clone()
    dist.all_reduce(reduced)
    return reduced


def ranks_where(flag: bool) -> int:
    """How many ranks passed ``flag=True``: every rank must call it."""
    return int(sum_over_ranks(torch.tensor([float(flag)])).item())


def barrier() -> None:
    dist.barrier()


def release_shm_workspace(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce segment once every rank has mapped it.

    On one node the CPU accelerator's shm comm op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>`` (about 66 MB per rank) and never removes it: every run, finished or killed, would leave that
    much RAM taken until reboot. The mappings stay valid after the name is gone; the memory is freed when the
    last rank exits. The barrier makes sure no rank is still opening a peer's segment by name.
    """
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    dist.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)
