"""What the trainer reports: console lines or a progress bar on rank 0, loss and routing tallies summed over
micro-batches and ranks, the records of ``metrics.jsonl`` and the end-of-run summary."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from deepspeed.utils import logger as ds_logger
from tqdm import tqdm

from ..model.transformer import LMOutput, TransformerLM

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over ranks


def quiet_deepspeed() -> None:
    """Keep the console to our progress lines: DeepSpeed's INFO chatter (MOE_RECIPE_DS_LOG=info brings it back)
    and a deprecation warning DeepSpeed triggers inside torch on every ZeRO step."""
    ds_logger.setLevel(getattr(logging, os.environ.get("MOE_RECIPE_DS_LOG", "warning").upper(), logging.WARNING))
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


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

    def show_step(self, record: dict, total_steps: int) -> None:
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        else:
            self.log(f"step {record['step']}/{total_steps} loss {record['loss']:.4f} lm {record['lm_loss']:.4f} "
                     f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


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

    def log_record(self, step: int, engine, scheduler, reduce: Reduce) -> dict:
        """The ``metrics.jsonl`` record of ``step`` (every rank must call it: it reduces over ranks)."""
        losses = self.losses.means_and_reset(reduce)
        now = time.time()
        grad_norm = engine.get_global_grad_norm()
        record = {
            "step": step, **losses, "lr": scheduler.get_last_lr()[0] if scheduler else engine.get_lr()[0],
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


def summary_table(summary: dict) -> str:
    rows = [
        ("val loss", f"{summary['val_loss']:.4f}"), ("perplexity", f"{summary['val_ppl']:.1f}"),
        ("tokens seen", f"{summary['tokens_seen']:,}"), ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("params (total)", f"{summary['total_params'] / 1e6:.2f}M"),
        ("params (active/token)", f"{summary['active_params'] / 1e6:.2f}M"), ("wall time", f"{summary['wall_s']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["-" * (width + 16)] + [f"{name:<{width}}  {value:>12}" for name, value in rows] + ["-" * (width + 16)])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))
