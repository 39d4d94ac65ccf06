"""GShard gating against a slow reference written with plain Python loops over tokens."""
import math

import pytest
import torch

from recipe.model.moe import assign_capacity, expert_capacity, get_gate, top_k_gating


def reference_gating(logits, k, capacity_factor, min_capacity, drop_tokens, mask=None):
    """Token-by-token GShard gating; independent of the implementation (no sorting, no vector tricks)."""
    num_tokens, num_experts = logits.shape
    gates = torch.softmax(logits.double(), dim=-1).tolist()
    routed = [s for s in range(num_tokens) if mask is None or bool(mask[s])]
    n = len(routed)
    choices = {}
    for s in routed:
        row = gates[s]
        first = max(range(num_experts), key=lambda e: (row[e], -e))
        picks = [first]
        if k == 2:
            picks.append(max((e for e in range(num_experts) if e != first), key=lambda e: (row[e], -e)))
        choices[s] = picks
    if drop_tokens:
        capacity = min(max(math.ceil(k * n / num_experts * capacity_factor), min_capacity), n)
    else:
        capacity = max([sum(1 for s in routed for e in choices[s] if e == x) for x in range(num_experts)] + [0])
    load = [0] * num_experts
    kept = [[False] * k for _ in range(num_tokens)]
    for j in range(k):  # all first choices before any second choice
        for s in routed:  # token order
            e = choices[s][j]
            if load[e] < capacity:
                kept[s][j] = True
                load[e] += 1
    weights = [[0.0] * k for _ in range(num_tokens)]
    for s in routed:
        g = [gates[s][choices[s][j]] if kept[s][j] else 0.0 for j in range(k)]
        if k == 1:
            weights[s] = g
        else:
            total = sum(g)
            weights[s] = [x / total if total > 0 else 0.0 for x in g]
    me = [sum(gates[s][e] for s in routed) / max(n, 1) for e in range(num_experts)]
    ce = [sum(1 for s in routed if choices[s][0] == e) / max(n, 1) for e in range(num_experts)]
    l_aux = num_experts * sum(a * b for a, b in zip(me, ce))
    return dict(choices=choices, kept=kept, weights=weights, load=load, capacity=capacity, l_aux=l_aux)


CASES = [
    # (S, E, k, cf, min_capacity, drop_tokens)
    (64, 8, 1, 1.0, 4, True),
    (64, 8, 1, 0.5, 1, True),
    (64, 8, 2, 1.0, 4, True),
    (64, 8, 2, 1.25, 4, True),
    (64, 8, 2, 0.3, 2, True),
    (37, 5, 2, 2.0, 4, True),
    (50, 4, 1, 1.0, 30, True),  # min_capacity dominates
    (64, 8, 1, 1.0, 4, False),
    (64, 8, 2, 1.0, 4, False),
    (3, 8, 2, 1.0, 4, True),  # S < E, capacity capped at S
]


@pytest.mark.parametrize("S,E,k,cf,min_cap,drop", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_gating_matches_reference(S, E, k, cf, min_cap, drop, masked):
    gen = torch.Generator().manual_seed(S * 100 + E * 10 + k)
    # A skew towards expert 0 forces overflow and drops.
    logits = torch.randn(S, E, generator=gen) + torch.linspace(1.5, 0, E)
    mask = (torch.rand(S, generator=gen) > 0.3) if masked else None
    out = top_k_gating(logits, k, capacity_factor=cf, min_capacity=min_cap, drop_tokens=drop, token_mask=mask)
    ref = reference_gating(logits, k, cf, min_cap, drop, mask)

    assert out.capacity == ref["capacity"]
    for s in range(S):
        if s in ref["choices"]:
            assert out.expert_index[s].tolist() == ref["choices"][s]
        assert out.kept[s].tolist() == ref["kept"][s]
        torch.testing.assert_close(out.combine_weight[s].double(), torch.tensor(ref["weights"][s], dtype=torch.double),
                                   rtol=1e-5, atol=1e-6)
    assert out.tokens_per_expert.tolist() == ref["load"]
    assert out.l_aux.item() == pytest.approx(ref["l_aux"], rel=1e-5)
    # sorted_pairs: exactly the kept pairs, grouped by expert.
    kept_ids = set(torch.nonzero(out.kept.reshape(-1)).flatten().tolist())
    assert set(out.sorted_pairs.tolist()) == kept_ids and len(kept_ids) == out.sorted_pairs.numel()
    experts_in_order = out.expert_index.reshape(-1)[out.sorted_pairs]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])
    if not drop:
        assert out.kept.sum().item() == k * (S if mask is None else int(mask.sum()))


