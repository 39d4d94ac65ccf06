"""General top-k routing (recipe/model/moe/gating.py options) against slow loop references and DeepSpeed's topkgating.

The reference below is written token by token and pair by pair in float64, without sorting tricks, so each
option's semantics can be checked by eye against the module docstring.
"""
import itertools
import math
from decimal import Decimal

import pytest
import torch
from deepspeed.moe.sharded_moe import topkgating

from recipe.model.moe.gating import (GateOutput, balancing_loss, check_routing_options, expert_capacity, get_gate,
                                     gshard_gating, load_balancing_loss, sequence_balancing_loss, top_k_gating)


def brute_force_capacity(n, num_experts, k, cf, min_capacity):
    """Smallest integer C with C·E·10^d >= k·n·(cf·10^d), cf read as the decimal it prints as; then the bounds."""
    digits = max(0, -Decimal(str(cf)).as_tuple().exponent)
    cf_int = int(Decimal(str(cf)) * 10 ** digits)
    c = 0
    while c * num_experts * 10 ** digits < k * n * cf_int:
        c += 1
    return min(max(c, min_capacity), n)


def reference_routing(logits, k, cf=1.0, min_capacity=4, drop=True, mask=None, score_function="softmax",
                      norm=None, route_scale=1.0, priority="choice", bias=None, groups=1, topk_groups=1,
                      seq_len=None):
    """Token-by-token top-k routing with every option, in float64."""
    num_tokens, num_experts = logits.shape
    x = logits.double()
    g = (torch.softmax(x, -1) if score_function == "softmax" else torch.sigmoid(x)).tolist()
    b = [0.0] * num_experts if bias is None else bias.double().tolist()
    routed = [s for s in range(num_tokens) if mask is None or bool(mask[s])]
    n = len(routed)
    per = num_experts // groups
    choices = {}
    for s in routed:
        biased = [g[s][e] + b[e] for e in range(num_experts)]
        group_score = [sum(sorted(biased[i * per:(i + 1) * per], reverse=True)[:min(2, per)]) for i in range(groups)]
        best_groups = sorted(range(groups), key=lambda i: -group_score[i])[:topk_groups]
        allowed = [e for e in range(num_experts) if e // per in best_groups]
        choices[s] = sorted(allowed, key=lambda e: -biased[e])[:k]
    # The capacity queue: pairs (s, j) in priority order, each takes a slot of its expert if one is left.
    if priority == "choice":
        queue = [(s, j) for j in range(k) for s in routed]
    elif priority == "position":
        queue = [(s, j) for s in routed for j in range(k)]
    else:  # "probs": highest unbiased score first, ties in flat order
        queue = sorted(((s, j) for s in routed for j in range(k)), key=lambda p: (-g[p[0]][choices[p[0]][p[1]]],
                                                                                    p[0] * k + p[1]))
    load_all = [sum(1 for s in routed for e in choices[s] if e == x) for x in range(num_experts)]
    capacity = brute_force_capacity(n, num_experts, k, cf, min_capacity) if drop else max(load_all + [0])
    load = [0] * num_experts
    kept = [[False] * k for _ in range(num_tokens)]
    for s, j in queue:
        e = choices[s][j]
        if load[e] < capacity:
            kept[s][j] = True
            load[e] += 1
    weights = [[0.0] * k for _ in range(num_tokens)]
    for s in routed:
        chosen = [g[s][e] for e in choices[s]]
        if norm is True:
            w = [c / sum(chosen) if kept[s][j] else 0.0 for j, c in enumerate(chosen)]
        else:
            w = [c if kept[s][j] else 0.0 for j, c in enumerate(chosen)]
            if norm is None and k > 1:
                w = [c / sum(w) if sum(w) > 0 else 0.0 for c in w]
        weights[s] = [c * route_scale for c in w]
    dist = [[v / sum(row) for v in row] for row in g]  # g' (softmax rows already sum to 1)
    me = [sum(dist[s][e] for s in routed) / max(n, 1) for e in range(num_experts)]
    first = [sum(1 for s in routed if choices[s][0] == e) for e in range(num_experts)]
    count = [sum(1 for s in routed if e in choices[s]) for e in range(num_experts)]
    gshard = num_experts * sum(me[e] * first[e] / max(n, 1) for e in range(num_experts))
    switch = num_experts / (max(n, 1) * k) * sum(me[e] * count[e] for e in range(num_experts))
    sequence = None
    if seq_len is not None:
        per_seq = []
        for start in range(0, num_tokens, seq_len):
            toks = [s for s in routed if start <= s < start + seq_len]
            if not toks:
                continue
            p = [sum(dist[s][e] for s in toks) / len(toks) for e in range(num_experts)]
            c = [sum(1 for s in toks if e in choices[s]) for e in range(num_experts)]
            per_seq.append(num_experts / k * sum(c[e] / len(toks) * p[e] for e in range(num_experts)))
        sequence = sum(per_seq) / len(per_seq) if per_seq else 0.0
    return dict(choices=choices, kept=kept, weights=weights, load=load, capacity=capacity, me=me, first=first,
                count=count, gshard=gshard, switch=switch, sequence=sequence)


def assert_matches_reference(out: GateOutput, ref, num_tokens):
    assert out.capacity == ref["capacity"]
    for s in range(num_tokens):
        if s in ref["choices"]:
            assert out.expert_index[s].tolist() == ref["choices"][s], s
        assert out.kept[s].tolist() == ref["kept"][s], s
    torch.testing.assert_close(out.combine_weight.double(), torch.tensor(ref["weights"], dtype=torch.double),
                               rtol=1e-5, atol=1e-6)
    assert out.tokens_per_expert.tolist() == ref["load"]
    assert out.first_choice_count.tolist() == ref["first"]
    assert out.choice_count.tolist() == ref["count"]
    torch.testing.assert_close(out.gate_prob_mean.double(), torch.tensor(ref["me"], dtype=torch.double),
                               rtol=1e-5, atol=1e-7)
    kept_ids = set(torch.nonzero(out.kept.reshape(-1)).flatten().tolist())
    assert set(out.sorted_pairs.tolist()) == kept_ids and len(kept_ids) == out.sorted_pairs.numel()
    experts_in_order = out.expert_index.reshape(-1)[out.sorted_pairs]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])


