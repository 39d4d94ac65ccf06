"""Hugging Face export: transformers' model computes our logits (eval, no token dropping)."""
import pytest
import torch

from recipe.config import config_from_dict
from recipe.export import ExportError, hf_architecture, save_hf
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
