"""Tensor-parallel cuts (``recipe.model.tp_layout``) on one process: every TP rank's slice joins back to the full
weight, and the slices compute the full layer: attention's heads (GQA, per-head q/k norm, q/k/v bias) and the
experts' F, each summed over the TP ranks as the row-parallel all-reduce / the dispatcher's g would."""
import copy

import pytest
import torch
from torch import nn

from recipe.config import config_from_dict
from recipe.model.moe.experts import SwiGLUExperts, run_experts_indexed
from recipe.model.tp_layout import join_state_dicts, qkv_rows, tp_cut, tp_slice
from recipe.model.transformer import CausalSelfAttention, TransformerLM

CONFIG = config_from_dict({"model": dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=64, max_seq_len=16, num_experts=4, moe_layer_freq=2,
                                         moe_intermediate_size=16, moe_num_shared_experts=1, qk_norm="head",
                                         qkv_bias=True), "data": {"seq_len": 8}})
ROWS = qkv_rows(CONFIG)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_slices_join_back_to_every_weight(tp_size):
    model = TransformerLM(CONFIG)
    model.init_weights(seed=0)
    full = model.state_dict()
    per_rank = [{key: tp_slice(key, value, r, tp_size, ROWS) for key, value in full.items()} for r in range(tp_size)]
    joined = join_state_dicts(per_rank, ROWS)
    assert joined.keys() == full.keys()
    for key, value in full.items():
        torch.testing.assert_close(joined[key], value, rtol=0, atol=0, msg=key)
    cut = {key for key in full if tp_cut(key, ROWS) is not None}
    assert {"blocks.0.attention.wqkv.weight", "blocks.0.attention.wqkv.bias", "blocks.0.ffn.w2.weight",
            "blocks.1.shared_mlp.w1.weight", "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.3.w2.weight"} <= cut
    assert not cut & {"embedding.weight", "lm_head.weight", "blocks.1.ffn.deepspeed_moe.gate.wg.weight",
                      "blocks.0.attention.q_norm.weight"}


def _attention_slice(full: CausalSelfAttention, r: int, tp_size: int, naive: bool = False) -> CausalSelfAttention:
    """TP rank r's attention: its rows of wqkv (and bias), its columns of wo; ``naive`` cuts wqkv as one block."""
    part = copy.deepcopy(full)
    state = {}
    for key, value in full.state_dict().items():
        name = f"blocks.0.attention.{key}"
        state[key] = value.chunk(tp_size)[r] if naive and "wqkv" in key else tp_slice(name, value, r, tp_size, ROWS)
    part.wqkv = nn.Linear(32, state["wqkv.weight"].shape[0], bias=True)
    part.wo = nn.Linear(state["wo.weight"].shape[1], 32, bias=False)
    part.load_state_dict(state)
    return part


def test_attention_heads_split_over_tp_sum_to_the_full_attention():
    """The row-parallel wo sums the ranks' partial outputs; each rank counts its heads from wqkv's width (GQA:
    2 of 4 query heads and the kv head they read). The negative control: wqkv cut as one block (ignoring its
    q / k / v parts) computes something else."""
    torch.manual_seed(0)
    full = CausalSelfAttention(32, 4, num_kv_heads=2, head_dim=8, qk_norm="head", qkv_bias=True)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 8, 32)
    lm = TransformerLM(CONFIG)
    cos, sin = lm.rope_cos[:8], lm.rope_sin[:8]
    expected = full(x, cos, sin)
    got = sum(_attention_slice(full, r, 2)(x, cos, sin) for r in range(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    naive = sum(_attention_slice(full, r, 2, naive=True)(x, cos, sin) for r in range(2))
    assert (naive - expected).abs().max() > 1e-2


def test_experts_split_over_f_sum_to_the_full_experts_and_keep_their_tags():
    torch.manual_seed(0)
    full = SwiGLUExperts(num_local_experts=3, hidden_size=8, intermediate_size=12, use_grouped_mm=False)
    x = torch.randn(10, 8)
    tokens_per_expert = torch.tensor([4, 0, 6])
    index, weight = torch.randperm(10), torch.rand(10)
    expected = run_experts_indexed(full, x, tokens_per_expert, index, weight)
    shards = []
    for r in range(2):
        shard = copy.deepcopy(full)
        for p in shard.parameters():
            p.allreduce, p.group_name = False, "ep_size_1"  # DeepSpeed's expert tags, set by the MoE layer
        shard.shard_intermediate(r, 2)
        shards.append(shard)
    got = sum(run_experts_indexed(shard, x, tokens_per_expert, index, weight) for shard in shards)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    w2 = shards[1].w2
    assert w2.shape == (3, 8, 6) and w2.tensor_model_parallel and w2.allreduce is False
    assert w2.group_name == "ep_size_1" and shards[1].intermediate_size == 6
    torch.testing.assert_close(w2, full.w2[:, :, 6:], rtol=0, atol=0)