def skewed_logits(num_tokens, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=gen) + torch.linspace(1.5, 0, num_experts)


OPTION_CASES = [
    # (S, E, k, cf, options)
    (64, 8, 3, 1.0, dict()),
    (64, 8, 4, 0.7, dict(capacity_priority="position")),
    (64, 8, 4, 0.7, dict(capacity_priority="probs")),
    (60, 16, 6, 1.1, dict(capacity_priority="probs", norm_topk_prob=True)),
    (48, 8, 2, 0.5, dict(capacity_priority="position", norm_topk_prob=False, route_scale=2.5)),
    (48, 8, 2, 0.5, dict(capacity_priority="probs", norm_topk_prob=True)),
    (40, 8, 1, 0.6, dict(capacity_priority="probs", norm_topk_prob=True)),  # k=1, normalised: weight 1
    (64, 16, 8, 1.0, dict(score_function="sigmoid", norm_topk_prob=True, route_scale=2.5)),
    (64, 16, 4, 0.8, dict(score_function="sigmoid", norm_topk_prob=False, capacity_priority="probs")),
    (64, 16, 4, 1.0, dict(score_function="sigmoid", norm_topk_prob=True, num_expert_groups=4, topk_groups=2)),
    (64, 16, 3, 0.9, dict(num_expert_groups=8, topk_groups=3, capacity_priority="position")),  # 2 experts a group
    (64, 12, 2, 1.0, dict(num_expert_groups=4, topk_groups=1)),  # 3 experts a group, top-2 of them summed
    (64, 8, 3, 1.0, dict(drop=False, norm_topk_prob=True)),
]


