"""Train an MoE (or dense) language model with the DeepSpeed engine.

Run by the deepspeed launcher (see launch/train.sh)::

    deepspeed --num_gpus 2 -m recipe.train --config recipe/configs/tiny_finegrained.py \
        --ds_config ds_configs/zero2_fp32_ep2.json --set train.steps=100

Everything is validated before the process group starts. Each rank then trains on its shard of every
global batch; rank 0 writes ``<run_dir>/metrics.jsonl`` (one JSON object per logged step or eval)
and ``<run_dir>/summary.json`` at the end. The parts the loop is made of are in ``recipe/training/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

# First, before anything imports deepspeed: importing it logs (the accelerator it detects) on every rank.
from .training.telemetry import (Console, RoutingTally, TrainTally, interrupt_message, is_global_rank_zero,
                                 non_finite_stop_error, perplexity, quiet_deepspeed, skipped_step_warning,
                                 summary_table)

quiet_deepspeed()

from .checkpoint import latest_tag  # noqa: E402
from .config import ConfigError, parameter_counts  # noqa: E402
from .generate import print_samples  # noqa: E402
from .metrics import MetricsWriter  # noqa: E402
from .training.build import Job, build_job  # noqa: E402
from .training.checkpointing import save, start_or_resume  # noqa: E402
from .training.distributed import (Ranks, barrier, handle_interrupts, interrupted, start_process_group,  # noqa: E402
                                   sum_over_ranks)
from .training.evaluate import evaluate  # noqa: E402
from .training.exit_codes import ExitCode  # noqa: E402
from .training.plan import RunPlan, plan_run  # noqa: E402
from .training.step import optimizer_step  # noqa: E402

DEFAULT_CONFIG = "recipe/configs/tiny_finegrained.py"
DEFAULT_DS_CONFIG = "ds_configs/zero2_fp32_ep2.json"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipe.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Python model/train config (recipe/configs/*.py)")
    parser.add_argument("--ds_config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON (ds_configs/*.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set model.num_experts=16 (repeatable)")
    parser.add_argument("--run_dir", help="where checkpoints and metrics go (default: train.run_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    parser.add_argument("--reshard", action="store_true",
                        help="with --resume: move the checkpoint into a different rank count / ep_size / ZeRO stage "
                             "(weights, fp32 master weights, Adam moments, data position and LR schedule carry over)")
    parser.add_argument("--samples", type=int, default=0, help="print this many generated samples at the end")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None, as_program: bool = False) -> int:
    """``as_program``: this process is the trainer (``python -m recipe.train``): Ctrl-C is handled (signal handlers
    and a watcher thread are process-wide, so not for a caller such as a test)."""
    args = parse_args(argv)
    position = LoopPosition()
    if as_program:
        handle_interrupts(lambda: say_interrupted(position))
    try:
        plan = plan_run(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        # Every rank checks the plan before the process group exists; one says why, all exit with the code.
        if is_global_rank_zero():
            print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        return stop_on_interrupt(position)
    position.plan = plan
    return train(plan, samples=args.samples, position=position)


@dataclass
class LoopPosition:
    """Where a rank is, for the line a Ctrl-C ends it with."""
    plan: Optional[RunPlan] = None
    step: int = 0  # the optimizer step under way (0: none started yet)
    saving: bool = False  # inside save(): that checkpoint will not be committed
    console: Optional[Console] = None
    said: bool = False  # the line was printed (by the main thread, or by the watcher of a stuck rank)
    saying: threading.Lock = field(default_factory=threading.Lock)


def train(plan: RunPlan, samples: int = 0, position: Optional[LoopPosition] = None) -> int:
    """Train ``plan`` to its last step; a Ctrl-C (with ``handle_interrupts``) stops every rank at once, unsaved."""
    position = position or LoopPosition(plan=plan)
    try:
        return run_training(plan, samples, position)
    except KeyboardInterrupt:
        return stop_on_interrupt(position)
    except Exception:
        if not interrupted():
            raise
        return stop_on_interrupt(position)  # a collective broke because a peer stopped on the Ctrl-C


def run_training(plan: RunPlan, samples: int, position: LoopPosition) -> int:
    config, steps = plan.config, plan.config.train.steps
    quiet_deepspeed()
    ranks = start_process_group(config.train.seed, plan.ds.tp_size, plan.ds.ep_size)
    console = position.console = Console(ranks.is_main)
    job = build_job(plan, ranks)
    start_lines: list[str] = []  # resume / reshard lines, printed after the recipe line
    start_step = start_or_resume(plan, job, ranks, start_lines.append)
    if start_step is None:
        return ExitCode.BAD_INPUT
    metrics = MetricsWriter(plan.run_dir, ranks.is_main, monitor=job.engine.monitor, wandb_mode=config.train.wandb,
                            wandb_project=config.train.wandb_project, run_config=config.to_dict(),
                            resume_step=start_step if config.train.resume else None)
    tally = TrainTally(plan.ds.global_batch_size(ranks.world_size) * config.data.seq_len, start_step,
                       RoutingTally.for_model(job.model))
    for line in [banner(plan, ranks, tally.tokens_per_step, start_step), *start_lines]:
        console.log(line)
    console.start_progress(total=steps, initial=start_step)
    bad_steps, save_due, val_loss = 0, False, float("nan")
    for step in range(start_step + 1, steps + 1):
        position.step = step
        # ---- the optimizer step: grad_accum_steps micro-batches, each forward / backward / engine.step();
        # a non-finite loss or gradient on any rank skips it on every rank (recipe/training/step.py) ----
        outcome = optimizer_step(job, plan, ranks, step, record=tally.add_micro_batch)
        # ----
        bad_steps = bad_steps + 1 if outcome.skipped else 0
        if outcome.skipped:
            console.log(skipped_step_warning(step, bad_steps, outcome.non_finite_loss, config.train.max_bad_steps))
            if bad_steps >= config.train.max_bad_steps:
                return stop_after_bad_steps(plan, ranks, console, metrics, step, bad_steps)
        console.advance()
        if step % config.train.log_every == 0 or step == steps:
            record = tally.log_record(step, job.engine, outcome.lr, sum_over_ranks)
            metrics.write(record)
            console.show_step(record, steps, start_step)
        if step % config.train.eval_every == 0 or step == steps:
            record = evaluate(plan, job, ranks, step)
            metrics.write(record)
            val_loss = record["val_loss"]
            console.log(f"eval step {step}: val_loss {val_loss:.4f} ppl {record['val_ppl']:.1f}")
        # A save due during a run of skipped steps waits for the next good step (or the end of the run), so
        # a checkpoint never hides a streak that is about to stop training.
        save_due = save_due or step % config.train.save_every == 0
        if (save_due and bad_steps == 0) or step == steps:
            position.saving = True
            save(plan, job, ranks, step)
            position.saving = save_due = False
    console.close()
    summary = run_summary(plan, job, ranks, start_step, val_loss, tally)
    metrics.close()
    return finish(plan, ranks, console, summary, samples)


def banner(plan: RunPlan, ranks: Ranks, tokens_per_step: int, start_step: int) -> str:
    """The one line before the first step: model, layout, data."""
    config, ds, counts = plan.config, plan.ds, parameter_counts(plan.config)
    tp = f", TP {ds.tp_size}" if ds.tp_size > 1 else ""
    return (f"moe-recipe: {config.model_type} {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M "
            f"active) | {ranks.world_size} ranks, ep_size {ds.ep_size}{tp}, ZeRO-{ds.zero_stage} {ds.precision} | data "
            f"{config.data.path}, {tokens_per_step:,} tokens/step, steps {start_step + 1}..{config.train.steps}")


def stop_on_interrupt(position: LoopPosition) -> int:
    """Ctrl-C: no save and no further collective (peers may be gone, or stuck in one). A save under way when the
    signal came is never committed."""
    say_interrupted(position)
    return ExitCode.INTERRUPTED


def say_interrupted(position: LoopPosition) -> None:
    """Rank 0's one line: where it stopped and which complete checkpoint there is to --resume from."""
    with position.saying:
        if position.said:
            return
        position.said = True
        # wandb's thread keeps writing to its service, which the same SIGINT ended: asyncio would log
        # "socket.send() raised exception." under the line below.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        if position.console is not None:
            position.console.close()
        if is_global_rank_zero():
            plan = position.plan
            newest = latest_tag(plan.run_dir) if plan is not None else None
            resumed = plan is not None and plan.config.train.resume
            print(interrupt_message(position.step, newest, resumed, position.saving), file=sys.stderr, flush=True)


