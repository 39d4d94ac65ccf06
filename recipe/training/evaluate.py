"""Validation: next-token loss over ``train.eval_batches`` micro-batches per rank, and on MoE models the expert
load of those tokens as a heatmap in the run folder."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.loader import eval_batches
from ..metrics import expert_load_heatmap
from .distributed import Ranks, sum_over_ranks
from .plan import RunPlan
from .telemetry import RoutingTally, perplexity

if TYPE_CHECKING:
    from .build import Job


def evaluate(plan: RunPlan, job: Job, ranks: Ranks, step: int) -> dict:
    """The eval record of ``step`` for metrics.jsonl (``val_loss``, ``val_ppl``, the heatmap's file name)."""
    config, engine = plan.config, job.engine
    tally = RoutingTally.for_model(job.model)
    totals = torch.zeros(2, dtype=torch.float64)  # summed token losses, tokens
    engine.eval()
    with torch.no_grad():
        for x, y in eval_batches(job.val_data, config.data.seq_len, plan.ds.micro_batch_size, ranks.dp_rank,
                                 ranks.dp_size, max_batches=config.train.eval_batches):
            out = engine(x.to(job.device), y.to(job.device))
            totals += torch.tensor([out.lm_loss.item() * y.numel(), y.numel()], dtype=torch.float64)
            if tally is not None:
                tally.add(out.routing, out.moe_layer_losses)
    engine.train()
    total_loss, total_tokens = sum_over_ranks(totals).tolist()
    val_loss = total_loss / max(total_tokens, 1)
    record = {"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)}
    if tally is not None:
        layers = tally.reduce_and_reset(sum_over_ranks)
        if ranks.is_main:
            heatmap = plan.run_dir / f"expert_load_step{step:08d}.png"
            expert_load_heatmap([layer["tokens_per_expert"] for layer in layers], heatmap,
                                f"expert load on validation, step {step}")
            record["heatmap"] = heatmap.name
    return record
