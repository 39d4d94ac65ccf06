"""Where tensor parallelism (TP) cuts each weight, in one table: what DeepSpeed AutoTP is told to shard, how a TP
rank's slice is cut from a full weight, and how the slices of a TP checkpoint are joined again. No torch.distributed.

Megatron's layout, over a TP group of ``tp`` ranks that see the same tokens:

* column-parallel (rows of the weight): ``attention.wqkv`` (per head group: rank r holds query heads and the kv
  heads they read, [q_r; k_r; v_r]), the dense and shared-expert FFN's ``w1`` and ``w3``;
* row-parallel (columns): ``attention.wo``, the FFN's ``w2``;
* routed experts (``recipe.model.moe.experts.SwiGLUExperts``): the intermediate size F of every local expert,
  stacked ``w1``/``w3`` (E, F, M) on dim 1 and ``w2`` (E, M, F) on dim 2 (``SwiGLUExperts.shard_intermediate``);
  under the per-expert state-dict keys, which checkpoints and the readers use, one dim less;
* everything else is replicated: embeddings, LM head, norms, router, the shared-expert gate. ``q_norm``/``k_norm``
  of ``qk_norm="head"`` normalise sharded heads, so their gradients are summed over TP (AutoTP ``grad_allreduce``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import RecipeConfig

_BLOCK = r"blocks\.\d+\."
# Regexes on state-dict keys: column-parallel weights are cut on dim 0, row-parallel ones on dim 1.
_COLUMN = [_BLOCK + r"attention\.wqkv\.(weight|bias)", _BLOCK + r"(ffn|shared_mlp)\.w[13]\.weight"]
_ROW = [_BLOCK + r"attention\.wo\.weight", _BLOCK + r"(ffn|shared_mlp)\.w2\.weight"]
# DeepSpeed's per-expert file keys: ``...ffn.deepspeed_moe.experts.deepspeed_experts.<e>.w1.weight`` (F, M).
_EXPERT_FILE = {_BLOCK + r"ffn\.deepspeed_moe\.experts\.deepspeed_experts\.\d+\.w[13]\.weight": 0,
                _BLOCK + r"ffn\.deepspeed_moe\.experts\.deepspeed_experts\.\d+\.w2\.weight": 1}


@dataclass(frozen=True)
class TPCut:
    dim: int
    # row sizes of the sub-weights cut separately (wqkv: q, k, v rows), None: the dim is cut as one
    parts: Optional[tuple[int, ...]] = None


QKVRows = tuple[int, int, int]  # wqkv's q, k, v rows (heads x head_dim)


def qkv_rows(config: RecipeConfig) -> QKVRows:
    m = config.model
    return (m.num_attention_heads * m.resolved_head_dim,) + (m.resolved_kv_heads * m.resolved_head_dim,) * 2


def tp_cut(name: str, rows: QKVRows) -> Optional[TPCut]:
    """How the full weight ``name`` (a state-dict key) is cut over TP; None: replicated."""
    if any(re.fullmatch(p, name) for p in _COLUMN):
        return TPCut(0, rows if ".attention.wqkv." in name else None)
    if any(re.fullmatch(p, name) for p in _ROW):
        return TPCut(1)
    for pattern, dim in _EXPERT_FILE.items():
        if re.fullmatch(pattern, name):
            return TPCut(dim)
    return None


def tp_slice(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, rows: QKVRows) -> torch.Tensor:
    """TP rank ``tp_rank``'s slice of the full weight ``name`` (the full tensor itself when it is replicated)."""
    cut = tp_cut(name, rows)
    if cut is None or tp_size == 1:
        return full
    pieces = full.split(list(cut.parts), dim=cut.dim) if cut.parts else (full,)
    return torch.cat([piece.chunk(tp_size, dim=cut.dim)[tp_rank] for piece in pieces], dim=cut.dim).clone()


def tp_join(name: str, slices: list[torch.Tensor], rows: QKVRows) -> torch.Tensor:
    """The full weight from every TP rank's slice, in TP-rank order (inverse of ``tp_slice``)."""
    cut = tp_cut(name, rows)
    if cut is None or len(slices) == 1:
        return slices[0]
    if not cut.parts:
        return torch.cat(slices, dim=cut.dim)
    local_parts = [size // len(slices) for size in cut.parts]
    per_rank = [s.split(local_parts, dim=cut.dim) for s in slices]
    return torch.cat([torch.cat([rank_parts[i] for rank_parts in per_rank], dim=cut.dim)
                      for i in range(len(cut.parts))], dim=cut.dim)


def join_state_dicts(per_tp_rank: list[dict[str, torch.Tensor]], rows: QKVRows) -> dict[str, torch.Tensor]:
    """One state dict from the TP ranks' (same keys; the replicated entries are taken from TP rank 0)."""
    keys = set(per_tp_rank[0])
    if any(set(state) != keys for state in per_tp_rank[1:]):
        raise ValueError("the tensor-parallel ranks' checkpoint files hold different weights")
    return {key: tp_join(key, [state[key] for state in per_tp_rank], rows) for key in per_tp_rank[0]}


def autotp_partition_config(config: RecipeConfig) -> dict:
    """DeepSpeed AutoTP's ``tensor_parallel.partition_config`` for this model: the dense column/row weights above;
    any other layer (router, experts, embeddings, head) is left alone by AutoTP."""
    q, k, v = qkv_rows(config)
    specs = [
        {"patterns": [r".*\.attention\.wqkv\.weight$"], "partition_type": "column", "shape": [[q, k, v], -1],
         "partition_dim": 0},
        {"patterns": [r".*\.(ffn|shared_mlp)\.w[13]\.weight$"], "partition_type": "column"},
        {"patterns": [r".*\.attention\.wo\.weight$", r".*\.(ffn|shared_mlp)\.w2\.weight$"], "partition_type": "row"},
    ]
    if config.model.qk_norm == "head":  # replicated weights applied to this rank's heads only
        specs.append({"patterns": [r".*\.attention\.[qk]_norm\.weight$"], "partition_type": "skip",
                      "grad_allreduce": True})
    return {"use_default_specs": False, "layer_specs": specs}
