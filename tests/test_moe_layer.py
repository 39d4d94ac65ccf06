"""The MoE layer against a loop-over-experts reference that can be checked by eye."""
import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from recipe.model.moe import (MoE, MoEBase, ModuleListExperts, ShardedMoE, SwiGLU, SwiGLUExperts, register_expert,
                              register_gate, top_k_gating)
from recipe.model.moe import gating, layer
from recipe.model.moe.experts import run_experts_indexed


def expert_weights(moe: MoE):
    """Per-expert (w1, w3, w2) tensors, read through the public per-expert state-dict keys."""
    state = moe.state_dict(keep_vars=True)  # keep_vars: slices of the live parameters, so grads flow
    prefix = "deepspeed_moe.experts.deepspeed_experts"
    return [tuple(state[f"{prefix}.{e}.{n}.weight"] for n in ("w1", "w3", "w2")) for e in range(moe.num_local_experts)]


def reference_moe(moe: MoE, x: torch.Tensor, drop_tokens=True, capacity_factor=None):
    """Route with the same gate, then loop over experts and over each token's choices."""
    x_SM = x.reshape(-1, x.shape[-1])
    logits = F.linear(x_SM.float(), moe.deepspeed_moe.gate.wg.weight.float())
    gate = top_k_gating(logits, moe.k, capacity_factor=capacity_factor or moe.capacity_factor,
                        min_capacity=moe.min_capacity, drop_tokens=drop_tokens, training=moe.training)
    weights = [(w1, w3, w2) for w1, w3, w2 in expert_weights(moe)]
    out = torch.zeros_like(x_SM)
    for e, (w1, w3, w2) in enumerate(weights):
        for j in range(moe.k):
            rows = torch.nonzero((gate.expert_index[:, j] == e) & gate.kept[:, j]).flatten()
            if rows.numel() == 0:
                continue
            h = x_SM[rows]
            y = F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)
            out = out.index_add(0, rows, y * gate.combine_weight[rows, j, None].to(y.dtype))
    return out.view_as(x), gate.l_aux


