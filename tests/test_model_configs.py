"""The published-model-shaped configs: each loads, and its parameter count is the published one (never built)."""
import pytest

from conftest import ROOT
from recipe.config import ConfigError, config_from_dict, load_config, parameter_counts

# name: (published total, published active per token) in billions, as their model cards round them
PUBLISHED = {
    "qwen3_moe_30b_a3b": (30.5, 3.3),
    "mixtral_8x7b": (46.7, 12.9),
    "olmoe_1b_7b": (6.9, 1.3),
    "deepseek_moe_16b": (16.4, 2.8),
}


def load(name):
    return load_config(ROOT / "recipe" / "configs" / f"{name}.py")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_config_loads_and_counts_the_published_parameters(name):
    counts = parameter_counts(load(name))
    total, active = PUBLISHED[name]
    # Qwen3's "3.3B activated" is 3.35B cut to one decimal (1.6% off); the others round to within 1.5%.
    assert counts["total"] / 1e9 == pytest.approx(total, rel=0.015)
    assert counts["active"] / 1e9 == pytest.approx(active, rel=0.02 if name == "qwen3_moe_30b_a3b" else 0.015)


def _counts(layers, d, vocab, heads, kv_heads, head_dim, qk_norm, dense_ffn, dense_layers, experts, k, width,
            shared_width=0):
    """The count written out once more from the architecture's description, independently of the recipe."""
    attention = d * (heads + 2 * kv_heads) * head_dim + heads * head_dim * d + qk_norm + 2 * d  # + its two norms
    moe_fixed = attention + d * experts + 3 * d * shared_width  # router, shared experts
    dense = attention + 3 * d * dense_ffn
    outside = 2 * vocab * d + d  # embedding, untied head, final norm
    moe_layers = layers - dense_layers
    total = outside + dense_layers * dense + moe_layers * (moe_fixed + experts * 3 * d * width)
    active = outside + dense_layers * dense + moe_layers * (moe_fixed + k * 3 * d * width)
    return {"total": total, "active": active}


def test_exact_counts():
    assert parameter_counts(load("qwen3_moe_30b_a3b")) == _counts(
        48, 2048, 151936, 32, 4, 128, 2 * 128, 0, 0, 128, 8, 768) == {"total": 30_532_122_624,
                                                                        "active": 3_353_032_704}
    assert parameter_counts(load("mixtral_8x7b")) == _counts(
        32, 4096, 32000, 32, 8, 128, 0, 0, 0, 8, 2, 14336) == {"total": 46_702_792_704, "active": 12_879_925_248}
    assert parameter_counts(load("olmoe_1b_7b")) == _counts(
        16, 2048, 50304, 16, 16, 128, 2 * 2048, 0, 0, 64, 8, 1024) == {"total": 6_919_161_856,
                                                                         "active": 1_282_017_280}
    assert parameter_counts(load("deepseek_moe_16b")) == _counts(
        28, 2048, 102400, 16, 16, 128, 0, 10944, 1, 64, 6, 1408, shared_width=2 * 1408) == {
        "total": 16_375_728_128, "active": 2_828_650_496}


def test_configs_have_their_models_shapes():
    qwen3, olmoe, deepseek = load("qwen3_moe_30b_a3b").model, load("olmoe_1b_7b").model, load("deepseek_moe_16b")
    assert (qwen3.resolved_kv_heads, qwen3.resolved_head_dim, qwen3.qk_norm) == (4, 128, "head")
    assert qwen3.num_attention_heads * qwen3.resolved_head_dim != qwen3.hidden_size
    assert (olmoe.qk_norm, olmoe.moe_norm_topk_prob) == ("full", False)
    assert deepseek.moe_layer_ids() == list(range(1, 28)) and deepseek.model.shared_expert_size == 2816
    assert all(not load(name).model.moe_drop_tokens for name in PUBLISHED)  # all four are dropless


def test_export_takes_each_published_shape_to_its_class():
    """Mixtral, Qwen3-MoE and OLMoE export as their own class; DeepSeek-MoE's ungated shared experts have none."""
    from recipe.export import ExportError, hf_architecture

    for name, arch in (("mixtral_8x7b", "mixtral"), ("qwen3_moe_30b_a3b", "qwen3_moe"), ("olmoe_1b_7b", "olmoe")):
        assert hf_architecture(load(name)) == arch
    with pytest.raises(ExportError, match="moe_shared_expert_gate"):
        hf_architecture(load("deepseek_moe_16b"))


@pytest.mark.parametrize("key", ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim"])
def test_mla_keys_are_refused_by_name(key):
    with pytest.raises(ConfigError, match=f"`model.{key}`: MLA attention"):
        config_from_dict({"model": {key: 64}})
