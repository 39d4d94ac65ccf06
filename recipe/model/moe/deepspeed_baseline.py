"""DeepSpeed's own MoE layer behind our layer's interface: the benchmarking baseline (``model.moe_impl='deepspeed'``).

A subclass of ``deepspeed.moe.layer.MoE`` rather than a wrapper around one, so that the module tree, and
with it every state-dict key, is DeepSpeed's (router at ``deepspeed_moe.gate.wg.weight``, experts under the
per-expert keys of ``recipe.model.expert_keys``: the same keys as our layer, so ``init_weights`` gives both
the same weights and checkpoints, export and generation treat both alike), and the engine recognises it
as an MoE layer. Only ``forward`` changes: it returns our ``MoEOutput``.
"""
from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE

from .experts import SwiGLU
from .layer import MoEOutput


class DeepSpeedBaselineMoE(DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` with a SwiGLU expert of width ``intermediate_size``.

    Keyword arguments are DeepSpeed's (``num_experts``, ``ep_size``, ``k``, ``capacity_factor`` ...).
    ``forward(hidden_states, token_mask=None)`` returns ``MoEOutput(output, l_aux, z_loss, stats)`` with
    ``l_aux`` in fp32, ``z_loss`` an fp32 zero (DeepSpeed has none) and ``stats`` None (no routing telemetry).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, **deepspeed_kwargs):
        super().__init__(hidden_size, SwiGLU(hidden_size, intermediate_size), **deepspeed_kwargs)

    def forward(self, hidden_states: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> MoEOutput:
        if token_mask is not None:
            raise ValueError("token_mask (padding) is not supported with model.moe_impl='deepspeed': "
                             "DeepSpeed's top-2 gate ignores it; use moe_impl='recipe'")
        output, l_aux, _expert_counts = super().forward(hidden_states)
        z_loss = hidden_states.new_zeros((), dtype=torch.float32)
        return MoEOutput(output, l_aux.float(), z_loss, None)