@pytest.mark.parametrize("S,E,k,cf,options", OPTION_CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_routing_matches_loop_reference(S, E, k, cf, options, masked, biased):
    options = dict(options)
    drop = options.pop("drop", True)
    seed = S * 1000 + E * 10 + k
    logits = skewed_logits(S, E, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(S, generator=gen) > 0.3) if masked else None
    bias = (torch.rand(E, generator=gen) - 0.5) * 0.2 if biased else None
    out = top_k_gating(logits, k, capacity_factor=cf, min_capacity=2, drop_tokens=drop, token_mask=mask,
                       expert_bias=bias, **options)
    ref = reference_routing(logits, k, cf, 2, drop, mask, options.get("score_function", "softmax"),
                            options.get("norm_topk_prob"), options.get("route_scale", 1.0),
                            options.get("capacity_priority", "choice"), bias, options.get("num_expert_groups", 1),
                            options.get("topk_groups", 1))
    assert_matches_reference(out, ref, S)
    assert out.l_aux.item() == pytest.approx(ref["gshard"], rel=1e-5)
    if mask is not None:
        assert not out.kept[~mask].any() and torch.all(out.combine_weight[~mask] == 0)


def test_reference_cases_drop_and_differ_by_priority():
    """Negative control for the reference test: the cases overflow, and the three priorities keep different pairs
    (else a priority bug could pass unnoticed)."""
    logits = skewed_logits(64, 8, 64 * 1000 + 84)
    kept = {p: top_k_gating(logits, 4, capacity_factor=0.7, min_capacity=2, capacity_priority=p).kept
            for p in ("choice", "position", "probs")}
    assert all(not v.all() for v in kept.values())
    for a, b in itertools.combinations(kept.values(), 2):
        assert not torch.equal(a, b)


@pytest.mark.parametrize("norm", [None, True, False])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_each_normalisation_and_route_scale(norm, score_function):
    logits = skewed_logits(40, 8, 7)
    base = top_k_gating(logits, 3, capacity_factor=0.6, min_capacity=1, score_function=score_function,
                        norm_topk_prob=norm)
    scaled = top_k_gating(logits, 3, capacity_factor=0.6, min_capacity=1, score_function=score_function,
                          norm_topk_prob=norm, route_scale=2.5)
    assert torch.equal(base.kept, scaled.kept) and not base.kept.all()
    torch.testing.assert_close(scaled.combine_weight, 2.5 * base.combine_weight)
    scores = torch.softmax(logits, -1) if score_function == "softmax" else torch.sigmoid(logits)
    chosen = scores.gather(1, base.expert_index)
    survivors = base.kept.any(1)
    if norm is True:  # over all k chosen, dropped pairs then 0: surviving rows sum to < 1 where one was dropped
        expected = chosen / chosen.sum(1, keepdim=True) * base.kept
    elif norm is False:
        expected = chosen * base.kept
    else:  # over the survivors: every row with a survivor sums to 1
        expected = chosen * base.kept / (chosen * base.kept).sum(1, keepdim=True).clamp(min=1e-30)
        torch.testing.assert_close(base.combine_weight.sum(1)[survivors], torch.ones(int(survivors.sum())))
    torch.testing.assert_close(base.combine_weight, expected)


def test_normalisations_differ():
    """Negative control: the three normalisations give different weights on the same routing."""
    logits = skewed_logits(40, 8, 7)
    w = [top_k_gating(logits, 3, capacity_factor=0.6, min_capacity=1, norm_topk_prob=n).combine_weight
         for n in (None, True, False)]
    for a, b in itertools.combinations(w, 2):
        assert not torch.allclose(a, b)


# ---- DeepSpeed's topkgating ------------------------------------------------------------------------------------


def deepspeed_routes(logits, k, cf, drop_tokens, drop_policy, min_capacity=4):
    l_aux, combine, dispatch, exp_counts = topkgating(logits, k, cf, min_capacity, drop_tokens=drop_tokens,
                                                      drop_policy=drop_policy)
    return dict(l_aux=l_aux, kept_SE=dispatch.any(-1), weight_SE=combine.sum(-1), capacity=combine.shape[-1],
                exp_counts=exp_counts)


def ours_dense(out: GateOutput, num_experts):
    num_tokens = out.expert_index.shape[0]
    kept_SE = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, out.expert_index, out.kept)
    weight_SE = torch.zeros(num_tokens, num_experts).scatter_(1, out.expert_index, out.combine_weight)
    return kept_SE, weight_SE