def stop_after_bad_steps(plan: RunPlan, ranks: Ranks, console: Console, metrics: MetricsWriter, step: int,
                         bad_steps: int) -> int:
    """``train.max_bad_steps`` skipped steps in a row: stop without saving; the newest checkpoint stays."""
    console.close()
    metrics.close()
    if ranks.is_main:
        print(non_finite_stop_error(step, bad_steps, latest_tag(plan.run_dir)), file=sys.stderr, flush=True)
    return ExitCode.NON_FINITE_STEPS


def run_summary(plan: RunPlan, job: Job, ranks: Ranks, start_step: int, val_loss: float, tally: TrainTally) -> dict:
    steps, ds, counts = plan.config.train.steps, plan.ds, parameter_counts(plan.config)
    wall = time.time() - tally.started
    return {
        "steps": steps, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
        "tokens_seen": tally.tokens_per_step * steps,
        "tokens_per_s": tally.tokens_per_step * (steps - start_step) / max(wall, 1e-9),
        "total_params": counts["total"], "active_params": counts["active"], "wall_s": wall,
        "world_size": ranks.world_size, "ep_size": ds.ep_size, "tp_size": ds.tp_size, "zero_stage": ds.zero_stage,
        "precision": ds.precision,
        "param_dtype": str(next(job.engine.module.parameters()).dtype).replace("torch.", ""),
    }


def finish(plan: RunPlan, ranks: Ranks, console: Console, summary: dict, samples: int) -> int:
    """summary.json and the table on rank 0, then the samples asked for."""
    if ranks.is_main:
        (plan.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        console.log(summary_table(summary))
    barrier()
    if samples > 0 and ranks.is_main:
        print_samples(plan.run_dir, num_samples=samples)
    barrier()
    return ExitCode.OK


def exit_program(code: int) -> None:
    """End the trainer process with ``code``. After a Ctrl-C the atexit hooks are skipped: the terminal's SIGINT
    reached every process of its group, wandb's service among them, and wandb's teardown would print a traceback
    over the connection that is gone (the rank's own state needs no cleanup: nothing is saved on Ctrl-C)."""
    if code == ExitCode.INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_program(main(as_program=True))