def test_l_aux_is_one_at_perfect_balance():
    # Every token splits its probability evenly and first choices cycle over the experts.
    num_experts, num_tokens = 4, 32
    logits = torch.zeros(num_tokens, num_experts)
    logits[torch.arange(num_tokens), torch.arange(num_tokens) % num_experts] = 1e-4
    out = top_k_gating(logits, 1)
    assert out.l_aux.item() == pytest.approx(1.0, rel=1e-3)


def test_l_aux_formula_and_gradient():
    logits = torch.randn(20, 6, requires_grad=True)
    out = top_k_gating(logits, 2, drop_tokens=False)
    gates = torch.softmax(logits, dim=-1)
    ce = torch.bincount(gates.argmax(-1), minlength=6).float() / 20
    expected = 6 * (gates.mean(0) * ce).sum()
    torch.testing.assert_close(out.l_aux, expected)
    out.l_aux.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_padding_does_not_count_in_l_aux_or_capacity():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 4, generator=gen)
    mask = torch.zeros(30, dtype=torch.bool)
    mask[:12] = True
    masked = top_k_gating(logits, 2, capacity_factor=1.0, token_mask=mask)
    alone = top_k_gating(logits[:12], 2, capacity_factor=1.0)
    assert masked.capacity == alone.capacity
    torch.testing.assert_close(masked.l_aux, alone.l_aux)
    assert not masked.kept[12:].any() and torch.all(masked.combine_weight[12:] == 0)
    torch.testing.assert_close(masked.combine_weight[:12], alone.combine_weight)
    assert masked.num_tokens == 12


def test_top1_weight_is_raw_probability_and_top2_renormalised():
    logits = torch.randn(16, 4)
    gates = torch.softmax(logits, -1)
    top1 = top_k_gating(logits, 1, drop_tokens=False)
    torch.testing.assert_close(top1.combine_weight[:, 0], gates.max(-1).values)
    top2 = top_k_gating(logits, 2, drop_tokens=False)
    torch.testing.assert_close(top2.combine_weight.sum(-1), torch.ones(16))


def test_lone_survivor_gets_weight_one_and_double_drop_zero():
    # All tokens want expert 0 first and expert 1 second; capacity 2 keeps tokens 0,1 on expert 0
    # and tokens 0,1 on expert 1 (second choices queue after first choices).
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(6, 1)
    out = top_k_gating(logits, 2, capacity_factor=0.01, min_capacity=2)
    assert out.capacity == 2
    assert out.kept[:2].all() and not out.kept[2:].any()
    # Now make the second choices of tokens 2,3 go to an empty expert: they survive alone.
    logits[2:4, 2] = 4.5
    out = top_k_gating(logits, 2, capacity_factor=0.01, min_capacity=2)
    torch.testing.assert_close(out.combine_weight[2:4], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(out.combine_weight[4:], torch.zeros(2, 2))


def test_every_token_to_one_expert_and_capacity_bounds():
    logits = torch.zeros(10, 4)
    logits[:, 2] = 10
    out = top_k_gating(logits, 1, capacity_factor=1.0, min_capacity=1)
    assert out.capacity == math.ceil(10 / 4)
    assert out.tokens_per_expert.tolist() == [0, 0, 3, 0]
    assert out.kept[:3].all() and not out.kept[3:].any()  # kept in token order
    big = top_k_gating(logits, 1, capacity_factor=100.0)
    assert big.capacity == 10  # capped at S


def test_rts_keeps_a_random_subset_of_the_right_size():
    logits = torch.zeros(40, 2)
    logits[:, 0] = 10
    torch.manual_seed(0)
    out = top_k_gating(logits, 1, capacity_factor=1.0, min_capacity=1, use_rts=True)
    assert out.kept.sum().item() == out.capacity == 20
    assert out.kept[:20].sum().item() < 20  # not simply the first 20 tokens


def test_noise_only_in_training():
    logits = torch.randn(64, 8)
    torch.manual_seed(0)
    sampled = top_k_gating(logits, 2, second_expert_policy="sampling", noisy_gate_policy="RSample", training=True)
    plain = top_k_gating(logits, 2, second_expert_policy="sampling", noisy_gate_policy="RSample", training=False)
    assert torch.equal(plain.expert_index, top_k_gating(logits, 2).expert_index)
    assert not torch.equal(sampled.expert_index, plain.expert_index)
    assert torch.all(sampled.expert_index[:, 0] != sampled.expert_index[:, 1])


def test_bf16_logits_are_routed_in_fp32():
    logits = torch.randn(32, 4).bfloat16()
    out = top_k_gating(logits, 2)
    assert out.combine_weight.dtype == torch.float32 and out.l_aux.dtype == torch.float32


def test_z_loss():
    logits = torch.randn(8, 4)
    out = top_k_gating(logits, 1)
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits, -1).square().mean())


