"""The transformer LM: layer layout, activation checkpointing, initialisation independent of EP layout."""
import pytest
import torch
import torch.nn.functional as F

from recipe.config import config_from_dict
from recipe.model.expert_keys import shard_experts
from recipe.model.moe import MoE, SwiGLU
from recipe.model.transformer import TransformerLM, apply_rotary, rotary_tables

SMALL = dict(num_layers=4, hidden_size=32, num_attention_heads=2, vocab_size=64, max_seq_len=16, multiple_of=8,
             num_experts=4, moe_gate_k=2, moe_drop_tokens=False)


def small(**changes):
    model = {**SMALL, **changes.pop("model", {})}
    return config_from_dict({"model": model, "data": {"seq_len": 16}, **changes})


def test_moe_layer_frequency_and_dense_model():
    config = small(model=dict(moe_layer_freq=2))
    assert config.moe_layer_ids() == [1, 3]
    model = TransformerLM(config)
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, True, False, True]
    dense = TransformerLM(small(model_type="INTERNLM"))
    assert all(isinstance(b.ffn, SwiGLU) for b in dense.blocks) and not dense.moe_layers()
    out = dense(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert out.moe_loss.item() == 0.0 and out.routing == []


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpoint in (False, True):
        model = TransformerLM(small(model=dict(checkpoint=checkpoint, moe_num_shared_experts=1)))
        model.init_weights(seed=1)
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.lm_loss + 0.1 * out.moe_loss).backward()
        results.append((out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


def test_init_does_not_depend_on_expert_parallel_layout():
    """Rank r of an EP=2 model starts with exactly the experts [2r, 2r+2) of the EP=1 model."""
    full = TransformerLM(small())
    full.init_weights(seed=5)
    full_state = full.state_dict()
    for ep_rank in range(2):
        shard = TransformerLM(small(), ep_size=2)
        shard.init_weights(seed=5, ep_rank=ep_rank)
        expected = shard_experts(full_state, ep_rank, num_local_experts=2)  # global ids -> this rank's local ids
        assert shard.state_dict().keys() == expected.keys()
        for key, value in shard.state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_init_scales_residual_projections_and_sets_norms():
    model = TransformerLM(small(model=dict(num_layers=8, num_experts=8)))
    model.init_weights(seed=0)
    std_in = model.blocks[0].attention.wqkv.weight.std().item()
    std_out = model.blocks[0].attention.wo.weight.std().item()
    assert std_in == pytest.approx(0.02, rel=0.1) and std_out == pytest.approx(0.02 / 4, rel=0.15)
    assert torch.all(model.blocks[3].ffn_norm.weight == 1)
    experts = model.blocks[0].ffn.deepspeed_moe.experts
    assert not torch.equal(experts.w1[0], experts.w1[1])  # every expert has its own draw


def test_causal_attention_ignores_the_future():
    model = TransformerLM(small(model_type="INTERNLM"))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 64, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rotary_is_a_rotation_by_position():
    cos, sin = rotary_tables(8, 4, 10000.0)
    q = torch.randn(1, 1, 8, 4)
    rotated = apply_rotary(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))  # norms preserved
    torch.testing.assert_close(rotated[..., 0, :], q[..., 0, :])  # position 0 unrotated
    # Relative: <R_m q, R_n k> depends on m - n only.
    k = torch.randn(1, 1, 1, 4).expand(1, 1, 8, 4)
    qq = torch.randn(1, 1, 1, 4).expand(1, 1, 8, 4)
    dots = (apply_rotary(qq, cos, sin)[0, 0, :, None] * apply_rotary(k, cos, sin)[0, 0, None, :]).sum(-1)
    torch.testing.assert_close(dots[3, 1], dots[5, 3])


def test_sequence_longer_than_max_rejected_and_padding_targets_ignored():
    model = TransformerLM(small(model_type="INTERNLM"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    tokens = torch.randint(0, 64, (1, 8))
    targets = tokens.clone()
    targets[0, 4:] = -100
    out = model(tokens, targets)
    expected = F.cross_entropy(out.logits[0, :4], targets[0, :4])
    torch.testing.assert_close(out.lm_loss, expected)


def test_shared_expert_gate_scales_the_shared_output():
    """Qwen2-MoE's gate: block output = x' + routed(h) + sigmoid(h·w_gate) · shared(h), all shared experts in one
    SwiGLU of their summed width; no state-dict key outside the MoE module names an expert."""
    config = small(model=dict(moe_num_shared_experts=2, moe_shared_expert_intermediate_size=24,
                              moe_shared_expert_gate=True))
    model = TransformerLM(config).eval()
    model.init_weights(seed=2)
    block = model.blocks[0]
    assert block.shared_mlp.w1.weight.shape == (48, 32) and block.shared_gate.weight.shape == (1, 32)
    assert not [k for k in model.state_dict() if "expert" in k and ".ffn." not in k]
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    with torch.no_grad():
        after_attention = x + block.attention(block.attention_norm(x), cos, sin)
        h = block.ffn_norm(after_attention)
        routed = block.ffn(h, None)[0]
        expected = after_attention + routed + torch.sigmoid(block.shared_gate(h)) * block.shared_mlp(h)
        torch.testing.assert_close(block(x, cos, sin, None)[0], expected)
        ungated = after_attention + routed + block.shared_mlp(h)
        assert not torch.allclose(expected, ungated)


def test_init_of_attention_options():
    """q/k norm gains start at 1, q/k/v biases at 0; every other weight is the draw the plain model makes."""
    plain = TransformerLM(small())
    plain.init_weights(seed=4)
    options = TransformerLM(small(model=dict(qk_norm="head", qkv_bias=True)))
    options.init_weights(seed=4)
    state, plain_state = options.state_dict(), plain.state_dict()
    added = set(state) - set(plain_state)
    assert added == {f"blocks.{i}.attention.{name}" for i in range(4)
                     for name in ("q_norm.weight", "k_norm.weight", "wqkv.bias")}
    assert all(torch.all(state[k] == (0 if k.endswith(".bias") else 1)) for k in added)
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())
    assert not [k for k in plain_state if k.endswith(".bias")]  # so zeroing biases leaves older runs' init alone


def test_grouped_query_attention_model_trains_and_ignores_the_future():
    model = TransformerLM(small(model=dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12)))
    model.init_weights(seed=0)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits[:, :8], model(changed).logits[:, :8])
    model.train()
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.lm_loss.backward()
    assert all(p.grad is not None for p in model.parameters())
