"""The trainer's process group: start-up, per-rank seed, the few cross-rank sums and votes it needs, and how a
rank stops on Ctrl-C.

Communication of the model itself lives in ``recipe/model/moe/dispatch.py`` and in DeepSpeed's engine.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ..model.moe.dispatch import create_parallel_groups
from .exit_codes import ExitCode
from .telemetry import deepspeed_log_level


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    tp_size: int = 1  # tensor-parallel peers (same dp_rank) train on the same batches

    # DeepSpeed's TP mesh is (data parallel, tensor parallel), row-major: a TP group is tp_size consecutive ranks.
    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_process_group(seed: int, tp_size: int = 1, ep_size: int = 1) -> Ranks:
    """Join the process group the launcher set up (env://), free DeepSpeed's shm names, make the tensor-, data-
    and expert-parallel groups (in that order: ``create_parallel_groups``), seed this rank."""
    with _unless_told(r"DeepSpeed .* built successfully"):  # a print of every rank, whatever the log level
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    release_shm_workspace(dist.get_rank())
    create_parallel_groups(tp_size, ep_size)
    ranks = Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), tp_size=tp_size)
    torch.manual_seed(seed * 1000 + ranks.dp_rank)  # per-batch stream for routing noise (same on TP peers)
    return ranks


@contextlib.contextmanager
def _unless_told(pattern: str) -> Iterator[None]:
    """Drop the lines matching ``pattern`` that Python code prints to stdout inside (MOE_RECIPE_DS_LOG=info or
    debug keeps them); every other line is printed after the block, also when it raises."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        keep_all = deepspeed_log_level() <= logging.INFO
        lines = [line for line in captured.getvalue().splitlines(keepends=True)
                 if keep_all or not re.fullmatch(pattern, line.rstrip("\n"))]
        sys.stdout.write("".join(lines))
        sys.stdout.flush()


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


# ---- Ctrl-C. The terminal sends SIGINT to the whole foreground process group: the launcher and every rank get it
# at once. Each rank turns it into KeyboardInterrupt (``recipe/train.py`` stops there without another collective).
# The deepspeed launcher, on its own SIGINT, sends its ranks SIGTERM, which would kill them before they could say
# so: after a SIGINT it is ignored. A rank whose main thread is stuck (a collective whose peer has already left,
# e.g. NCCL waiting in a stream sync) runs no Python signal handler: a watcher thread, woken through
# ``signal.set_wakeup_fd`` whatever the main thread does, says the last words and ends it after STUCK_S.
STUCK_S = 10.0  # longer than a clean stop takes; a rank still running then is stuck, and its exit loses nothing
_interrupted = threading.Event()


def handle_interrupts(last_words: Callable[[], None]) -> None:
    """Install the Ctrl-C handling; ``last_words()`` prints rank 0's line (it must print once, from any thread)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # started with SIGINT ignored (or handled by an embedding program): leave both signals alone
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _ignore)  # the watcher decides
    threading.Thread(target=_watch_signals, args=(read_fd, last_words), name="ctrl-c watcher", daemon=True).start()


def interrupted() -> bool:
    """SIGINT has arrived: whatever fails from now on (a collective whose peer stopped) is part of stopping."""
    return _interrupted.is_set()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    signal.signal(signal.SIGINT, _ignore)  # a second Ctrl-C must not break the stop that is under way
    raise KeyboardInterrupt


def _ignore(signum, frame) -> None:
    return None


def _watch_signals(read_fd: int, last_words: Callable[[], None]) -> None:
    """Signals in the order they came (the launcher's SIGTERM follows the terminal's SIGINT)."""
    sigint_seen = False
    while True:
        for signum in os.read(read_fd, 64):
            if signum == signal.SIGINT and not sigint_seen:
                sigint_seen = True
                _interrupted.set()
                threading.Thread(target=_end_if_stuck, args=(last_words,), daemon=True).start()
            elif signum == signal.SIGTERM and not sigint_seen:
                os._exit(128 + signal.SIGTERM)  # a SIGTERM of its own ends the rank at once, as without handler


def _end_if_stuck(last_words: Callable[[], None]) -> None:
    time.sleep(STUCK_S)
    last_words()
    os._exit(ExitCode.INTERRUPTED)
