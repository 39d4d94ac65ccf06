"""`model.moe_impl='deepspeed'`: deepspeed.moe.layer.MoE in the FFN slots, the end-to-end benchmark's baseline.

The baseline is only a fair one if it computes what our layer computes: with the same weights (same
parameter names, same init) and no token dropping, both models give the same logits, losses and
gradients; on 2 ranks with EP=2 it trains and follows our model step for step.
"""
from __future__ import annotations

import pytest
import torch

from conftest import launch, read_metrics, write_config, write_ds_config
from recipe.config import ConfigError, config_from_dict
from recipe.model.expert_keys import parse_stacked, stacked_keys
from recipe.model.transformer import TransformerLM

MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=320, max_seq_len=32, multiple_of=8,
             num_experts=4, moe_gate_k=2, moe_capacity_factor=1.25, moe_min_capacity=2,
             moe_balance_over_data_parallel=False)


def build(impl: str, **model) -> TransformerLM:
    config = config_from_dict({"model": {**MODEL, **model, "moe_impl": impl}, "data": {"seq_len": 16}})
    lm = TransformerLM(config)
    lm.init_weights(seed=0)
    return lm


def per_expert_grads(model: TransformerLM) -> dict[str, torch.Tensor]:
    """Parameter gradients under state-dict names (our stacked expert grads cut per expert)."""
    grads = {}
    for name, param in model.named_parameters():
        stacked = parse_stacked(name)
        if stacked is not None:
            grads.update(zip(stacked_keys(*stacked, range(param.shape[0])), param.grad.unbind(0)))
        else:
            grads[name] = param.grad
    return grads


@pytest.mark.parametrize("k,cf,drop", [(1, 1.25, False), (2, 1.25, False), (1, 8.0, True), (2, 0.5, True)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_deepspeed_layer_computes_what_ours_computes(k, cf, drop, mode):
    """Same weights, same tokens: equal logits, lm/balancing losses and gradients. Without dropping for
    top-1 (cf=8 leaves room for every token); top-2 also with dropping (cf=0.5), since both keep first
    choices before second ones in token order. (DeepSpeed's top-1 picks the survivors of an overflowing
    expert by topk over a 0/1 mask, an arbitrary tie-break, so top-1 with dropping is not compared.)"""
    tokens = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ("recipe", "deepspeed"):
        model = build(impl, moe_gate_k=k, moe_capacity_factor=cf, moe_eval_capacity_factor=cf, moe_drop_tokens=drop)
        getattr(model, mode)()
        out = model(tokens, tokens)
        (out.lm_loss + 0.01 * out.moe_loss).backward()
        results[impl] = out, per_expert_grads(model), model.state_dict()
    (ours, ours_grads, ours_state), (theirs, their_grads, their_state) = results["recipe"], results["deepspeed"]
    assert ours_state.keys() == their_state.keys()
    assert all(torch.equal(ours_state[key], their_state[key]) for key in ours_state)  # same init
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.lm_loss, ours.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs.moe_loss, ours.moe_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack(theirs.moe_layer_losses), torch.stack(ours.moe_layer_losses))
    assert their_grads.keys() == ours_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(their_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_deepspeed_impl_model_shape():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from recipe.model.moe import DeepSpeedBaselineMoE, MoE

    ours, theirs = build("recipe"), build("deepspeed", moe_num_shared_experts=1)
    assert ours.reports_routing and not theirs.reports_routing
    assert len(theirs.moe_layers()) == 2
    for layer in theirs.moe_layers():  # DeepSpeed's layer itself (the engine's MoE), not ours
        assert isinstance(layer, DeepSpeedBaselineMoE) and isinstance(layer, DeepSpeedMoE)
        assert not isinstance(layer, MoE)
    out = theirs(torch.zeros(1, 8, dtype=torch.long))
    assert out.routing == [] and len(out.moe_layer_losses) == 2 and out.z_loss.item() == 0.0
    with pytest.raises(ValueError, match="token_mask"):
        theirs(torch.zeros(1, 8, dtype=torch.long), token_mask=torch.ones(1, 8, dtype=torch.bool))


@pytest.mark.parametrize("changes,match", [
    (dict(moe_impl="megablocks"), "moe_impl"),
    (dict(moe_expert="gelu_mlp"), "moe_expert"),
    (dict(moe_gate="softmax_after_topk"), "moe_gate"),
    (dict(moe_noisy_gate_policy="Jitter"), "top-2 gate ignores"),
    (dict(moe_use_rts=True), "top-2 gate ignores"),
    (dict(moe_balance_over_data_parallel=True), "per rank"),
])
def test_settings_deepspeed_cannot_express_are_refused(changes, match):
    model = {**MODEL, "moe_impl": "deepspeed", **changes}
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": model, "data": {"seq_len": 16}})


def test_deepspeed_impl_refuses_z_loss_and_allows_top1_noise():
    with pytest.raises(ConfigError, match="z-loss"):
        config_from_dict({"model": {**MODEL, "moe_impl": "deepspeed"}, "loss": {"router_z_loss_coeff": 0.01},
                          "data": {"seq_len": 16}})
    config = config_from_dict({"model": {**MODEL, "moe_impl": "deepspeed", "moe_gate_k": 1, "moe_use_rts": True,
                                         "moe_noisy_gate_policy": "RSample"}, "data": {"seq_len": 16}})
    assert config.model.moe_impl == "deepspeed"


@pytest.mark.multirank
def test_deepspeed_impl_trains_on_two_ranks_with_expert_parallelism(tiny_data, tmp_path):
    """2 ranks, EP=2, ZeRO-2 fp32 (the default JSON), no token dropping: DeepSpeed's layer trains, its
    loss falls, and every step's losses equal our layer's; eval, checkpoint (one file per expert) and
    one-process loading work; no routing telemetry is logged for it."""
    from recipe.generate import load_model

    ds = write_ds_config(tmp_path / "ds.json", base="zero2_fp32_ep2.json")
    records = {}
    for impl in ("recipe", "deepspeed"):
        config = write_config(tmp_path / f"{impl}.py", tiny_data,
                              model=dict(moe_impl=impl, moe_drop_tokens=False, moe_balance_over_data_parallel=False),
                              train=dict(steps=6, eval_every=6, save_every=6))
        launch(2, config, ds, tmp_path / impl)
        records[impl] = read_metrics(tmp_path / impl)
    (ours, ours_eval), (theirs, their_eval) = records["recipe"], records["deepspeed"]
    assert [r["step"] for r in theirs] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in theirs)
    assert theirs[-1]["lm_loss"] < theirs[0]["lm_loss"]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "lm_loss", "moe_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert their_eval[-1]["val_loss"] == pytest.approx(ours_eval[-1]["val_loss"], rel=1e-4)
    assert "moe" not in theirs[0] and "heatmap" not in their_eval[-1] and "moe" in ours[0]
    assert not list((tmp_path / "deepspeed").glob("expert_load_step*.png"))
    tag_dir = tmp_path / "deepspeed" / "checkpoints" / "step00000006"
    assert len(list(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 2 * 4
    model, config = load_model(tmp_path / "deepspeed")
    assert config.model.moe_impl == "deepspeed"
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long)).logits).all()