@pytest.mark.parametrize("k,cf,drop", [(1, 1.0, True), (2, 1.25, True), (2, 0.5, True), (1, 1.0, False), (2, 1.0, False)])
@pytest.mark.parametrize("grouped", [True, False])
def test_forward_and_gradients_match_reference(k, cf, drop, grouped):
    torch.manual_seed(0)
    moe = MoE(32, 8, k=k, capacity_factor=cf, drop_tokens=drop, intermediate_size=48, balance_over_data_parallel=False)
    moe.deepspeed_moe.experts.use_grouped_mm = grouped
    ref_moe = MoE(32, 8, k=k, capacity_factor=cf, drop_tokens=drop, intermediate_size=48, balance_over_data_parallel=False)
    ref_moe.load_state_dict(moe.state_dict())
    x = torch.randn(3, 20, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(3, 20, 32)

    out = moe(x1)
    ref_out, ref_l_aux = reference_moe(ref_moe, x2, drop_tokens=drop, capacity_factor=cf)
    torch.testing.assert_close(out.output, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.l_aux, ref_l_aux)

    ((out.output * grad_out).sum() + 0.1 * out.l_aux).backward()
    ((ref_out * grad_out).sum() + 0.1 * ref_l_aux).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    ref_params = dict(ref_moe.named_parameters())
    for name, param in moe.named_parameters():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_mm_equals_loop_on_uneven_blocks():
    torch.manual_seed(1)
    experts = SwiGLUExperts(4, 16, 32)
    x = torch.randn(23, 16)
    counts = torch.tensor([0, 11, 2, 10])
    experts.use_grouped_mm = True
    a = experts(x, counts)
    experts.use_grouped_mm = False
    b = experts(x, counts)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def indexed_reference(experts: SwiGLUExperts, x, counts, index, weight):
    """``run_experts_indexed`` spelled out: one row at a time through its expert, weighted, added back."""
    out = torch.zeros_like(x)
    expert_of_position = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for i, (row, e) in enumerate(zip(index.tolist(), expert_of_position.tolist())):
        w1, w3, w2 = experts.w1[e], experts.w3[e], experts.w2[e]
        y = F.linear(F.silu(F.linear(x[row], w1)) * F.linear(x[row], w3), w2)
        out = out.index_add(0, torch.tensor([row]), (y if weight is None else y * weight[i]).unsqueeze(0))
    return out


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("grouped", [True, False])
def test_indexed_experts_match_row_by_row_reference(weighted, grouped):
    """The fused gather -> experts -> weighted scatter-add (loop path) and the generic one (grouped path)
    against a row-by-row reference: repeated rows (top-2), rows never picked, an expert with no rows."""
    torch.manual_seed(5)
    experts = SwiGLUExperts(4, 16, 24, use_grouped_mm=grouped)
    ref_experts = SwiGLUExperts(4, 16, 24)
    ref_experts.load_state_dict(experts.state_dict())
    counts = [5, 0, 7, 3]
    index = torch.tensor([0, 3, 3, 9, 1, 2, 0, 5, 5, 8, 6, 4, 1, 7, 2])  # row 10 and 11 never picked
    weight = torch.rand(15) if weighted else None
    x = torch.randn(12, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1 = weight.clone().requires_grad_() if weighted else None
    w2 = weight.clone().requires_grad_() if weighted else None
    grad = torch.randn(12, 16)

    out = run_experts_indexed(experts, x1, torch.tensor(counts), index, w1)
    ref = indexed_reference(ref_experts, x2, counts, index, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out[10:] == 0)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    if weighted:
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(experts, name).grad, getattr(ref_experts, name).grad, rtol=1e-5,
                                   atol=1e-6, msg=name)
    assert torch.all(experts.w1.grad[1] == 0)  # the expert without rows


def test_indexed_experts_without_input_gradient_and_in_bf16():
    """Only parameter gradients wanted (frozen input), and bf16: the fused loop equals the generic path."""
    torch.manual_seed(6)
    fused = SwiGLUExperts(3, 16, 32, use_grouped_mm=False).to(torch.bfloat16)
    generic = ModuleListExperts(SwiGLU, 3, 16, 32).to(torch.bfloat16)
    generic.load_state_dict(fused.state_dict())
    counts, index = torch.tensor([4, 2, 3]), torch.tensor([0, 1, 2, 3, 0, 4, 5, 5, 1])
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    weight = torch.rand(9, dtype=torch.bfloat16)
    grad = torch.randn(6, 16, dtype=torch.bfloat16)
    out = run_experts_indexed(fused, x, counts, index, weight)
    ref = run_experts_indexed(generic, x, counts, index, weight)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    (out.float() * grad).sum().backward()
    (ref.float() * grad).sum().backward()
    for e in range(3):
        for name in ("w1", "w3", "w2"):
            torch.testing.assert_close(getattr(fused, name).grad[e],
                                       getattr(generic.deepspeed_experts[e], name).weight.grad,
                                       rtol=2e-2, atol=2e-2, msg=f"{name}[{e}]")


def test_padding_mask_zeroes_output_and_is_ignored():
    torch.manual_seed(2)
    moe = MoE(16, 4, k=2, intermediate_size=32, drop_tokens=False)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    out = moe(x, token_mask=mask)
    assert torch.all(out.output[~mask] == 0)
    alone = moe(x[:, :7].reshape(1, 14, 16))
    torch.testing.assert_close(out.output[mask], alone.output.reshape(14, 16))
    torch.testing.assert_close(out.l_aux, alone.l_aux)


def test_stats_report_drops_and_loads():
    torch.manual_seed(3)
    moe = MoE(16, 4, k=1, capacity_factor=0.5, min_capacity=1, intermediate_size=32)
    out = moe(torch.randn(64, 16))
    assert out.stats.tokens_per_expert.sum().item() == out.stats.num_pairs_kept
    assert out.stats.capacity == 8
    assert 0.0 < out.stats.drop_fraction <= 0.5 + 1e-9
    assert out.stats.tokens_per_expert.max().item() <= 8


@pytest.mark.parametrize("S", [1, 3])
def test_fewer_tokens_than_experts(S):
    moe = MoE(8, 16, k=2, intermediate_size=16)
    out = moe(torch.randn(S, 8, requires_grad=True))
    out.output.sum().backward()
    assert out.output.shape == (S, 8)


def test_all_tokens_to_one_expert_leaves_others_empty():
    moe = MoE(8, 4, k=1, intermediate_size=16, drop_tokens=False)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.zero_()
        moe.deepspeed_moe.gate.wg.weight[2] = 1.0
    x = torch.rand(12, 8) + 0.1  # positive inputs: expert 2 wins everywhere
    out = moe(x)
    assert out.stats.tokens_per_expert.tolist() == [0, 0, 12, 0]
    ref, _ = reference_moe(moe, x, drop_tokens=False)
    torch.testing.assert_close(out.output, ref)


def test_bf16_activations_with_fp32_router():
    torch.manual_seed(4)
    moe = MoE(16, 4, k=2, intermediate_size=32).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    out = moe(x)
    assert out.output.dtype == torch.bfloat16 and out.l_aux.dtype == torch.float32
    out.output.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_recognised_by_deepspeed_and_params_tagged():
    moe = MoE(16, 4, k=1, intermediate_size=32, ep_size=2)
    assert isinstance(moe, DeepSpeedMoE)
    assert moe.num_local_experts == 2 and moe.expert_group_name == "ep_size_2"
    expert_params = list(moe.deepspeed_moe.experts.parameters())
    assert expert_params and all(p.allreduce is False and p.group_name == "ep_size_2" for p in expert_params)
    assert not hasattr(moe.deepspeed_moe.gate.wg.weight, "allreduce")
    with pytest.raises(RuntimeError, match="expert-parallel group"):
        moe(torch.randn(4, 16))


def test_zero3_layer_is_invisible_to_deepspeeds_moe_check_and_its_experts_carry_placement_tags():
    """ShardedMoE: the same layer (state dict, output) without DeepSpeed's MoE base (the engine refuses ZeRO-3 for
    that class), its experts tagged for ZeRO-3's per-parameter placement, the router left to the default."""
    torch.manual_seed(0)
    plain = MoE(16, 4, k=2, intermediate_size=24)
    sharded = ShardedMoE(16, 4, k=2, intermediate_size=24)
    assert isinstance(sharded, MoEBase) and not isinstance(sharded, DeepSpeedMoE)
    experts = list(sharded.deepspeed_moe.experts.parameters())
    assert all(p.ds_zero_placement_family == "autoep_expert" and p.ds_zero_partition_group_name == "ep_size_1"
               and p.allreduce is False for p in experts)
    assert not hasattr(sharded.deepspeed_moe.gate.wg.weight, "ds_zero_placement_family")
    assert not hasattr(plain.deepspeed_moe.experts.w1, "ds_zero_placement_family")
    sharded.load_state_dict(plain.state_dict())
    assert sharded.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(10, 16)
    assert torch.equal(sharded(x).output, plain(x).output)


def test_zero3_layer_refuses_experts_partitioned_before_it_could_tag_them(monkeypatch):
    """Built inside deepspeed.zero.Init, each expert is converted (partitioned over all ranks) when its own module
    is built, before ShardedMoE's tags could choose its group: refused."""
    build = layer.build_experts

    def converted(*args):
        experts = build(*args)
        for p in experts.parameters():
            p.ds_id = 0  # what zero.Init gives every parameter it converts
        return experts

    monkeypatch.setattr(layer, "build_experts", converted)
    with pytest.raises(RuntimeError, match="built inside deepspeed.zero.Init"):
        ShardedMoE(16, 4, k=2, intermediate_size=24)
    MoE(16, 4, k=2, intermediate_size=24)  # the ZeRO 0-2 layer has no tags to place


def test_state_dict_keeps_a_zero3_placeholder_stacked():
    """Outside a gather a ZeRO-3 parameter is an empty placeholder: the state dict keeps its stacked key (what the
    engine's own model-states file holds) instead of failing to slice it; gathered, it shows per-expert keys."""
    moe = MoE(16, 4, k=2, intermediate_size=24)
    w1 = moe.deepspeed_moe.experts.w1
    w1.ds_numel = w1.numel()
    assert "deepspeed_moe.experts.deepspeed_experts.0.w1.weight" in moe.state_dict()  # gathered: full size
    w1.data = torch.empty(0)
    state = moe.state_dict()
    assert state["deepspeed_moe.experts.w1"].numel() == 0
    assert "deepspeed_moe.experts.deepspeed_experts.0.w3.weight" in state  # the others as before


def test_state_dict_is_per_expert_and_round_trips():
    moe = MoE(16, 4, k=2, intermediate_size=24)
    state = moe.state_dict()
    assert sorted(k for k in state if "experts" in k)[:3] == [
        "deepspeed_moe.experts.deepspeed_experts.0.w1.weight",
        "deepspeed_moe.experts.deepspeed_experts.0.w2.weight",
        "deepspeed_moe.experts.deepspeed_experts.0.w3.weight",
    ]
    assert state["deepspeed_moe.experts.deepspeed_experts.3.w2.weight"].shape == (16, 24)
    other = MoE(16, 4, k=2, intermediate_size=24)
    other.load_state_dict(state)
    for a, b in zip(moe.parameters(), other.parameters()):
        assert torch.equal(a, b)
    # The generic module-list path reads the same checkpoint.
    generic = MoE(16, 4, k=2, intermediate_size=24, expert="swiglu_modules")
    generic.load_state_dict(state)
    x = torch.randn(10, 16)
    torch.testing.assert_close(generic(x).output, moe(x).output)
    bad = {k: v for k, v in state.items() if ".3.w1" not in k}
    with pytest.raises(RuntimeError, match="incomplete"):
        other.load_state_dict(bad)


@register_expert("swiglu_modules")
def _swiglu_modules(hidden_size, intermediate_size):
    from recipe.model.moe import SwiGLU

    return SwiGLU(hidden_size, intermediate_size)


@register_expert("gelu_mlp_test")
class GeluMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


@register_gate("softmax_after_topk_test")
def softmax_after_topk(logits, k, **kwargs):
    """Mixtral-style: choose the top-k logits, softmax over the chosen ones only."""
    out = top_k_gating(logits, k, **kwargs)
    chosen = logits.float().gather(1, out.expert_index)
    out.combine_weight = torch.softmax(chosen, dim=-1) * out.kept
    return out


def test_user_expert_and_gate_from_registry():
    torch.manual_seed(5)
    moe = MoE(16, 4, k=2, intermediate_size=32, expert="gelu_mlp_test", gate="softmax_after_topk_test",
              drop_tokens=False)
    x = torch.randn(10, 16, requires_grad=True)
    out = moe(x)
    out.output.sum().backward()
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    for e, n in enumerate(out.stats.tokens_per_expert.tolist()):
        if n > 0:
            assert all(p.grad is not None for p in experts[e].parameters())
    # Check against a direct evaluation.
    logits = moe.deepspeed_moe.gate(x.detach())
    choice = logits.topk(2, dim=-1)
    w = torch.softmax(choice.values, dim=-1)
    expected = sum(w[:, j, None] * torch.stack([experts[e](x.detach()[s]) for s, e in enumerate(choice.indices[:, j].tolist())])
                   for j in range(2))
    torch.testing.assert_close(out.output, expected, rtol=1e-5, atol=1e-6)
    assert "deepspeed_moe.experts.deepspeed_experts.0.up.weight" in moe.state_dict()


def test_unknown_registry_names_rejected():
    with pytest.raises(ValueError, match="unknown expert"):
        MoE(16, 4, expert="nope")
    with pytest.raises(ValueError, match="unknown gate"):
        MoE(16, 4, gate="nope")
    with pytest.raises(ValueError, match="multiple of ep_size"):
        MoE(16, 6, ep_size=4)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, 4, capacity_factor=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(noisy_gate_policy="jitter"), "noisy_gate_policy"),
    (dict(k=2, second_expert_policy="random"), "second_expert_policy"),
    (dict(min_capacity=-1), "min_capacity"),
    (dict(eval_capacity_factor=0.0), "eval_capacity_factor"),
])
def test_bad_options_rejected_when_the_layer_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(16, 4, **kwargs)


