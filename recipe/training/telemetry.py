"""What the trainer reports: console lines or a progress bar on rank 0, loss and routing tallies summed over
micro-batches and ranks, the records of ``metrics.jsonl`` and the end-of-run summary.

Imports no deepspeed: ``recipe/train.py`` imports this module first and quiets DeepSpeed's logger before
deepspeed is imported, since the import itself logs (the accelerator it detects)."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Callable, Optional

import torch
from tqdm import tqdm

from ..ds_log import DEFAULT_LEVEL, drop_deepspeed_records_below, requested_level

if TYPE_CHECKING:
    from ..model.transformer import LMOutput, TransformerLM

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over ranks


def deepspeed_log_level(environ=os.environ) -> int:
    """The level ``MOE_RECIPE_DS_LOG`` names (debug, info, warning, error); errors only when unset or unknown
    (launch/train.sh refuses an unknown name before any rank starts)."""
    try:
        return requested_level(environ)
    except ValueError:
        return DEFAULT_LEVEL


def quiet_deepspeed() -> None:
    """Keep the console to the recipe's lines: DeepSpeed's log records below ``MOE_RECIPE_DS_LOG`` are dropped
    (by default its warnings too: "Setting accelerator to CPU", "Attempting to get learning rate from scheduler
    before it has started", which every rank would print) and so are the deprecation warnings DeepSpeed triggers
    inside torch on every ZeRO step. Called before deepspeed is imported (a logger filter outlives the level reset
    of the import) and again after, when the logger's handler exists: ``info`` / ``debug`` lower it."""
    level, ds_logger = deepspeed_log_level(), logging.getLogger("DeepSpeed")
    drop_deepspeed_records_below(level)
    if level < logging.WARNING:  # DeepSpeed's handler stops below WARNING by itself
        for target in (ds_logger, *ds_logger.handlers):
            target.setLevel(level)
    for collective in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # ZeRO-1/2, ZeRO-3
        warnings.filterwarnings("ignore", message=f".*{collective}.*", category=FutureWarning)


def is_global_rank_zero(environ=os.environ) -> bool:
    """Rank 0 of the launch, also before the process group exists (the launcher sets RANK; unset: one process)."""
    return environ.get("RANK", "0").strip() in ("", "0")


class Console:
    """Rank 0's output: a tqdm bar when stderr is a terminal, plain log lines otherwise; other ranks are silent."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.progress: Optional[tqdm] = None

    def start_progress(self, total: int, initial: int) -> None:
        if self.is_main and sys.stderr.isatty():
            self.progress = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def show_step(self, record: dict, total_steps: int, start_step: int) -> None:
        """The bar's figures (tqdm shows step/total and its own ETA), or a plain line with the same and an ETA."""
        if self.progress is not None:
            self.progress.set_postfix_str(progress_figures(record, with_lm_and_lr=False), refresh=True)
        else:
            self.log(progress_line(record, total_steps, start_step))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


def moe_health(record: dict) -> Optional[tuple[float, float]]:
    """(the worst layer's drop fraction, the largest max/mean expert load of any layer); None for a dense model."""
    layers = record.get("moe") or []
    if not layers:
        return None
    return max(layer["drop_fraction"] for layer in layers), max(layer["max_over_mean_load"] for layer in layers)


def eta_seconds(step: int, total_steps: int, start_step: int, elapsed_s: float) -> Optional[float]:
    """Remaining steps x the seconds per step observed since this launch started; None before a step is done."""
    done = step - start_step
    return None if done <= 0 else (total_steps - step) * elapsed_s / done


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = int(round(seconds))
    hours, minutes, secs = whole // 3600, whole // 60 % 60, whole % 60
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_figures(record: dict, with_lm_and_lr: bool = True) -> str:
    """Loss, throughput and, for an MoE, the routing health of one log record: ``loss 5.1234 | 2,190 tok/s | drop
    3.1% load 1.84x`` (``lm`` and ``lr`` after the loss in the plain line)."""
    loss = f"loss {record['loss']:.4f}"
    if with_lm_and_lr:
        loss += f" (lm {record['lm_loss']:.4f}) | lr {record['lr']:.2e}"
    parts = [loss, f"{record['tokens_per_s']:,.0f} tok/s"]
    health = moe_health(record)
    if health is not None:
        parts.append(f"drop {health[0]:.1%} load {health[1]:.2f}x")
    return " | ".join(parts)


def progress_line(record: dict, total_steps: int, start_step: int) -> str:
    """The plain progress line of one log record (no terminal): step/total, the figures, and the ETA."""
    eta = eta_seconds(record["step"], total_steps, start_step, record["elapsed_s"])
    return f"step {record['step']}/{total_steps} | {progress_figures(record)} | eta {format_duration(eta)}"


class LossTally:
    """The loss terms summed over the finite micro-batches since the last log line."""

    NAMES = ("loss", "lm_loss", "moe_loss", "z_loss")

    def __init__(self):
        self.sums = torch.zeros(len(self.NAMES) + 1, dtype=torch.float64)  # the terms, then the micro-batch count

    def add(self, loss: torch.Tensor, out: LMOutput) -> None:
        self.sums += torch.tensor([loss.item(), out.lm_loss.item(), out.moe_loss.item(), out.z_loss.item(), 1.0],
                                  dtype=torch.float64)

    def means_and_reset(self, reduce: Reduce) -> dict[str, float]:
        sums = reduce(self.sums)
        count = sums[-1].item() or float("nan")  # NaN means when every micro-batch since the last log was skipped
        self.sums.zero_()
        return {name: sums[i].item() / count for i, name in enumerate(self.NAMES)}


class RoutingTally:
    """Sums routing statistics of every MoE layer over micro-steps; reduced over ranks when logged."""

    def __init__(self, num_layers: int, num_experts: int):
        self.kept = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.first_choice = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.figures = torch.zeros(num_layers, 4, dtype=torch.float64)  # tokens, pairs, entropy·tokens, l_aux
        self.calls = 0

    @classmethod
    def for_model(cls, model: TransformerLM) -> Optional["RoutingTally"]:
        """A tally for every MoE layer of ``model``; None for models that report no routing."""
        if not model.reports_routing:
            return None
        return cls(len(model.moe_layers()), model.config.model.num_experts)

    def add(self, routing, l_aux_per_layer) -> None:
        for layer, (stats, l_aux) in enumerate(zip(routing, l_aux_per_layer)):
            self.kept[layer] += stats.tokens_per_expert.double().cpu()
            self.first_choice[layer] += stats.first_choice_count.double().cpu()
            self.figures[layer] += torch.tensor([stats.num_tokens, stats.num_tokens * stats.k,
                                                 float(stats.router_entropy) * stats.num_tokens, float(l_aux)],
                                                dtype=torch.float64)
        self.calls += 1

    def reduce_and_reset(self, all_reduce: Reduce) -> list[dict]:
        packed = all_reduce(torch.cat([self.kept, self.first_choice, self.figures], dim=1))
        num_experts = self.kept.shape[1]
        kept, figures = packed[:, :num_experts], packed[:, 2 * num_experts:]
        world_calls = max(all_reduce(torch.tensor([float(self.calls)], dtype=torch.float64)).item(), 1.0)
        layers = [_layer_record(layer, kept[layer], *figures[layer].tolist(), world_calls)
                  for layer in range(kept.shape[0])]
        self.kept.zero_(), self.first_choice.zero_(), self.figures.zero_()
        self.calls = 0
        return layers


def _layer_record(layer: int, load: torch.Tensor, tokens: float, pairs: float, entropy_sum: float,
                  l_aux_sum: float, calls: float) -> dict:
    return {
        "layer": layer,
        "tokens_per_expert": [int(v) for v in load.tolist()],
        "drop_fraction": 0.0 if pairs == 0 else 1.0 - load.sum().item() / pairs,
        "l_aux": l_aux_sum / calls,
        "router_entropy": entropy_sum / max(tokens, 1.0),
        "max_over_mean_load": load.max().item() / max(load.mean().item(), 1e-9),
    }


class TrainTally:
    """What the log records of the loop are made of: losses and routing since the last log line, throughput."""

    def __init__(self, tokens_per_step: int, start_step: int, routing: Optional[RoutingTally]):
        self.losses, self.routing = LossTally(), routing
        self.tokens_per_step = tokens_per_step
        self.started = self.last_log_time = time.time()
        self.last_log_step = start_step

    def add_micro_batch(self, loss: torch.Tensor, out: LMOutput) -> None:
        self.losses.add(loss, out)
        if self.routing is not None:
            self.routing.add(out.routing, out.moe_layer_losses)

    def log_record(self, step: int, engine, lr: float, reduce: Reduce) -> dict:
        """The ``metrics.jsonl`` record of ``step``, ``lr`` the rate that step ran at (every rank must call it: it
        reduces over ranks)."""
        losses = self.losses.means_and_reset(reduce)
        now = time.time()
        grad_norm = engine.get_global_grad_norm()
        record = {
            "step": step, **losses, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.tokens_per_step * (step - self.last_log_step) / max(now - self.last_log_time, 1e-9),
            "elapsed_s": now - self.started, "skipped_steps": engine.skipped_steps,
        }
        if self.routing is not None:
            record["moe"] = self.routing.reduce_and_reset(reduce)
        self.last_log_time, self.last_log_step = now, step
        return record


def skipped_step_warning(step: int, bad_steps: int, non_finite_loss: bool, max_bad_steps: int) -> str:
    return (f"warning: step {step} skipped (non-finite {'loss' if non_finite_loss else 'gradients'}), {bad_steps} in "
            f"a row; stopping after {max_bad_steps}")


def non_finite_stop_error(step: int, bad_steps: int, newest_checkpoint: Optional[str]) -> str:
    kept = (f"the newest complete checkpoint, {newest_checkpoint}, is untouched: fix the cause (lower the learning "
            f"rate, check the data) and restart with --resume" if newest_checkpoint else
            "no checkpoint was saved yet: fix the cause (lower the learning rate, check the data) and start again")
    return (f"error: {bad_steps} consecutive steps with non-finite loss or gradients (steps {step - bad_steps + 1}.."
            f"{step}, all skipped); stopped without saving; {kept}")


def interrupt_message(step: int, newest_checkpoint: Optional[str], resumed: bool, saving: bool) -> str:
    """Rank 0's line after a Ctrl-C: where it stopped, and the complete checkpoint to continue from, if any."""
    where = f"while saving step {step}" if saving else f"during step {step}" if step else "before the first step"
    cut = "; that save is incomplete and never counts as a checkpoint" if saving else ""
    if newest_checkpoint:
        how = ("run the same command again (it has --resume)" if resumed else
               "run the same command with -- --resume added (launch/train.sh; --resume for python -m recipe.train)")
        kept = f"newest complete checkpoint: {newest_checkpoint}; to continue from it, {how}"
    else:
        kept = "no checkpoint was saved yet: run the same command again to start over"
    return f"interrupted (Ctrl-C) {where}: stopped without saving{cut}; {kept}"


def summary_table(summary: dict) -> str:
    rows = [
        ("val loss", f"{summary['val_loss']:.4f}"), ("perplexity", f"{summary['val_ppl']:.1f}"),
        ("tokens seen", f"{summary['tokens_seen']:,}"), ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("params (total)", f"{summary['total_params'] / 1e6:.2f}M"),
        ("params (active/token)", f"{summary['active_params'] / 1e6:.2f}M"),
        ("wall time", f"{summary['wall_s']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 16)
    return "\n".join([rule] + [f"{name:<{width}}  {value:>12}" for name, value in rows] + [rule])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))
