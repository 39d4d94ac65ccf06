"""The deepspeed launcher as ``launch/train.sh`` runs it: quiet unless asked, and one line of advice if it fails.

    python -m recipe.launcher runner [deepspeed.launcher.runner args] --module recipe.train [recipe.train args]
    python -m recipe.launcher launch [deepspeed.launcher.launch args] --module recipe.train [recipe.train args]

runs DeepSpeed's runner (one node, or a hostfile over ssh) or its per-node ``launch`` (multi-node without ssh) in
this process, exactly as ``python -m deepspeed.launcher.runner|launch`` would, with two differences:

* Their log lines (the command line, world info, ``Setting CUDA_VISIBLE_DEVICES``, one line per spawned rank,
  "Setting accelerator to CPU") are dropped below ``MOE_RECIPE_DS_LOG`` (default ``error``; ``info`` brings them
  back). The runner passes the level on to the ``launch.py`` it starts; on a CPU box ``DS_ACCELERATOR=cpu`` (what
  auto-detection picked) is set for it and the ranks, so they skip the detection that logs its warning.
* After a failed launch, one line says what the run folder shows: it failed before training started (nothing
  to resume), or it died while training, with the newest complete checkpoint to ``--resume`` from, or with
  nothing saved yet. Exit code 130 (Ctrl-C: the ranks name the checkpoint themselves) and 3 (the trainer
  stopped on non-finite steps and said why) get no line. The exit code is passed on unchanged; a Ctrl-C ends
  this process by SIGINT once launch.py has ended, as the runner would, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from recipe.ds_log import DS_LEVELS, drop_deepspeed_records_below, requested_level

ENTRIES = ("runner", "launch")  # deepspeed.launcher.<entry>
PREFIX = "launch/train.sh:"
EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_CTRL_C = 2, 3, 130  # recipe/training/exit_codes.py; 128 + SIGINT


def launcher_level(environ: dict) -> str:
    """DeepSpeed's name for the level ``MOE_RECIPE_DS_LOG`` asks for (default ``error``); ValueError if unknown."""
    return DS_LEVELS[requested_level(environ)]


def skip_accelerator_detection(environ: dict) -> None:
    """``DS_ACCELERATOR=cpu`` for launch.py and the ranks when auto-detection picked the CPU here: they would pick
    it too (same node, same devices: only when CUDA_VISIBLE_DEVICES is unset) and log a warning doing so."""
    if "DS_ACCELERATOR" in environ or "CUDA_VISIBLE_DEVICES" in environ:
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        environ["DS_ACCELERATOR"] = "cpu"


@dataclass(frozen=True)
class RunState:
    """What a run folder shows of training: metrics.jsonl's (size, mtime, inode), the newest complete tag, and
    without one the checkpoint folders of saves that never completed (a fresh start refuses those)."""
    metrics: Optional[tuple[int, int, int]]
    newest_tag: Optional[str]
    interrupted_saves: tuple[str, ...] = ()


def run_state(run_dir: Path) -> RunState:
    from recipe.checkpoint import checkpoint_root, latest_tag

    try:
        stat = (run_dir / "metrics.jsonl").stat()
        metrics = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError:
        metrics = None
    newest = latest_tag(run_dir)
    partial = () if newest else tuple(sorted(p.name for p in checkpoint_root(run_dir).glob("step*") if p.is_dir()))
    return RunState(metrics=metrics, newest_tag=newest, interrupted_saves=partial)


@dataclass(frozen=True)
class TrainerArgs:
    run_dir: Optional[Path]  # None: the config cannot be read (the trainer says why)
    resume: bool


