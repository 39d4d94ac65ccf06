"""Aux-loss-free load balancing (DeepSeek-V3), the trainer's half: the bias update.

Each MoE layer built with ``model.moe_bias_update_rate = u > 0`` holds a bias b (E,) that the gate adds to the
router scores to choose experts, never to weight them (``Router.e_score_correction_bias``). After every applied
optimizer step the trainer moves it against the step's load:

    b_e += u · sign(mean(load) − load_e)

where ``load_e`` counts the (token, choice) pairs that chose expert e (before any capacity drop) in every
micro-batch of the step, summed over all ranks (every rank routes its own tokens over all E experts). Every rank
applies the same update to the same bias, so the biases stay identical without being broadcast. A skipped step
(non-finite loss or gradients) changes nothing, like the weights. The model itself stays collective-free.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..model.moe.layer import MoEBase, RoutingStats
from ..model.transformer import TransformerLM

Reduce = Callable[[torch.Tensor], torch.Tensor]


class ExpertBiasBalancer:
    """The step's expert loads of every bias-balanced MoE layer, and the bias update they lead to."""

    def __init__(self, layers: list[MoEBase], rate: float):
        self.biases = [layer.deepspeed_moe.gate.e_score_correction_bias for layer in layers]
        self.rate = rate
        self.loads: Optional[torch.Tensor] = None  # (layers, E) fp32, summed over the step's micro-batches

    @classmethod
    def for_model(cls, model: TransformerLM, rate: float) -> Optional["ExpertBiasBalancer"]:
        """A balancer for every MoE layer of ``model`` that has a bias; None when bias balancing is off."""
        layers = [layer for layer in model.moe_layers()
                  if isinstance(layer, MoEBase) and layer.deepspeed_moe.gate.e_score_correction_bias is not None]
        return cls(layers, rate) if layers and rate > 0 else None

    def add(self, routing: list[RoutingStats]) -> None:
        """Count one micro-batch's loads (``LMOutput.routing``, one entry per MoE layer, in layer order)."""
        loads = torch.stack([stats.choice_count.float() for stats in routing])
        self.loads = loads if self.loads is None else self.loads + loads

    def step_done(self, applied: bool, reduce: Reduce) -> None:
        """After the optimizer step: update the biases if it was applied (every rank must call it), then start
        counting afresh. ``reduce`` sums a tensor over all ranks."""
        loads, self.loads = self.loads, None
        if not applied:  # an applied step had only finite micro-batches, all of them counted
            return
        total = reduce(loads.to(self.biases[0].device))
        for bias, load in zip(self.biases, total):
            bias.add_(self.rate * torch.sign(load.mean() - load))
