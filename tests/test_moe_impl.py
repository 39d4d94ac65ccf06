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


def per_expert_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------- the layer alone: k >= 3 and fine-grained experts


def deepspeed_layer(hidden: int, ffn: int, experts: int, k: int, cf: float = 1.25, drop: bool = True):
    from recipe.model.moe import DeepSpeedBaselineMoE

    return DeepSpeedBaselineMoE(hidden, ffn, num_experts=experts, ep_size=1, k=k, capacity_factor=cf,
                                eval_capacity_factor=cf, min_capacity=4, noisy_gate_policy=None, drop_tokens=drop,
                                use_rts=False, top2_2nd_expert_sampling=False)


def layer_grads(layer: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input and parameter gradients under state-dict names (stacked expert grads cut per expert)."""
    return {"input": x.grad, **per_expert_grads(layer)}


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    torch.autograd.backward((out.output, out.l_aux), (g, torch.tensor(0.1)))
    return out, layer_grads(layer, x)


@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize("drop", [True, False])
def test_deepspeed_layer_runs_at_k_above_two(k, drop):
    """k >= 3 goes through DeepSpeed's own topkgating; the baseline returns our MoEOutput."""
    from recipe.model.moe.layer import MoEOutput

    layer = deepspeed_layer(32, 16, 16, k, drop=drop)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    assert isinstance(out, MoEOutput) and out.output.shape == x.shape and out.stats is None
    assert out.l_aux.dtype == torch.float32 and out.l_aux.item() > 0 and out.z_loss.item() == 0.0
    out.output.sum().backward()
    assert layer.deepspeed_moe.gate.wg.weight.grad is not None
    with pytest.raises(ValueError, match="k must be in"):
        deepspeed_layer(32, 16, 4, 5)


@pytest.mark.parametrize("experts", [16, 64])
@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize("drop", [True, False], ids=["cf1.25", "dropless"])
def test_deepspeed_topk_gate_computes_what_ours_computes(k, experts, drop):
    """Ours with DeepSpeed's k >= 3 semantics (capacity_priority='probs', balance_loss='switch', per-rank
    loss) against DeepSpeed's layer with the same weights, fp32, continuous inputs (no gate ties): same
    output, l_aux, and gradients of input, router and every expert; with dropping (cf=1.25, some experts
    overflow) and without."""
    from recipe.model.moe import MoE

    hidden, ffn, cf = 32, 16, 1.25
    torch.manual_seed(0)
    ours = MoE(hidden, experts, k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=drop,
               intermediate_size=ffn, capacity_priority="probs", balance_loss="switch",
               balance_over_data_parallel=False)
    theirs = deepspeed_layer(hidden, ffn, experts, k, cf=cf, drop=drop)
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    # A direction shared by all tokens skews the routing, so that at cf=1.25 some experts overflow.
    x = torch.randn(2, 96, hidden, generator=gen) + torch.randn(hidden, generator=gen)
    g = torch.randn(2, 96, hidden, generator=gen)
    (out_ours, grads_ours), (out_theirs, grads_theirs) = forward_backward(ours, x, g), forward_backward(theirs, x, g)
    if drop:
        assert out_ours.stats.num_pairs_kept < x.shape[0] * x.shape[1] * k  # the capacity cut did bite
    torch.testing.assert_close(out_theirs.output, out_ours.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_theirs.l_aux, out_ours.l_aux, rtol=1e-5, atol=1e-5)
    assert grads_theirs.keys() == grads_ours.keys()
    for name, grad in grads_ours.items():
        torch.testing.assert_close(grads_theirs[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def _counts_with_empty_experts(rows: int, experts: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, experts, (rows,), generator=gen)
    choice[choice % 7 == 3] = 0  # every expert e with e % 7 == 3 gets no rows
    return torch.bincount(choice, minlength=experts)


@pytest.mark.skipif(not __import__("recipe.model.moe.experts", fromlist=["x"]).grouped_mm_works(
    "cpu", torch.float32, 64, 64), reason="torch._grouped_mm does not run on CPU in this torch build")
@pytest.mark.parametrize("indexed", [False, True], ids=["blocks", "indexed"])
def test_finegrained_experts_grouped_mm_matches_loop(indexed):
    """E=256 experts of width F=64 (some without rows): torch._grouped_mm and the fused per-expert loop give
    the same output and gradients (input, w1, w3, w2, combine weights) in fp32 on CPU."""
    from recipe.model.moe.experts import SwiGLUExperts, run_experts_indexed

    experts_n, hidden, ffn, tokens, k = 256, 64, 64, 192, 8
    counts = _counts_with_empty_experts(tokens * k, experts_n, seed=0)
    assert (counts == 0).any()
    gen = torch.Generator().manual_seed(2)
    index_N = torch.randint(0, tokens, (tokens * k,), generator=gen)
    weight_N = torch.rand(tokens * k, generator=gen)
    x = torch.randn(tokens if indexed else tokens * k, hidden, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    results = {}
    for grouped in (True, False):
        torch.manual_seed(0)
        experts = SwiGLUExperts(experts_n, hidden, ffn, use_grouped_mm=grouped)
        assert experts._grouped(x) is grouped
        xi, wi = x.clone().requires_grad_(True), weight_N.clone().requires_grad_(True)
        y = run_experts_indexed(experts, xi, counts, index_N, wi) if indexed else experts(xi, counts)
        y.backward(g)
        results[grouped] = [y, xi.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad] + ([wi.grad] if indexed else [])
    for name, a, b in zip(["output", "input", "w1", "w3", "w2", "weight"], results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def per_token_reference(layer, x_SM: torch.Tensor, k: int) -> torch.Tensor:
    """The dropless MoE written token by token: softmax over E, top k, weights renormalised over the k,
    ``Σ_j w_j · SwiGLU_{e_j}(x)``; no dispatch, no capacity."""
    experts = layer.deepspeed_moe.experts
    probs = torch.softmax(x_SM @ layer.deepspeed_moe.gate.wg.weight.t(), dim=-1)
    top_p, top_e = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True)
    rows = []
    for s in range(x_SM.shape[0]):
        e, x_M = top_e[s], x_SM[s]
        h_kF = torch.nn.functional.silu(experts.w1[e] @ x_M) * (experts.w3[e] @ x_M)
        y_kM = torch.einsum("kmf,kf->km", experts.w2[e], h_kF)
        rows.append(weights[s] @ y_kM)
    return torch.stack(rows)


@pytest.mark.parametrize("k", [2, 8])
def test_finegrained_dropless_layer_matches_per_token_loop(k):
    """E=256 experts of width 64, dropless (drop_tokens=False), through the whole layer (router, gating, index
    dispatch, fused experts, combine): output and gradients (input, router, experts) equal the per-token loop."""
    from recipe.model.moe import MoE

    experts_n, hidden, ffn, tokens = 256, 64, 64, 96
    torch.manual_seed(0)
    layer = MoE(hidden, experts_n, k=k, drop_tokens=False, intermediate_size=ffn, balance_over_data_parallel=False)
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(tokens, hidden, generator=gen), torch.randn(tokens, hidden, generator=gen)
    params = [x.requires_grad_(True), layer.deepspeed_moe.gate.wg.weight, *layer.deepspeed_moe.experts.parameters()]
    out = layer(x)
    assert out.stats.num_pairs_kept == tokens * k
    ours = torch.autograd.grad(out.output, params, g)
    reference = per_token_reference(layer, x, k)
    theirs = torch.autograd.grad(reference, params, g)
    torch.testing.assert_close(out.output, reference, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["input", "router", "w1", "w3", "w2"], ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
