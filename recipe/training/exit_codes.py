"""Exit status of ``recipe.train`` (``launch/train.sh`` passes it on)."""
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # A config, DeepSpeed JSON, data folder or checkpoint cannot be used: one ``error:`` line says why and
    # what to do; nothing was written.
    BAD_INPUT = 2
    # ``train.max_bad_steps`` optimizer steps in a row had a non-finite loss or gradients and were skipped;
    # the newest complete checkpoint is untouched.
    NON_FINITE_STEPS = 3
    # Ctrl-C (SIGINT to the launch's process group; 128 + SIGINT, as a shell reports it): every rank stopped
    # without saving; rank 0 named the newest complete checkpoint to --resume from.
    INTERRUPTED = 130