def trainer_args(argv: list[str]) -> TrainerArgs:
    """The run folder and --resume of recipe.train's arguments, resolved as the trainer resolves them."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default="recipe/configs/tiny_finegrained.py")
    parser.add_argument("--run_dir")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args, _ = parser.parse_known_args(argv)
    overrides = args.set + ([f"train.run_dir={args.run_dir!r}"] if args.run_dir else []) + \
        (["train.resume=True"] if args.resume else [])
    try:
        from recipe.config import load_config

        train = load_config(args.config, overrides).train
    except Exception:  # advice only: a config the trainer refuses gets its own error line from it
        return TrainerArgs(run_dir=Path(args.run_dir) if args.run_dir else None, resume=args.resume)
    return TrainerArgs(run_dir=Path(train.run_dir), resume=bool(train.resume))


def failure_advice(exit_code: int, before: Optional[RunState], after: Optional[RunState], resumed: bool,
                   run_dir: Optional[Path]) -> Optional[str]:
    """The line printed after a launch that ended with ``exit_code`` (None: nothing to add). ``before``/``after``:
    the run folder around the launch (None: unknown). Training started in this launch iff rank 0 (re)wrote
    metrics.jsonl, which it does once the engine is built and the checkpoint loaded, or committed a checkpoint."""
    if exit_code in (0, EXIT_NON_FINITE, EXIT_CTRL_C):
        return None
    if exit_code == EXIT_BAD_INPUT:
        return f"{PREFIX} nothing was trained (exit 2): see the error above"
    if before is None or after is None:
        return f"{PREFIX} training failed (exit {exit_code}): see the error above"
    if after == before:
        return f"{PREFIX} failed before training started (exit {exit_code}): see the error above"
    if after.newest_tag is None and after.interrupted_saves:
        from recipe.checkpoint import checkpoint_root

        return (f"{PREFIX} training failed (exit {exit_code}) during its first checkpoint save: nothing complete "
                f"was saved; delete {checkpoint_root(run_dir)} (interrupted: {', '.join(after.interrupted_saves)}) "
                "and run the same command again to start over")
    if after.newest_tag is None:
        return (f"{PREFIX} training failed (exit {exit_code}) before its first checkpoint: nothing was saved in "
                f"{run_dir}; run the same command again to start over")
    how = "run the same command again (it has --resume)" if resumed else "run the same command with -- --resume"
    return (f"{PREFIX} training failed (exit {exit_code}); newest complete checkpoint: {after.newest_tag}; "
            f"{how} to continue from it")


def _exit_code(status: object) -> int:
    """The process exit status ``sys.exit(status)`` gives (DeepSpeed exits with a rank's code, e.g. -9)."""
    if status is None:
        return 0
    return status & 0xFF if isinstance(status, int) else 1


def run_entry(entry: str, ds_argv: list[str]) -> int:
    """Run deepspeed.launcher.<entry>'s main with ``ds_argv``; its exit code."""
    if entry == "runner":
        from deepspeed.launcher import runner as module

        call = lambda: module.main(ds_argv)  # noqa: E731
    else:
        from deepspeed.launcher import launch as module

        sys.argv = [module.__file__, *ds_argv]  # launch.main parses sys.argv
        call = module.main
    try:
        call()
    except SystemExit as stop:
        return _exit_code(stop.code)
    except KeyboardInterrupt:
        end_by_ctrl_c()
    return 0


def end_by_ctrl_c() -> None:
    """Ctrl-C reached every process of the launch: wait until launch.py has ended its ranks (their last lines,
    the resume hint among them, then come before the prompt; a second Ctrl-C stops waiting), then end as an
    uncaught KeyboardInterrupt would (killed by SIGINT: exit 130 to a shell) without its traceback."""
    import psutil  # a DeepSpeed requirement

    try:
        psutil.wait_procs(psutil.Process().children())
    except KeyboardInterrupt:
        pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ENTRIES:
        print(f"usage: python -m recipe.launcher {{{','.join(ENTRIES)}}} [deepspeed args] --module recipe.train "
              "[args]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        level = launcher_level(os.environ)
    except ValueError as exc:
        print(f"{PREFIX} {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    quiet = getattr(logging, level.upper()) > logging.WARNING
    if quiet:
        drop_deepspeed_records_below(getattr(logging, level.upper()))
        skip_accelerator_detection(os.environ)
    entry, ds_argv = argv[0], [f"--log_level={level}", *argv[1:]]
    train_argv = ds_argv[ds_argv.index("--module") + 2:] if "--module" in ds_argv else []
    trainer = trainer_args(train_argv)
    before = run_state(trainer.run_dir) if trainer.run_dir is not None else None
    exit_code = run_entry(entry, ds_argv)
    after = run_state(trainer.run_dir) if trainer.run_dir is not None else None
    advice = failure_advice(exit_code, before, after, trainer.resume, trainer.run_dir)
    if advice:
        print(advice, file=sys.stderr, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
