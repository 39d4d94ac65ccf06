"""One optimizer step: ``grad_accum_steps`` micro-batches, each forward / backward / ``engine.step()``, with the
non-finite guard that skips the whole step on every rank when any rank sees an inf/NaN loss or gradient.

Non-finite guard, part 1: DeepSpeed's ZeRO-1/2 optimizer and its bf16/fp16 wrappers look at the gradients
before every update and, if any is inf/NaN (on any rank), apply nothing and set their ``overflow`` flag; the
engine then skips the LR scheduler step too and counts the step in ``skipped_steps``. A plain torch optimizer
(ZeRO-0 fp32) has no such check: the recipe checks the gradients itself and, for a bad step, has the engine
run a no-op optimizer step and read the same ``overflow`` attribute (``optimizer_step_skipped``).

Part 2: a micro-batch whose loss is inf/NaN on any rank is back-propagated as NaN on every rank, so the step's
gradients are non-finite everywhere and the optimizer's check (DeepSpeed's, or ours) skips the whole step: no
weight, Adam moment or LR change. Every rank still runs every backward and ``engine.step()``, so collectives
and DeepSpeed's micro-step counter stay in line.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..config import LossConfig
from ..model.transformer import LMOutput
from .distributed import Ranks, ranks_where, sum_over_ranks
from .plan import RunPlan

if TYPE_CHECKING:
    from .build import Job


@dataclass
class StepOutcome:
    skipped: bool  # nothing was applied: weights, Adam moments and LR are as before
    non_finite_loss: bool  # why: a loss (True) or only the gradients (False) were non-finite
    lr: float  # the rate the optimizer's groups held when the step's update was applied (or skipped)


def add_own_grad_check(optimizer) -> bool:
    """True for an optimizer without DeepSpeed's overflow check (a plain torch one), which is given the
    ``overflow`` flag here: the recipe then checks its gradients itself (``grads_finite``)."""
    if hasattr(optimizer, "overflow"):
        return False
    optimizer.overflow = False
    return True


def total_loss(out: LMOutput, weights: LossConfig) -> torch.Tensor:
    """``lm_loss + moe_loss_coeff · Σ l_aux + router_z_loss_coeff · Σ z_loss``."""
    return out.lm_loss + weights.moe_loss_coeff * out.moe_loss + weights.router_z_loss_coeff * out.z_loss


def optimizer_step(job: Job, plan: RunPlan, ranks: Ranks, step: int,
                   record: Callable[[torch.Tensor, LMOutput], None]) -> StepOutcome:
    """Run optimizer step ``step``; ``record(loss, out)`` sees each micro-batch whose loss was finite on all ranks."""
    engine, grad_accum_steps, non_finite_loss = job.engine, plan.ds.grad_accum_steps, False
    for micro in range(grad_accum_steps):
        x, y = job.loader.next_batch()
        out = engine(x.to(job.device), y.to(job.device))
        loss = total_loss(out, plan.config.loss)
        finite = ranks_where(torch.isfinite(loss).item()) == ranks.world_size
        if not finite:
            non_finite_loss = True
            loss = loss * float("nan")
        engine.backward(loss)
        boundary = micro == grad_accum_steps - 1
        if boundary:  # the boundary engine.step() updates at this rate, then its LR scheduler sets the next one
            lr = float(engine.get_lr()[0])
        if job.own_grad_check and boundary and not grads_finite(engine, ranks):
            with optimizer_step_skipped(engine.optimizer):
                engine.step()
        else:
            engine.step()
        if finite:
            record(loss, out)
            if job.bias_balancer is not None:
                job.bias_balancer.add(out.routing)
    applied = ranks_where(engine.was_step_applied())
    if 0 < applied < ranks.world_size:
        raise RuntimeError(f"step {step} was applied on {applied} of {ranks.world_size} ranks; the weights diverged")
    if job.bias_balancer is not None:
        job.bias_balancer.step_done(applied == ranks.world_size and not non_finite_loss, sum_over_ranks)
    # fp16: the loss scaler skips its own overflow steps (and lowers the scale); only a non-finite loss counts.
    skipped = non_finite_loss or (applied == 0 and plan.ds.precision != "fp16")
    return StepOutcome(skipped=skipped, non_finite_loss=non_finite_loss, lr=lr)


def grads_finite(engine, ranks: Ranks) -> bool:
    """Every gradient of every rank finite (ZeRO-0 fp32 only: after the boundary's all-reduce)."""
    flags = [torch.isfinite(p.grad).all() for p in engine.module.parameters() if p.grad is not None]
    local = torch.stack(flags).all() if flags else torch.tensor(True)
    return ranks_where(bool(local)) == ranks.world_size


def _no_update(*args, **kwargs) -> None:
    return None


@contextmanager
def optimizer_step_skipped(optimizer) -> Iterator[None]:
    """Inside, ``engine.step()`` runs a no-op in place of the optimizer's step and reads ``overflow``: it clears
    the gradients, leaves the LR scheduler alone and counts a skipped step, as for DeepSpeed's own optimizers."""
    optimizer.step = _no_update  # shadows the method on this instance only
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.step
        optimizer.overflow = False
