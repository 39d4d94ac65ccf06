"""Decoder-only transformer LM whose FFN slots are dense SwiGLU or MoE layers. No torch.distributed here.

    tokens (B, T) -> embedding -> N x [x + attn(norm(x)); x + ffn(norm(x))] -> norm -> lm_head -> logits (B, T, V)

``forward`` returns an ``LMOutput`` with the next-token loss and the sums over MoE layers of the
balancing loss and router z-loss; the trainer combines them as
``lm_loss + moe_loss_coeff · moe_loss + router_z_loss_coeff · z_loss``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import QKNorm, RecipeConfig
from .expert_keys import local_to_global
from .moe import DeepSpeedBaselineMoE, MoE, MoEBase, RoutingStats, ShardedMoE, SwiGLU


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V)
    lm_loss: Optional[torch.Tensor]  # () mean next-token cross-entropy, None without targets
    moe_loss: torch.Tensor  # () Σ_layers l_aux (0 for dense models)
    z_loss: torch.Tensor  # () Σ_layers router z-loss
    routing: list[RoutingStats]  # one per MoE layer, in layer order; empty with model.moe_impl="deepspeed"
    moe_layer_losses: list[torch.Tensor]  # l_aux of each MoE layer (detached), in layer order


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by the position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with rotary positions: multi-head, grouped-query (GQA) or multi-query (MQA).

    H query heads and KV key/value heads of width D; query head h attends with kv head h // (H/KV) (the
    grouping of HF's ``repeat_kv``). ``wqkv`` fuses the projections, rows [q: H·D; k: KV·D; v: KV·D], so a
    checkpoint from before GQA (KV = H, D = C/H, no bias) loads unchanged; ``wo`` maps H·D back to C.
    ``qk_norm`` puts an RMSNorm on q and k before rotary: "head" over each head's D (Qwen3-MoE), "full"
    over all heads' H·D and KV·D before the head split (OLMoE). ``qkv_bias`` adds biases to q, k, v (Qwen2).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qk_norm: QKNorm = "none", qkv_bias: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.qk_norm = qk_norm
        # Under tensor parallelism wqkv holds whole kv-head groups (recipe.model.tp_layout) and AutoTP rewrites
        # num_heads: forward counts this rank's heads from wqkv's output width and this ratio.
        self.queries_per_kv = num_heads // self.num_kv_heads
        q_size, kv_size = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]  # wqkv's rows, unsplit
        self.wqkv = nn.Linear(hidden_size, q_size + 2 * kv_size, bias=qkv_bias)
        self.wo = nn.Linear(q_size, hidden_size, bias=False)
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_size, norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_size, norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x)
        kv_heads = qkv.shape[-1] // ((self.queries_per_kv + 2) * self.head_dim)  # this rank's; all without TP
        heads = kv_heads * self.queries_per_kv
        q, k, v = qkv.split([heads * self.head_dim] + [kv_heads * self.head_dim] * 2, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, heads, self.head_dim)
        k = k.view(B, T, kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, KV, T, D)
        v = v.view(B, T, kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa shares each kv head with its H/KV query heads without copying it (on CPU, tiny-model shapes:
        # 10-18% faster than repeat_interleave, forward and backward); off for MHA: the pre-GQA kernel call.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.queries_per_kv > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, heads * self.head_dim))  # y: (B, H, T, D)


def moe_layer(config: RecipeConfig, ep_size: int, zero3: bool = False) -> nn.Module:
    """The MoE layer of an FFN slot: ours (``ShardedMoE`` under ZeRO-3, else ``MoE``), or DeepSpeed's as the
    benchmarking baseline (``model.moe_impl='deepspeed'``; settings DeepSpeed cannot express, and ZeRO-3, are
    refused by ``recipe.config`` / ``recipe.ds_config``). All have the same parameter names and the same
    ``forward(h, token_mask) -> MoEOutput``."""
    m = config.model
    if m.moe_impl == "deepspeed":
        return DeepSpeedBaselineMoE(
            m.hidden_size, m.expert_size, num_experts=m.num_experts, ep_size=ep_size, k=m.moe_gate_k,
            capacity_factor=m.moe_capacity_factor, eval_capacity_factor=m.moe_eval_capacity_factor,
            min_capacity=m.moe_min_capacity, noisy_gate_policy=m.moe_noisy_gate_policy, drop_tokens=m.moe_drop_tokens,
            use_rts=m.moe_use_rts, top2_2nd_expert_sampling=m.moe_second_expert_policy == "sampling",
        )
    layer_class = ShardedMoE if zero3 else MoE
    return layer_class(
        m.hidden_size, m.num_experts, k=m.moe_gate_k, capacity_factor=m.moe_capacity_factor,
        eval_capacity_factor=m.moe_eval_capacity_factor, min_capacity=m.moe_min_capacity,
        drop_tokens=m.moe_drop_tokens, ep_size=ep_size, intermediate_size=m.expert_size, expert=m.moe_expert,
        gate=m.moe_gate, noisy_gate_policy=m.moe_noisy_gate_policy, use_rts=m.moe_use_rts,
        second_expert_policy=m.moe_second_expert_policy,
        balance_over_data_parallel=m.moe_balance_over_data_parallel,
        score_function=m.moe_score_function, norm_topk_prob=m.moe_norm_topk_prob, route_scale=m.moe_route_scale,
        capacity_priority=m.moe_capacity_priority, balance_loss=m.moe_balance_loss,
        bias_balancing=m.moe_bias_update_rate > 0, num_expert_groups=m.moe_num_expert_groups,
        topk_groups=m.moe_topk_groups,
    )


class Block(nn.Module):
    def __init__(self, config: RecipeConfig, use_moe: bool, ep_size: int, zero3: bool = False):
        super().__init__()
        m = config.model
        self.attention_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.attention = CausalSelfAttention(
            m.hidden_size, m.num_attention_heads, num_kv_heads=m.resolved_kv_heads, head_dim=m.resolved_head_dim,
            qk_norm=m.qk_norm, qkv_bias=m.qkv_bias, norm_eps=m.norm_eps)
        self.ffn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.shared_mlp = None
        self.shared_gate = None
        self.is_moe = use_moe
        if use_moe:
            self.ffn = moe_layer(config, ep_size, zero3)
            if m.moe_num_shared_experts > 0:
                # Kept outside the MoE module: DeepSpeed's expert checkpoint treats any key there with
                # "expert" in its name as a routed expert. All shared experts are one SwiGLU of their summed width.
                self.shared_mlp = SwiGLU(m.hidden_size, m.shared_expert_size)
            if m.moe_shared_expert_gate:  # Qwen2-MoE: shared output · sigmoid(h·w), w (1, M)
                self.shared_gate = nn.Linear(m.hidden_size, 1, bias=False)
        else:
            self.ffn = SwiGLU(m.hidden_size, m.ffn_size)

    def forward(self, x, cos, sin, token_mask):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if self.is_moe:
            out, l_aux, z_loss, stats = self.ffn(h, token_mask)  # MoEOutput
        else:
            zero = x.new_zeros((), dtype=torch.float32)
            out, l_aux, z_loss, stats = self.ffn(h), zero, zero, None
        if self.shared_mlp is not None:
            shared = self.shared_mlp(h)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(h)) * shared
            out = out + shared
        return x + out, l_aux, z_loss, stats


class TransformerLM(nn.Module):
    def __init__(self, config: RecipeConfig, ep_size: int = 1, zero3: bool = False):
        """``zero3``: the MoE layers are ``ShardedMoE``, for a ZeRO stage 3 engine (``recipe.model.moe.layer``)."""
        super().__init__()
        m = config.model
        self.config = config
        self.embedding = nn.Embedding(m.vocab_size, m.hidden_size)
        moe_layers = set(config.moe_layer_ids())
        self.blocks = nn.ModuleList(Block(config, i in moe_layers, ep_size, zero3) for i in range(m.num_layers))
        self.norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        if m.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight
        cos, sin = rotary_tables(m.max_seq_len, m.resolved_head_dim, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE FFN layers in layer order: ours, or DeepSpeed's with ``model.moe_impl='deepspeed'``."""
        return [block.ffn for block in self.blocks if block.is_moe]

    @property
    def num_local_experts(self) -> int:
        """Experts each MoE layer holds on this rank (every layer has the same ep_size); 1 for dense models."""
        layers = self.moe_layers()
        return layers[0].num_local_experts if layers else 1

    @property
    def reports_routing(self) -> bool:
        """Whether ``forward`` returns routing telemetry (``LMOutput.routing``): only our MoE layer does."""
        return any(isinstance(layer, MoEBase) for layer in self.moe_layers())

    def shard_experts(self, tp_rank: int, tp_size: int) -> None:
        """Keep TP rank ``tp_rank``'s slice of every routed expert's F (``recipe.model.tp_layout``), once the full
        experts are initialised or loaded."""
        for layer in self.moe_layers():
            layer.deepspeed_moe.experts.shard_intermediate(tp_rank, tp_size)

    @torch.no_grad()
    def init_weights(self, seed: int, ep_rank: int = 0) -> None:
        """Initialise every weight from a generator keyed by its global name and ``seed``.

        Expert weights are keyed by their global expert id, so a model split over any number of
        expert-parallel ranks starts from exactly the weights of the unsplit model.
        Normal(0, init_std) everywhere, scaled by 1/sqrt(2·num_layers) on the projections that write
        into the residual stream (attention ``wo``, FFN ``w2``); RMSNorm weights (q_norm, k_norm too) are 1,
        biases (``qkv_bias``) are 0. Buffers (the routing bias of aux-loss-free balancing) keep the values
        their modules gave them (zeros).
        """
        m = self.config.model
        residual_std = m.init_std / math.sqrt(2 * m.num_layers)
        num_local = self.num_local_experts
        buffers = {name for name, _ in self.named_buffers()}
        for name, tensor in self.state_dict(keep_vars=True).items():
            if name in buffers:  # (stacked expert weights appear as per-expert views, not Parameters)
                continue
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
                continue
            if name.endswith(".bias"):
                tensor.zero_()
                continue
            global_name = local_to_global(name, ep_rank, num_local)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
            std = residual_std if name.endswith(("wo.weight", "w2.weight")) else m.init_std
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None) -> LMOutput:
        B, T = tokens.shape
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embedding(tokens)  # (B, T, C)
        moe_loss = x.new_zeros((), dtype=torch.float32)
        z_loss = x.new_zeros((), dtype=torch.float32)
        routing, layer_losses = [], []
        for block in self.blocks:
            if self.config.model.checkpoint and self.training:
                x, l_aux, z, stats = checkpoint(block, x, cos, sin, token_mask, use_reentrant=False)
            else:
                x, l_aux, z, stats = block(x, cos, sin, token_mask)
            moe_loss = moe_loss + l_aux
            z_loss = z_loss + z
            if stats is not None:
                routing.append(stats)
            if block.is_moe:
                layer_losses.append(l_aux.detach())
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        lm_loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, lm_loss=lm_loss, moe_loss=moe_loss, z_loss=z_loss, routing=routing,
                        moe_layer_losses=layer_losses)

