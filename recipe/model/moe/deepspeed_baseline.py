"""DeepSpeed's own MoE layer behind our layer's interface: the benchmarking baseline (``model.moe_impl='deepspeed'``).

A subclass of ``deepspeed.moe.layer.MoE`` rather than a wrapper around one, so that the module tree, and
with it every state-dict key, is DeepSpeed's (router at ``deepspeed_moe.gate.wg.weight``, experts under the
per-expert keys of ``recipe.model.expert_keys``: the same keys as our layer, so ``init_weights`` gives both
the same weights and checkpoints, export and generation treat both alike), and the engine recognises it
as an MoE layer. Only ``forward`` changes: it returns our ``MoEOutput``.

Any ``1 <= k <= num_experts``: DeepSpeed's ``TopKGate`` runs ``top1gating`` at k=1, ``top2gating`` at k=2
and ``topkgating`` at k >= 3 (deepspeed 0.19.8, ``moe/sharded_moe.py``), the last always with its default
``drop_policy='probs'``. What ``topkgating`` computes, which our layer matches with
``capacity_priority='probs', balance_loss='switch'`` (``recipe.config`` requires both for this baseline at k >= 3):

* softmax over the E experts in fp32, then the top k;
* capacity ``ceil(S/E · float32(cf·k))``, at least ``min_capacity``; each expert keeps the ``capacity`` tokens
  that chose it with the largest gate values (ties in arbitrary order); ``drop_tokens=False`` sizes the
  capacity to the largest load instead (nothing dropped);
* combine weights: the gates renormalised over the choices that survive;
* ``l_aux = E/k · Σ_e me_e · ce_e`` with ``ce_e`` the fraction of tokens that have e among their k choices
  (all choices, before dropping), 1 at perfect balance; no jitter-free noise, RTS or padding mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE

from .experts import SwiGLU
from .layer import MoEOutput


class DeepSpeedBaselineMoE(DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` with a SwiGLU expert of width ``intermediate_size``.

    Keyword arguments are DeepSpeed's (``num_experts``, ``ep_size``, ``k``, ``capacity_factor`` ...); any
    ``1 <= k <= num_experts`` (see the module docstring for k >= 3).
    ``forward(hidden_states, token_mask=None)`` returns ``MoEOutput(output, l_aux, z_loss, stats)`` with
    ``l_aux`` in fp32, ``z_loss`` an fp32 zero (DeepSpeed has none) and ``stats`` None (no routing telemetry).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, **deepspeed_kwargs):
        num_experts, k = deepspeed_kwargs.get("num_experts", 1), deepspeed_kwargs.get("k", 1)
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in 1..num_experts ({num_experts}), got {k}")
        super().__init__(hidden_size, SwiGLU(hidden_size, intermediate_size), **deepspeed_kwargs)

    def forward(self, hidden_states: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> MoEOutput:
        if token_mask is not None:
            raise ValueError("token_mask (padding) is not supported with model.moe_impl='deepspeed': "
                             f"DeepSpeed's top-{self.deepspeed_moe.gate.k} gate ignores it; use moe_impl='recipe'")
        output, l_aux, _expert_counts = super().forward(hidden_states)
        z_loss = hidden_states.new_zeros((), dtype=torch.float32)
        return MoEOutput(output, l_aux.float(), z_loss, None)