def _fail_if_called(*args, **kwargs):
    raise AssertionError("forward re-validated the gating options")


def test_forward_does_not_recheck_the_options(monkeypatch):
    """Options are checked once, at construction: forward must not go through the argument checks."""
    moe = MoE(16, 4, k=2, intermediate_size=32, noisy_gate_policy="RSample", second_expert_policy="sampling")
    monkeypatch.setattr(gating, "check_gating_options", _fail_if_called)
    for module in (gating, layer):
        monkeypatch.setattr(module, "check_routing_policies", _fail_if_called)
    monkeypatch.setattr(gating, "check_gating_inputs", _fail_if_called)
    out = moe(torch.randn(2, 5, 16))
    assert out.output.shape == (2, 5, 16)
    with pytest.raises(ValueError, match=r"token_mask must have shape \(10,\)"):  # inputs still are checked
        moe(torch.randn(2, 5, 16), token_mask=torch.ones(1, dtype=torch.bool))


@register_gate("constant_l_aux_test")
def constant_l_aux(logits, k, **kwargs):
    """A user gate that sets its own balancing loss."""
    out = top_k_gating(logits, k, **kwargs)
    out.l_aux = torch.tensor(3.0)
    return out


@pytest.mark.parametrize("balance_over_data_parallel", [False, True])
def test_layer_l_aux_equals_the_gates_and_a_user_gates_own_is_kept_per_rank(balance_over_data_parallel):
    """The layer computes l_aux once: the value top_k_gating reports (one rank: the data-parallel sum is this
    rank's), and per rank a user gate's own GateOutput.l_aux is the layer's."""
    torch.manual_seed(7)
    moe = MoE(16, 4, k=2, intermediate_size=32, balance_over_data_parallel=balance_over_data_parallel)
    x = torch.randn(24, 16)
    ref = top_k_gating(moe.deepspeed_moe.gate(x), 2, capacity_factor=moe.capacity_factor,
                       min_capacity=moe.min_capacity)
    torch.testing.assert_close(moe(x).l_aux, ref.l_aux, rtol=0, atol=1e-7)
    custom = MoE(16, 4, k=2, intermediate_size=32, gate="constant_l_aux_test",
                 balance_over_data_parallel=balance_over_data_parallel)
    custom.load_state_dict(moe.state_dict())
    expected = torch.tensor(3.0) if not balance_over_data_parallel else ref.l_aux
    torch.testing.assert_close(custom(x).l_aux, expected, rtol=0, atol=1e-7)