DS_CASES = list(itertools.product([3, 4, 8], [8, 16, 64], [7, 64, 301], [0.5, 1.0, 1.25], ["probs", "position"]))


@pytest.mark.parametrize("k,E,S,cf,policy", DS_CASES)
def test_equals_deepspeed_topkgating(k, E, S, cf, policy):
    if k > E:
        pytest.skip("k > E")
    logits = torch.randn(S, E, generator=torch.Generator().manual_seed(k * 7919 + E * 31 + S))
    ds = deepspeed_routes(logits, k, cf, True, policy)
    out = top_k_gating(logits, k, capacity_factor=cf, min_capacity=4, capacity_priority=policy, balance_loss="switch")
    kept_SE, weight_SE = ours_dense(out, E)
    # DeepSpeed does not cap the capacity at S (an expert cannot receive more than S tokens anyway).
    assert out.capacity == min(ds["capacity"], S) == brute_force_capacity(S, E, k, cf, 4)
    assert torch.equal(kept_SE, ds["kept_SE"])
    torch.testing.assert_close(weight_SE, ds["weight_SE"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.l_aux, ds["l_aux"], rtol=0, atol=1e-6)
    assert out.choice_count.tolist() == ds["exp_counts"].float().tolist()


@pytest.mark.parametrize("k,E,S", [(3, 8, 64), (4, 16, 301), (8, 64, 301), (8, 8, 7)])
def test_equals_deepspeed_topkgating_without_dropping(k, E, S):
    logits = torch.randn(S, E, generator=torch.Generator().manual_seed(S + E + k))
    ds = deepspeed_routes(logits, k, 1.0, False, "probs")
    out = top_k_gating(logits, k, drop_tokens=False, balance_loss="switch")
    kept_SE, weight_SE = ours_dense(out, E)
    assert out.capacity == ds["capacity"] and out.kept.all() and torch.equal(kept_SE, ds["kept_SE"])
    torch.testing.assert_close(weight_SE, ds["weight_SE"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.l_aux, ds["l_aux"], rtol=0, atol=1e-6)


def test_deepspeed_comparison_is_not_vacuous():
    """Negative control: in the DeepSpeed cases tokens are dropped, the two policies keep different sets, and
    our "choice" priority and "gshard" loss would not match DeepSpeed's topkgating."""
    logits = torch.randn(301, 16, generator=torch.Generator().manual_seed(4 * 7919 + 16 * 31 + 301))
    probs, position = (deepspeed_routes(logits, 4, 0.5, True, p)["kept_SE"] for p in ("probs", "position"))
    assert probs.sum() < 4 * 301 and not torch.equal(probs, position)
    choice = top_k_gating(logits, 4, capacity_factor=0.5, min_capacity=4, capacity_priority="choice")
    assert not torch.equal(ours_dense(choice, 16)[0], probs) and not torch.equal(ours_dense(choice, 16)[0], position)
    ds_l_aux = deepspeed_routes(logits, 4, 0.5, True, "probs")["l_aux"]
    assert abs(choice.l_aux.item() - ds_l_aux.item()) > 1e-3


# ---- exact capacity --------------------------------------------------------------------------------------------


def test_capacity_is_exact_for_non_dyadic_factors():
    assert expert_capacity(400, 8, 2, 1.1, 4) == 110 == brute_force_capacity(400, 8, 2, 1.1, 4)
    assert math.ceil(2 * 400 / 8 * 1.1) == 111  # negative control: the float formula used before is one slot off
    assert expert_capacity(100, 8, 3, 0.8, 4) == 30


def test_capacity_matches_integer_brute_force():
    float_differs = 0
    for S, E, k, cf in itertools.product([1, 10, 100, 333, 400, 1000], [3, 5, 8, 12], [1, 2, 3, 6],
                                         [0.1, 0.3, 0.7, 0.8, 1.1, 1.2, 1.3, 1.7, 2.2, 1.25, 1.0]):
        assert expert_capacity(S, E, k, cf, 0) == brute_force_capacity(S, E, k, cf, 0), (S, E, k, cf)
        float_differs += min(math.ceil(k * S / E * cf), S) != brute_force_capacity(S, E, k, cf, 0)
    assert float_differs > 0  # the sweep contains points where float arithmetic rounds wrongly
    assert expert_capacity(10, 8, 1, 1.0, 4) == 4 and expert_capacity(3, 8, 1, 1.0, 4) == 3  # bounds


# ---- bias, groups, sigmoid -------------------------------------------------------------------------------------


@pytest.mark.parametrize("score_function,norm", [("softmax", None), ("softmax", True), ("sigmoid", True),
                                                 ("sigmoid", False)])
def test_bias_changes_the_choice_not_the_weights(score_function, norm):
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(11))
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3])  # favour experts 6 and 7
    kwargs = dict(drop_tokens=False, score_function=score_function, norm_topk_prob=norm)
    plain = top_k_gating(logits, 3, **kwargs)
    biased = top_k_gating(logits, 3, expert_bias=bias, **kwargs)
    assert not torch.equal(plain.expert_index, biased.expert_index)  # the bias does choose
    assert biased.choice_count[6:].sum() > plain.choice_count[6:].sum()
    scores = torch.softmax(logits, -1) if score_function == "softmax" else torch.sigmoid(logits)
    chosen = scores.gather(1, biased.expert_index)  # unbiased scores of the experts the bias chose
    expected = chosen if norm is False else chosen / chosen.sum(1, keepdim=True)
    torch.testing.assert_close(biased.combine_weight, expected)
    # Negative control: weights from the biased scores would differ.
    biased_scores = (scores + bias).gather(1, biased.expert_index)
    assert not torch.allclose(biased.combine_weight, biased_scores if norm is False else
                              biased_scores / biased_scores.sum(1, keepdim=True))
    # gate_prob_mean is the unbiased distribution's.
    torch.testing.assert_close(biased.gate_prob_mean, plain.gate_prob_mean)


