"""Hugging Face export: transformers' model computes our logits (eval, no token dropping)."""
import pytest
import torch

from recipe.config import config_from_dict
from recipe.export import ExportError, hf_architecture, hf_export_notes, save_hf, to_hf_state
from recipe.model.transformer import TransformerLM

transformers = pytest.importorskip("transformers")

BASE = dict(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=96, max_seq_len=32, multiple_of=8,
            num_experts=4, moe_drop_tokens=False)


def build(**model):
    config = config_from_dict({"model": {**BASE, **model}, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    ours = TransformerLM(config)
    ours.init_weights(seed=3)
    with torch.no_grad():  # larger router weights: decisive, varied routing to test against
        for moe in ours.moe_layers():
            moe.deepspeed_moe.gate.wg.weight.normal_(0, 0.5)
    return config, ours.eval()


@pytest.mark.parametrize("model,arch", [
    (dict(moe_gate_k=2), "mixtral"),
    (dict(moe_gate_k=1), "qwen2_moe"),
    (dict(moe_gate_k=2, moe_layer_freq=2), "qwen2_moe"),
    (dict(moe_gate_k=1, tie_word_embeddings=True), "qwen2_moe"),
])
def test_exported_model_matches_ours(tmp_path, model, arch):
    config, ours = build(**model)
    assert hf_architecture(config) == arch
    save_hf(ours.state_dict(), config, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                               dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(tokens).logits
        got = theirs(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_refuses_what_no_architecture_computes():
    for changes, message in ((dict(moe_num_shared_experts=1), "shared experts"),):
        config, _ = build(**changes)
        with pytest.raises(ExportError, match=message):
            hf_architecture(config)
    dense = config_from_dict({"model_type": "INTERNLM", "model": BASE, "data": {"seq_len": 16}})
    with pytest.raises(ExportError, match="dense models"):
        hf_architecture(dense)


def config_of(**model):
    return config_from_dict({"model": {**BASE, **model}, "data": {"seq_len": 16}})


def export_and_compare(tmp_path, config, ours):
    """Write the HF folder, load it with transformers and compare logits; returns the written config.json."""
    save_hf(ours.state_dict(), config, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                               dtype=torch.float32).eval()
    assert sum(p.numel() for p in theirs.parameters()) >= sum(p.numel() for p in ours.parameters())
    tokens = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, ours(tokens).logits, rtol=1e-4, atol=1e-4)
    return theirs.config


@pytest.mark.parametrize("model,arch", [
    (dict(moe_gate_k=2, num_key_value_heads=2, head_dim=12), "mixtral"),  # GQA, H·D = 48 != 32
    (dict(moe_gate_k=2, num_key_value_heads=1, moe_intermediate_size=24), "mixtral"),  # MQA, expert width
    (dict(moe_gate_k=3, moe_norm_topk_prob=True), "mixtral"),
    (dict(moe_gate_k=2, num_key_value_heads=2, qkv_bias=True), "qwen2_moe"),
    (dict(moe_gate_k=1, num_key_value_heads=2, head_dim=12, moe_layer_freq=2), "qwen2_moe"),
    (dict(moe_gate_k=2, moe_num_shared_experts=2, moe_shared_expert_intermediate_size=20,
          moe_shared_expert_gate=True), "qwen2_moe"),
    (dict(moe_gate_k=2, moe_dense_first_layers=1, intermediate_size=40, moe_intermediate_size=24), "qwen2_moe"),
    (dict(moe_gate_k=2, qk_norm="head", num_key_value_heads=2, head_dim=12), "qwen3_moe"),
    (dict(moe_gate_k=1, qk_norm="head", moe_layer_freq=2, intermediate_size=40), "qwen3_moe"),
    (dict(moe_gate_k=3, qk_norm="full", num_key_value_heads=2, moe_norm_topk_prob=False), "olmoe"),
    (dict(moe_gate_k=2, qk_norm="full", tie_word_embeddings=True), "olmoe"),
])
def test_attention_and_expert_options_export_exactly(tmp_path, model, arch):
    config, ours = build(**model)
    with torch.no_grad():  # random biases, q/k norms and a decisive shared gate, so that dropping one would show
        for name, param in ours.named_parameters():
            if name.endswith((".bias", "q_norm.weight", "k_norm.weight")) or "shared_gate" in name:
                param.normal_(0, 0.5)
    assert hf_architecture(config) == arch
    exported = export_and_compare(tmp_path, config, ours)
    assert exported.num_key_value_heads == config.model.resolved_kv_heads
    assert exported.head_dim == config.model.resolved_head_dim


@pytest.mark.parametrize("norm_topk_prob,k,renormalised", [(False, 2, False), (True, 1, True), (None, 1, False),
                                                           (None, 2, True)])
def test_norm_topk_prob_picks_the_class_and_its_rule(norm_topk_prob, k, renormalised):
    """Mixtral always renormalises over the k chosen; otherwise Qwen2-MoE with its norm_topk_prob."""
    config = config_of(moe_gate_k=k, moe_norm_topk_prob=norm_topk_prob)
    _, hf_config = to_hf_state(TransformerLM(config).state_dict(), config)
    if renormalised:  # every layer here is an MoE layer
        assert hf_config["model_type"] == "mixtral"
    else:
        assert hf_config["model_type"] == "qwen2_moe" and hf_config["norm_topk_prob"] is renormalised


def test_raw_top2_scores_export_exactly(tmp_path):
    config, ours = build(moe_gate_k=2, moe_norm_topk_prob=False)
    if ours.moe_layers()[0].routing_options["norm_topk_prob"] is not False:
        pytest.skip("moe_layer() does not pass model.moe_norm_topk_prob to the layer yet")
    assert export_and_compare(tmp_path, config, ours).norm_topk_prob is False


@pytest.mark.parametrize("changes,message", [
    (dict(qk_norm="head", qkv_bias=True), "`model.qkv_bias=True`: Qwen3MoeForCausalLM has no q/k/v biases"),
    (dict(qk_norm="head", moe_num_shared_experts=1, moe_shared_expert_gate=True),
     "`model.moe_num_shared_experts=1`: Qwen3MoeForCausalLM has no shared expert"),
    (dict(qk_norm="full", moe_layer_freq=2), "dense FFN layers (`model.moe_layer_freq`"),
    (dict(qk_norm="full", head_dim=12), "`model.head_dim=12`: OlmoeForCausalLM has heads x head_dim = hidden_size"),
    (dict(moe_score_function="sigmoid"), "`model.moe_score_function='sigmoid'`"),
    (dict(moe_bias_update_rate=1e-3), "`model.moe_bias_update_rate=0.001`: the expert bias"),
    (dict(moe_route_scale=2.5), "`model.moe_route_scale=2.5`"),
    (dict(moe_num_expert_groups=2), "`model.moe_num_expert_groups=2`: group-limited"),
    (dict(moe_num_shared_experts=1), "shared experts without a gate"),
    (dict(moe_expert="my_expert"), "expert 'my_expert'"),
])
def test_each_option_no_class_computes_is_refused_by_name(changes, message):
    with pytest.raises(ExportError, match="export with --format torch") as info:
        hf_architecture(config_of(**changes))
    assert message in str(info.value)


def test_capacity_dropping_exports_as_the_dropless_model_with_a_note():
    assert hf_export_notes(config_of(moe_drop_tokens=False)) == []
    (note,) = hf_export_notes(config_of(moe_drop_tokens=True))
    assert "`model.moe_drop_tokens=True`" in note and "dropless" in note

