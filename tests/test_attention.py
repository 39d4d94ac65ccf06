"""Attention options (GQA/MQA, head_dim, qk_norm, qkv_bias): against a slow reference written for reading, the
pre-GQA formula (bit for bit), and transformers' own attention modules with copied weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from recipe.model.transformer import CausalSelfAttention, apply_rotary, rotary_tables

C, T, THETA, EPS = 32, 10, 10000.0, 1e-5

CASES = {  # name: CausalSelfAttention keyword arguments beside hidden_size=C
    "mha": dict(num_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mqa": dict(num_heads=4, num_kv_heads=1),
    "head_dim": dict(num_heads=4, num_kv_heads=2, head_dim=12),  # H·D = 48 != C
    "qk_norm_head": dict(num_heads=4, num_kv_heads=2, qk_norm="head"),
    "qk_norm_full": dict(num_heads=4, num_kv_heads=2, qk_norm="full"),
    "qkv_bias": dict(num_heads=4, num_kv_heads=2, qkv_bias=True),
    "everything": dict(num_heads=8, num_kv_heads=2, head_dim=6, qk_norm="head", qkv_bias=True),
}


def attention(seed=0, **options) -> CausalSelfAttention:
    """A module with random weights everywhere, norm gains and biases included (so a skipped one shows)."""
    module = CausalSelfAttention(C, norm_eps=EPS, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if param.dim() == 1 else 0.0))
    return module


def inputs(seed=1, batch=2):
    return torch.randn(batch, T, C, generator=torch.Generator().manual_seed(seed))


def ours(module, x):
    cos, sin = rotary_tables(T, module.head_dim, THETA)
    return module(x, cos, sin)


def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rotate(x, position):
    """Rotary embedding of one head vector x (D,) at a position: pair i is (x[i], x[i + D/2]), turned by
    position · θ^(-2i/D)."""
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = position * THETA ** (-2 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def reference(module, x, kv_head_of=lambda h, group: h // group):
    """Slow attention for reading: plain matmuls, one query head at a time, kv head chosen explicitly,
    explicit causal mask, rotary position by position. ``kv_head_of`` is replaceable for negative controls."""
    B = x.shape[0]
    H, KV, D = module.num_heads, module.num_kv_heads, module.head_dim
    qkv = x @ module.wqkv.weight.T
    if module.wqkv.bias is not None:
        qkv = qkv + module.wqkv.bias
    q, k, v = qkv[..., :H * D], qkv[..., H * D:(H + KV) * D], qkv[..., (H + KV) * D:]
    if module.qk_norm == "full":  # over all heads together, before they are split
        q, k = rms(q, module.q_norm.weight), rms(k, module.k_norm.weight)
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
    if module.qk_norm == "head":  # each head's D on its own
        q, k = rms(q, module.q_norm.weight), rms(k, module.k_norm.weight)
    q = torch.stack([rotate(q[:, t], t) for t in range(T)], dim=1)
    k = torch.stack([rotate(k[:, t], t) for t in range(T)], dim=1)
    future = torch.ones(T, T).triu(diagonal=1).bool()  # (query t, key s): s > t is hidden
    heads = []
    for h in range(H):
        g = kv_head_of(h, H // KV)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        heads.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ v[:, :, g])  # (B, T, D)
    return torch.cat(heads, dim=-1) @ module.wo.weight.T  # heads side by side: (B, T, H·D) -> (B, T, C)


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_the_reference(case):
    module, x = attention(**CASES[case]), inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(module, x), reference(module, x), rtol=1e-5, atol=1e-5)


def test_negative_controls_differ():
    """The reference can tell: another grouping of query heads onto kv heads, no qk norm, no bias."""
    x = inputs()
    with torch.no_grad():
        gqa = attention(**CASES["gqa"])
        interleaved = reference(gqa, x, kv_head_of=lambda h, group: h % gqa.num_kv_heads)
        assert not torch.allclose(ours(gqa, x), interleaved, atol=1e-3)
        for case, strip in (("qk_norm_head", "qk_norm"), ("qk_norm_full", "qk_norm"), ("qkv_bias", "bias")):
            module = attention(**CASES[case])
            plain = reference(_without(module, strip), x)
            assert not torch.allclose(ours(module, x), plain, atol=1e-3), case


def _without(module, what):
    """The same weights with the qk norm or the bias switched off."""
    options = dict(num_heads=module.num_heads, num_kv_heads=module.num_kv_heads, head_dim=module.head_dim)
    options.update(qk_norm=module.qk_norm if what != "qk_norm" else "none", qkv_bias=what != "bias"
                   and module.wqkv.bias is not None)
    stripped = CausalSelfAttention(C, norm_eps=EPS, **options)
    stripped.load_state_dict(module.state_dict(), strict=False)
    return stripped


def test_multi_head_layout_is_the_pre_gqa_one_bit_for_bit():
    """KV = H, D = C/H, no bias: the parameters and the output of the attention before these options."""
    module, x = attention(num_heads=4), inputs()
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {"wqkv.weight": (3 * C, C),
                                                                          "wo.weight": (C, C)}
    cos, sin = rotary_tables(T, C // 4, THETA)
    with torch.no_grad():
        B, H = x.shape[0], 4
        q, k, v = module.wqkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # the old forward
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        old = module.wo(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        assert torch.equal(module(x, cos, sin), old)


def test_parameter_shapes_and_names():
    module = attention(**CASES["everything"])  # H=8, KV=2, D=6
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {"wqkv.weight": (72, C), "wqkv.bias": (72,), "wo.weight": (C, 48),
                      "q_norm.weight": (6,), "k_norm.weight": (6,)}
    full = attention(**CASES["qk_norm_full"])  # H=4, KV=2, D=8
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (16,)


def test_gradients_reach_every_parameter():
    module = attention(**CASES["everything"])
    ours(module, inputs()).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# ---- transformers' attention modules with our weights copied in (what issue 13's import relies on) ----

transformers = pytest.importorskip("transformers")

HF_CASES = {  # name: (transformers module, its config kwargs, our options)
    "qwen3_moe_head_norm": ("qwen3_moe", dict(num_key_value_heads=2, head_dim=12, attention_bias=False),
                            dict(num_heads=4, num_kv_heads=2, head_dim=12, qk_norm="head")),
    "olmoe_full_norm": ("olmoe", dict(num_key_value_heads=2, clip_qkv=None),
                        dict(num_heads=4, num_kv_heads=2, qk_norm="full")),
    "qwen2_moe_bias": ("qwen2_moe", dict(num_key_value_heads=1, qkv_bias=True),
                       dict(num_heads=4, num_kv_heads=1, qkv_bias=True)),
    "mixtral_head_dim": ("mixtral", dict(num_key_value_heads=2, head_dim=16),
                         dict(num_heads=4, num_kv_heads=2, head_dim=16)),
}


def hf_attention(model_type, config_kwargs):
    """(attention module, rotary embedding) of a transformers model type, built from its config class."""
    import importlib
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=C, num_attention_heads=4, num_hidden_layers=1, rms_norm_eps=EPS,
        attention_dropout=0.0, rope_parameters={"rope_type": "default", "rope_theta": THETA}, **config_kwargs)
    config._attn_implementation = "sdpa"  # mask None -> causal
    prefix = {"qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe", "qwen2_moe": "Qwen2Moe", "mixtral": "Mixtral"}[model_type]
    attn = getattr(modeling, f"{prefix}Attention")(config, layer_idx=0).eval()
    return attn, getattr(modeling, f"{prefix}RotaryEmbedding")(config)


def copy_into_hf(module, theirs):
    """Our fused wqkv rows [q; k; v] (and bias) into q_proj, k_proj, v_proj; wo into o_proj; q/k norm gains."""
    pairs = zip((theirs.q_proj, theirs.k_proj, theirs.v_proj), module.wqkv.weight.split(module.split_sizes))
    for proj, rows in pairs:
        proj.weight.copy_(rows)
    if module.wqkv.bias is not None:
        for proj, part in zip((theirs.q_proj, theirs.k_proj, theirs.v_proj), module.wqkv.bias.split(module.split_sizes)):
            proj.bias.copy_(part)
    theirs.o_proj.weight.copy_(module.wo.weight)
    if module.qk_norm != "none":
        theirs.q_norm.weight.copy_(module.q_norm.weight)
        theirs.k_norm.weight.copy_(module.k_norm.weight)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_attention_matches_transformers(case):
    model_type, config_kwargs, options = HF_CASES[case]
    module, x = attention(**options), inputs()
    theirs, rotary = hf_attention(model_type, config_kwargs)
    assert {n for n, _ in theirs.named_parameters()} >= {"q_proj.weight", "o_proj.weight"}
    with torch.no_grad():
        copy_into_hf(module, theirs)
        positions = torch.arange(T).expand(x.shape[0], T)
        got, _ = theirs(x, position_embeddings=rotary(x, positions), attention_mask=None)
        torch.testing.assert_close(got, ours(module, x), rtol=1e-5, atol=1e-5)
        assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in module.parameters())