def test_zero_bias_chooses_as_no_bias():
    logits = torch.randn(100, 8, generator=torch.Generator().manual_seed(2))
    for k in (1, 2, 4):
        assert torch.equal(top_k_gating(logits, k, expert_bias=torch.zeros(8)).expert_index,
                           top_k_gating(logits, k).expert_index)


def test_group_limited_routing_stays_in_the_best_groups():
    logits = torch.randn(300, 16, generator=torch.Generator().manual_seed(5))
    grouped = top_k_gating(logits, 4, drop_tokens=False, num_expert_groups=4, topk_groups=2)
    free = top_k_gating(logits, 4, drop_tokens=False)
    groups_used = lambda out: torch.tensor([len(set((row // 4).tolist())) for row in out.expert_index])  # noqa: E731
    assert groups_used(grouped).max() <= 2
    assert groups_used(free).max() > 2  # negative control: unlimited routing spans more groups
    # Which two groups: the best by the sum of each group's top-2 scores.
    scores = torch.softmax(logits, -1).view(300, 4, 4)
    best = scores.topk(2, -1).values.sum(-1).topk(2, -1).indices.sort(-1).values
    for s in range(300):
        assert set((grouped.expert_index[s] // 4).tolist()) <= set(best[s].tolist())
    # One group is a no-op.
    assert torch.equal(top_k_gating(logits, 4, num_expert_groups=1, topk_groups=1).expert_index,
                       top_k_gating(logits, 4).expert_index)
    assert torch.equal(top_k_gating(logits, 4, num_expert_groups=4, topk_groups=4).expert_index,
                       top_k_gating(logits, 4).expert_index)


def test_sigmoid_scores_and_statistics():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.rand(50, generator=torch.Generator().manual_seed(10)) > 0.3
    out = top_k_gating(logits, 2, score_function="sigmoid", norm_topk_prob=False, drop_tokens=False, token_mask=mask)
    sig = torch.sigmoid(logits)
    torch.testing.assert_close(out.combine_weight[mask], sig.gather(1, out.expert_index)[mask])
    dist = sig / sig.sum(-1, keepdim=True)
    torch.testing.assert_close(out.gate_prob_mean, dist[mask].mean(0))
    torch.testing.assert_close(out.gate_prob_mean.sum(), torch.tensor(1.0))
    torch.testing.assert_close(out.router_entropy, torch.special.entr(dist[mask]).sum(-1).mean())
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits[mask], -1).square().mean())
    # Negative control: the raw sigmoid mean is not a distribution.
    assert abs(sig[mask].mean(0).sum().item() - 1.0) > 0.5


# ---- losses ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_each_loss_against_the_reference(masked, score_function):
    B, T, E, k = 4, 16, 8, 3
    logits = skewed_logits(B * T, E, 21)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 10:] = False
        mask[2, :] = False  # a sequence of padding only: left out of the mean
        mask = mask.reshape(-1)
    ref = reference_routing(logits, k, 1.0, 4, True, mask, score_function, seq_len=T)
    for kind in ("gshard", "switch", "sequence"):
        out = top_k_gating(logits, k, token_mask=mask, score_function=score_function, balance_loss=kind,
                           sequence_length=T)
        assert out.l_aux.item() == pytest.approx(ref[kind], rel=1e-5), kind
    assert len({round(ref[kind], 6) for kind in ("gshard", "switch", "sequence")}) == 3  # they are distinct losses


def test_losses_are_one_at_perfect_balance():
    # 4 experts, k=2, each token splits its scores evenly; choices cycle so every expert gets the same load.
    E, k, T = 4, 2, 8
    logits = torch.zeros(2 * T, E)
    s = torch.arange(2 * T)
    logits[s, s % E] = 1e-4
    logits[s, (s + 1) % E] = 5e-5
    for kind in ("gshard", "switch", "sequence"):
        out = top_k_gating(logits, k, balance_loss=kind, sequence_length=T)
        assert out.choice_count.tolist() == [8.0] * 4
        assert out.l_aux.item() == pytest.approx(1.0, rel=1e-3), kind


def test_padding_does_not_count_in_any_loss():
    gen = torch.Generator().manual_seed(3)
    B, T, E = 3, 10, 8
    logits = torch.randn(B, T, E, generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :6] = True  # the first 6 tokens of each sequence are real
    garbage = logits.clone()
    garbage[~mask] = 100.0 * torch.randn(int((~mask).sum()), E, generator=gen)  # padding's logits don't matter
    for kind in ("gshard", "switch", "sequence"):
        masked = top_k_gating(garbage.reshape(-1, E), 3, token_mask=mask.reshape(-1), balance_loss=kind,
                              sequence_length=T)
        alone = top_k_gating(logits[:, :6].reshape(-1, E), 3, balance_loss=kind, sequence_length=6)
        torch.testing.assert_close(masked.l_aux, alone.l_aux)
        torch.testing.assert_close(masked.choice_count, alone.choice_count)
        assert masked.num_tokens == alone.num_tokens == 18


def test_sequence_loss_is_the_mean_over_sequences():
    B, T, E = 3, 12, 8
    logits = skewed_logits(B * T, E, 4)
    whole = top_k_gating(logits, 2, balance_loss="sequence", sequence_length=T).l_aux
    each = [top_k_gating(logits[b * T:(b + 1) * T], 2, balance_loss="sequence", sequence_length=T).l_aux
            for b in range(B)]
    torch.testing.assert_close(whole, torch.stack(each).mean())
    # Negative control: one long "sequence" of all tokens is a different loss.
    assert abs(top_k_gating(logits, 2, balance_loss="sequence", sequence_length=B * T).l_aux.item()
               - whole.item()) > 1e-4


def test_balancing_loss_from_counts():
    logits = torch.randn(30, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = top_k_gating(logits, 3)
    me, first, every = out.gate_prob_mean, out.first_choice_count, out.choice_count
    assert out.balance_counts("gshard") is first and out.balance_counts("switch") is every
    gshard = balancing_loss("gshard", me, first, out.num_tokens, 3)
    assert torch.equal(gshard, out.l_aux)
    assert torch.equal(gshard, load_balancing_loss(out.gate_prob_mean, out.first_choice_count / 30))
    # A tensor token count, as after an all-reduce, gives the same values.
    assert torch.equal(balancing_loss("gshard", me, first, torch.tensor(30.0), 3), gshard)
    switch = balancing_loss("switch", me, every, torch.tensor(30.0), 3)
    torch.testing.assert_close(switch, 6 / (30 * 3) * (out.choice_count * out.gate_prob_mean).sum())
    torch.testing.assert_close(balancing_loss("switch", me, every, 30, 3), switch)
    switch.backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sequence"):
        balancing_loss("sequence", me, every, 30, 3)


def test_sequence_loss_needs_a_dividing_sequence_length():
    logits = torch.randn(12, 4)
    with pytest.raises(ValueError, match="sequence_length"):
        top_k_gating(logits, 2, balance_loss="sequence")
    with pytest.raises(ValueError, match="sequence_length"):
        top_k_gating(logits, 2, balance_loss="sequence", sequence_length=5)
    dist = torch.softmax(logits, -1)
    assert sequence_balancing_loss(dist[:0], torch.zeros(0, 2, dtype=torch.long), None, 4).item() == 0.0


# ---- noise, layer path, checks ---------------------------------------------------------------------------------


def test_noise_at_k_above_two():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(8))
    plain = top_k_gating(logits, 4)
    for kwargs in (dict(noisy_gate_policy="RSample"), dict(second_expert_policy="sampling"),
                   dict(noisy_gate_policy="RSample", second_expert_policy="sampling")):
        torch.manual_seed(0)
        noisy = top_k_gating(logits, 4, training=True, **kwargs)
        assert not torch.equal(noisy.expert_index, plain.expert_index)
        assert all(len(set(row)) == 4 for row in noisy.expert_index.tolist())  # k distinct experts per token
        assert torch.equal(top_k_gating(logits, 4, training=False, **kwargs).expert_index, plain.expert_index)
        if "noisy_gate_policy" not in kwargs:  # sampling leaves the first choice alone
            assert torch.equal(noisy.expert_index[:, 0], plain.expert_index[:, 0])
    torch.manual_seed(0)
    grouped = top_k_gating(logits, 4, second_expert_policy="sampling", num_expert_groups=4, topk_groups=2)
    assert max(len(set((row // 4).tolist())) for row in grouped.expert_index) <= 2  # noise stays in the groups


def test_k_above_two_choices_are_sorted_topk():
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    out = top_k_gating(logits, 6, drop_tokens=False)
    assert torch.equal(out.expert_index, logits.topk(6, -1).indices)
    chosen = logits.gather(1, out.expert_index)
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])


def test_layer_path_with_options():
    gshard = get_gate("gshard")
    logits = torch.randn(48, 8, generator=torch.Generator().manual_seed(6))
    mask = torch.rand(48, generator=torch.Generator().manual_seed(7)) > 0.2
    bias = torch.linspace(-0.1, 0.1, 8)
    for kind in ("gshard", "switch", "sequence"):
        options = dict(score_function="sigmoid", norm_topk_prob=True, route_scale=2.5, capacity_priority="position",
                       balance_loss=kind, expert_bias=bias, num_expert_groups=2, topk_groups=1, sequence_length=12)
        torch.manual_seed(0)
        checked = top_k_gating(logits, 3, 0.8, 2, True, None, True, "sampling", True, mask, **options)
        torch.manual_seed(0)
        unchecked = gshard(logits, 3, 0.8, 2, True, None, True, "sampling", True, mask, **options)
        assert (unchecked.l_aux is None) == (kind != "sequence")
        for name in ("expert_index", "combine_weight", "kept", "tokens_per_expert", "sorted_pairs", "z_loss",
                     "gate_prob_mean", "first_choice_count", "choice_count", "router_entropy"):
            assert torch.equal(getattr(checked, name), getattr(unchecked, name)), name
        if kind == "sequence":
            assert torch.equal(checked.l_aux, unchecked.l_aux)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k"),
    (dict(k=9), "exceeds the number of experts"),
    (dict(score_function="relu"), "score_function"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(route_scale=0.0), "route_scale"),
    (dict(route_scale=float("inf")), "route_scale"),
    (dict(capacity_priority="random"), "capacity_priority"),
    (dict(balance_loss="mixtral"), "balance_loss"),
    (dict(num_expert_groups=3), "num_expert_groups"),
    (dict(num_expert_groups=0), "num_expert_groups"),
    (dict(num_expert_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_expert_groups=4, topk_groups=0), "topk_groups"),
    (dict(k=5, num_expert_groups=4, topk_groups=2), "raise topk_groups"),
    (dict(use_rts=True, capacity_priority="probs"), "use_rts"),
    (dict(noisy_gate_policy="Gaussian"), "noisy_gate_policy"),
])
def test_check_routing_options_rejects(kwargs, match):
    options = dict(k=2, num_experts=8) | kwargs
    with pytest.raises(ValueError, match=match):
        check_routing_options(**options)
    top_k_args = {key: value for key, value in options.items() if key != "num_experts"}
    with pytest.raises(ValueError, match=match):
        top_k_gating(torch.randn(16, 8), **top_k_args)


def test_check_routing_options_accepts_the_documented_presets():
    for options in (dict(k=8, num_experts=8), dict(k=1, num_experts=1),
                    dict(k=8, num_experts=256, score_function="sigmoid", norm_topk_prob=True, route_scale=2.5,
                         num_expert_groups=8, topk_groups=4, balance_loss="sequence"),  # DeepSeek-V3
                    dict(k=4, num_experts=16, capacity_priority="probs", balance_loss="switch"),  # DeepSpeed top-k
                    dict(k=2, num_experts=8, use_rts=True, capacity_priority="position")):
        check_routing_options(**options)


def test_expert_bias_of_the_wrong_shape_rejected():
    with pytest.raises(ValueError, match=r"expert_bias must have shape \(4,\)"):
        top_k_gating(torch.randn(8, 4), 2, expert_bias=torch.zeros(3))


def test_gshard_gating_signature_is_the_layers():
    import inspect
    params = inspect.signature(gshard_gating).parameters
    keyword_only = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == ["score_function", "norm_topk_prob", "route_scale", "capacity_priority", "balance_loss",
                            "expert_bias", "num_expert_groups", "topk_groups", "sequence_length"]
    assert list(inspect.signature(top_k_gating).parameters) == list(params)