def test_zero_tokens():
    out = top_k_gating(torch.zeros(0, 4), 2)
    assert out.capacity == 0 and out.sorted_pairs.numel() == 0 and out.l_aux.item() == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k"),  # k=3 of 4 experts is valid since general top-k (issue 12)
        (dict(k=2, capacity_factor=0.0), "capacity_factor"),
        (dict(k=1, capacity_factor=-1.0), "capacity_factor"),
        (dict(k=1, noisy_gate_policy="Gaussian"), "noisy_gate_policy"),
        (dict(k=2, second_expert_policy="random"), "second_expert_policy"),
        (dict(k=1, min_capacity=-1), "min_capacity"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        top_k_gating(torch.randn(8, 4), **kwargs)


def test_k_larger_than_experts_rejected():
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        top_k_gating(torch.randn(8, 1), 2)


def test_expert_capacity_formula():
    assert expert_capacity(4096, 8, 2, 1.25, 4) == math.ceil(2 * 4096 / 8 * 1.25)
    assert expert_capacity(10, 8, 1, 1.0, 4) == 4
    assert expert_capacity(3, 8, 1, 1.0, 4) == 3


def test_assign_capacity_counts():
    expert_index = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    kept, sorted_pairs, per_expert, capacity = assign_capacity(expert_index, 3, capacity=2)
    # expert 0: first choices of tokens 0,1 win over token 2's first choice and token 3's second;
    # expert 1: token 3's first choice goes before the second choices of tokens 0 and 2.
    assert kept.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert per_expert.tolist() == [2, 2, 1] and capacity == 2
    assert sorted_pairs.tolist() == [0, 2, 6, 1, 3]


def test_layer_path_is_the_same_math_without_checks_or_l_aux():
    """``get_gate("gshard")``, the MoE layer's per-forward path, gives top_k_gating's results bit for bit and
    leaves l_aux to the layer; it does not re-check the options."""
    gshard = get_gate("gshard")
    logits = torch.randn(40, 6)
    mask = torch.rand(40) > 0.2
    for k, kwargs in ((1, dict(noisy_gate_policy="RSample", use_rts=True)), (2, dict(second_expert_policy="sampling"))):
        torch.manual_seed(0)
        checked = top_k_gating(logits, k, capacity_factor=0.8, token_mask=mask, **kwargs)
        torch.manual_seed(0)
        unchecked = gshard(logits, k, capacity_factor=0.8, token_mask=mask, **kwargs)
        assert unchecked.l_aux is None and checked.l_aux is not None
        for name in ("expert_index", "combine_weight", "kept", "tokens_per_expert", "sorted_pairs", "z_loss",
                     "gate_prob_mean", "first_choice_count", "router_entropy"):
            assert torch.equal(getattr(checked, name), getattr(unchecked, name)), name
        assert (checked.capacity, checked.num_tokens) == (unchecked.capacity, unchecked.num_tokens)


def test_token_mask_of_the_wrong_shape_rejected():
    with pytest.raises(ValueError, match=r"token_mask must have shape \(8,\)"):
        top_k_gating(torch.randn(8, 4), 1, token_mask=torch.ones(1, dtype=torch.bool))
