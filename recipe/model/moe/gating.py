"""Top-k routing (GShard, Switch, DeepSpeed, Mixtral/Qwen, DeepSeek-V3) as pure tensor functions (no
torch.distributed here).

Notation: S tokens in the local group, E experts, k choices per token (1 <= k <= E), N = S·k (token, choice)
pairs. A pair is identified by its flat index ``p = s·k + j`` into an ``[S, k]`` array. Defaults are GShard's
top-1/top-2 as DeepSpeed and InternEvo implement it; every option below is keyword-only.

* scores ``score_function``: ``"softmax"`` ``g = softmax(logits)`` (GShard, Switch, Mixtral, Qwen, DeepSeek-V2,
  OLMoE) or ``"sigmoid"`` ``g_e = σ(logit_e)`` (DeepSeek-V3), in fp32. ``g'`` = g normalised to sum 1 over
  the E experts (g itself for softmax) is the per-token score distribution the statistics and losses use.
* choice: ``expert_index = topk(g + expert_bias, k)``, first choice in column 0. The bias (aux-loss-free
  balancing, DeepSeek-V3) only chooses; weights come from the unbiased g. Without a bias or groups the choice
  is made on the logits (the same order). ``noisy_gate_policy="RSample"`` adds Gumbel noise to the logits for
  the first choice, ``second_expert_policy="sampling"`` for choices 2..k (training only).
* group-limited routing ``num_expert_groups``/``topk_groups`` (DeepSeek-V2/V3): E experts in G equal groups;
  a group's score is the sum of its top-min(2, E/G) biased scores; a token chooses only in its best
  ``topk_groups`` groups. G=1 is a no-op.
* capacity per expert: ``ceil(k·S·cf/E)`` in exact rational arithmetic on the decimal cf, at least
  ``min_capacity``, at most S (S counts routed tokens only). ``drop_tokens=False``: the largest load.
* overflow ``capacity_priority``: an expert keeps the first ``capacity`` pairs in priority order.
  ``"choice"`` (GShard, DeepSpeed top-1/top-2): all first choices, then all second choices, ...;
  ``"position"`` (DeepSpeed ``drop_policy='position'``): token order whatever the choice rank;
  ``"probs"`` (DeepSpeed top-k, k >= 3): highest unbiased score g first. Under "choice" and "position"
  ``use_rts=True`` (Random Token Selection) replaces token order by a random one.
* combine weights ``norm_topk_prob``: ``True`` g over its sum over the k chosen (Mixtral, Qwen3-MoE,
  DeepSeek-V3); ``False`` the raw g (Qwen2-MoE, OLMoE, DeepSeek-V2); ``None`` GShard/DeepSpeed: raw g at k=1,
  renormalised over the choices that survive the capacity cut at k >= 2 (a lone survivor gets 1). Dropped
  pairs get 0. Then times ``route_scale`` (DeepSeek-V3: 2.5).
* balancing loss ``balance_loss`` (1 at perfect balance; ``me_e`` = mean of g'_e over routed tokens):
  ``"gshard"`` ``E·Σ_e me_e·first_e/S`` (first_e: tokens whose first choice is e); ``"switch"``
  ``E/(S·k)·Σ_e me_e·count_e`` (count_e: tokens with e among their k choices; DeepSpeed top-k, Switch at
  k=1, Hugging Face Mixtral/Qwen-MoE); ``"sequence"`` DeepSeek-V3's sequence-wise loss, the mean over
  sequences b of ``E/k·Σ_e (count_be/T_b)·P_be``, P_be the mean g'_e over b's routed tokens. Counts are
  taken before dropping and carry no gradient.
* router z-loss (ST-MoE): ``mean_s logsumexp(logits_s)²``, returned unweighted. Padding (``token_mask``
  False) is neither routed nor counted anywhere.

Two entry points to the same math: ``top_k_gating`` checks its arguments (for direct calls and for
user gates built on it) and fills ``l_aux``; ``gshard_gating``, registered as ``"gshard"``, is what the MoE
layer calls every forward: it checks nothing (the layer checked its options once when it was built), and
leaves ``l_aux`` to the layer (``balancing_loss``, per rank or over the data-parallel group), except for
the per-sequence ``"sequence"`` loss, which it computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, Optional, Union, get_args

import torch
import torch.nn.functional as F

from ...config import BalanceLoss, CapacityPriority, NoisyGatePolicy, ScoreFunction, SecondExpertPolicy

NOISY_GATE_POLICIES = get_args(NoisyGatePolicy)  # (None, "Jitter", "RSample")
SECOND_EXPERT_POLICIES = get_args(SecondExpertPolicy)  # ("argmax", "sampling")
SCORE_FUNCTIONS = get_args(ScoreFunction)  # ("softmax", "sigmoid")
CAPACITY_PRIORITIES = get_args(CapacityPriority)  # ("choice", "position", "probs")
BALANCE_LOSSES = get_args(BalanceLoss)  # ("gshard", "switch", "sequence")


@dataclass
class GateOutput:
    """What a gating function decides for S tokens; every tensor lives on the logits' device."""

    expert_index: torch.Tensor  # (S, k) long: chosen experts, first choice in column 0
    combine_weight: torch.Tensor  # (S, k) fp32: output weight of each choice, 0 where dropped
    kept: torch.Tensor  # (S, k) bool: the pair fits in its expert's capacity
    capacity: int  # per-expert capacity used for this call
    tokens_per_expert: torch.Tensor  # (E,) long: kept pairs per expert
    sorted_pairs: torch.Tensor  # (n_kept,) long: flat ids s·k+j of kept pairs, grouped by expert in order
    # () fp32: balancing loss over this group's tokens (``balancing_loss``); None from ``gshard_gating``,
    # whose caller, the layer, computes it (per rank or over the data-parallel group), except "sequence"
    l_aux: Optional[torch.Tensor]
    z_loss: torch.Tensor  # () fp32: router z-loss, unweighted
    gate_prob_mean: torch.Tensor  # (E,) fp32: me, mean normalised score g' per expert
    first_choice_count: torch.Tensor  # (E,) fp32: tokens whose first choice is e (ce·S), before dropping
    choice_count: torch.Tensor  # (E,) fp32: tokens with e among their k choices, before dropping (the load)
    router_entropy: torch.Tensor  # () fp32, detached: mean entropy of g'
    num_tokens: int  # tokens routed (mask applied)

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]

    def balance_counts(self, balance_loss: str) -> torch.Tensor:
        """(E,) the counts ``balancing_loss`` of this kind reads: first choices ("gshard") or all k ("switch")."""
        return self.first_choice_count if balance_loss == "gshard" else self.choice_count


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """``ceil(k·S·cf/E)`` floored at ``min_capacity`` and capped at S (an expert never needs more than S slots).

    Exact: cf is taken as the decimal it prints as (``Fraction(str(cf))``, 1.1 is 11/10), so S=400, E=8, k=2,
    cf=1.1 gives 110, where float arithmetic (``ceil(2·400/8·1.1)``) gives 111. DeepSpeed's ``_capacity``
    rounds in float32 and can differ by one slot from this for non-dyadic cf.
    """
    capacity = math.ceil(k * num_tokens * Fraction(str(capacity_factor)) / num_experts)
    return min(max(capacity, min_capacity), num_tokens)


def load_balancing_loss(gate_prob_mean: torch.Tensor, first_choice_fraction: torch.Tensor) -> torch.Tensor:
    """GShard auxiliary loss ``E · Σ_e me_e · ce_e``.

    ``gate_prob_mean`` (me) carries the gradient; ``first_choice_fraction`` (ce) is a count and has none.
    It equals 1 when both are uniform (1/E each) and grows as routing concentrates.
    """
    num_experts = gate_prob_mean.numel()
    return num_experts * torch.sum(gate_prob_mean * first_choice_fraction.detach())


def balancing_loss(balance_loss: str, gate_prob_mean: torch.Tensor, counts: torch.Tensor,
                   num_tokens: Union[int, torch.Tensor], k: int) -> torch.Tensor:
    """The balancing loss from routing counts (``GateOutput.balance_counts``), which the caller may have summed
    over data-parallel ranks (``num_tokens`` S, int or tensor, then summed too). 1 at perfect balance; counts
    carry no gradient.

    * ``"gshard"`` (GShard, DeepSpeed top-1/top-2): ``E·Σ_e me_e·first_e/S``, counts = first choices;
    * ``"switch"`` (Switch at k=1, DeepSpeed ``topkgating``, Hugging Face Mixtral / Qwen-MoE):
      ``E/(S·k)·Σ_e me_e·count_e``, count_e = tokens having e among any of their k choices.

    ``"sequence"`` (DeepSeek-V3) is per sequence, not computable from counts: ``sequence_balancing_loss``.
    """
    if balance_loss not in ("gshard", "switch"):
        raise ValueError(f"balancing_loss computes 'gshard' or 'switch' from counts, not {balance_loss!r} "
                         f"('sequence' is per sequence: sequence_balancing_loss, which the gate computes)")
    if isinstance(num_tokens, torch.Tensor):
        fraction = counts / num_tokens.clamp(min=1)
    else:
        fraction = counts / max(num_tokens, 1)
    loss = load_balancing_loss(gate_prob_mean, fraction)
    return loss if balance_loss == "gshard" else loss / k


def sequence_balancing_loss(score_dist: torch.Tensor, expert_index: torch.Tensor, token_mask: Optional[torch.Tensor],
                            sequence_length: Optional[int]) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss over S = B·T tokens in row-major order (T = ``sequence_length``).

    Per sequence b with T_b routed tokens: ``L_b = E/k · Σ_e (count_be/T_b) · P_be``, count_be = b's tokens
    with e among their k choices, P_be = mean of g'_e (``score_dist``, (S, E), rows summing to 1) over b's
    routed tokens. Returns the mean of L_b over sequences with T_b > 0 (0 if none); 1 at perfect balance.
    """
    num_tokens, num_experts = score_dist.shape
    k = expert_index.shape[1]
    if sequence_length is None or sequence_length < 1 or num_tokens % sequence_length != 0:
        raise ValueError(f"balance_loss='sequence' needs sequence_length dividing the {num_tokens} tokens "
                         f"(row-major (batch, sequence) order), got {sequence_length}")
    num_seq = num_tokens // sequence_length
    weight_S = score_dist.new_ones(num_tokens) if token_mask is None else token_mask.to(score_dist.dtype)
    tokens_B = weight_S.view(num_seq, sequence_length).sum(dim=1)  # (B,) T_b
    denom_B1 = tokens_B.clamp(min=1).unsqueeze(1)
    prob_BE = (score_dist * weight_S.unsqueeze(1)).view(num_seq, sequence_length, num_experts).sum(dim=1) / denom_B1
    seq_S = torch.arange(num_tokens, device=score_dist.device) // sequence_length
    slot_N = (seq_S.unsqueeze(1) * num_experts + expert_index).reshape(-1)  # (S·k,) flat (b, e)
    count_BE = score_dist.new_zeros(num_seq * num_experts).index_add_(
        0, slot_N, weight_S.repeat_interleave(k)).view(num_seq, num_experts)
    loss_B = num_experts / k * (count_BE / denom_B1 * prob_BE).sum(dim=1)
    routed_B = (tokens_B > 0).to(score_dist.dtype)
    return (loss_B * routed_B).sum() / routed_B.sum().clamp(min=1)


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise with the shape, dtype and device of ``x``."""
    uniform = torch.rand_like(x).clamp_(min=1e-20, max=1.0 - 1e-7)
    return -torch.log(-torch.log(uniform))


def pair_priority(
    num_tokens: int,
    k: int,
    device: torch.device,
    priority: CapacityPriority = "choice",
    random_priority: bool = False,
    pair_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(N,) long: the flat pair ids ``s·k+j`` in capacity priority order, first served first.

    ``"choice"``: every token's choice 0, then every choice 1, ... (column-major over (S, k)); ``"position"``:
    token by token (row-major, ``s·k+j`` itself); either in a random token order when ``random_priority``.
    ``"probs"``: by ``pair_scores`` ((S, k), the unbiased gate scores), descending, ties in flat order.
    """
    if priority == "probs":
        return torch.argsort(pair_scores.reshape(-1), descending=True, stable=True)
    if random_priority:
        token_order = torch.randperm(num_tokens, device=device)
    else:
        token_order = torch.arange(num_tokens, device=device)
    choices = torch.arange(k, device=device)
    if priority == "position":
        return (token_order.unsqueeze(1) * k + choices.unsqueeze(0)).reshape(-1)
    return (token_order.unsqueeze(0) * k + choices.unsqueeze(1)).reshape(-1)


def assign_capacity(
    expert_index: torch.Tensor,
    num_experts: int,
    capacity: Optional[int],
    token_mask: Optional[torch.Tensor] = None,
    random_priority: bool = False,
    priority: CapacityPriority = "choice",
    pair_scores: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Decide which (token, choice) pairs fit in their expert, and group the kept ones by expert.

    Pairs are served in ``pair_priority`` order (``priority``, ``random_priority``, ``pair_scores`` as
    there); one stable sort by expert id gives each pair its position in its expert's queue, O(N log N)
    with no (S, E) temporaries.

    Args:
        expert_index: (S, k) long, chosen experts.
        capacity: slots per expert; None keeps every pair (capacity becomes the largest load).
        token_mask: (S,) bool, False for tokens that must not be routed (padding).
    Returns:
        kept (S, k) bool, sorted_pairs (n_kept,) long, tokens_per_expert (E,) long, capacity used.
    """
    num_tokens, k = expert_index.shape
    device = expert_index.device
    num_pairs = num_tokens * k
    order_N = pair_priority(num_tokens, k, device, priority, random_priority, pair_scores)
    expert_of_pair = expert_index
    if token_mask is not None:
        # Masked tokens get the sentinel expert id E: they sort last and are never kept.
        expert_of_pair = torch.where(token_mask.unsqueeze(1), expert_of_pair, num_experts)
    if priority == "choice" and not random_priority:
        expert_in_priority = expert_of_pair.t().reshape(-1)  # (k, S) flattened: the same order, no gather
    else:
        expert_in_priority = expert_of_pair.reshape(-1)[order_N]
    order = torch.argsort(expert_in_priority, stable=True)
    pairs_by_expert = order_N[order]  # (N,) pair ids grouped by expert, priority order inside a group
    experts_sorted = expert_in_priority[order]
    load = torch.bincount(experts_sorted, minlength=num_experts + 1)  # (E+1,) last bin = masked
    if capacity is None:
        capacity = int(load[:num_experts].max()) if num_experts > 0 and num_pairs > 0 else 0
    group_start = torch.cumsum(load, 0) - load
    position = torch.arange(num_pairs, device=device) - group_start[experts_sorted]
    kept_sorted = (position < capacity) & (experts_sorted < num_experts)
    kept = torch.zeros(num_pairs, dtype=torch.bool, device=device)
    kept[pairs_by_expert] = kept_sorted
    sorted_pairs = pairs_by_expert[kept_sorted]
    tokens_per_expert = torch.clamp(load[:num_experts], max=capacity)
    return kept.view(num_tokens, k), sorted_pairs, tokens_per_expert, capacity


def top_k_gating(
    logits: torch.Tensor,
    k: int,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    noisy_gate_policy: NoisyGatePolicy = None,
    use_rts: bool = False,
    second_expert_policy: SecondExpertPolicy = "argmax",
    training: bool = True,
    token_mask: Optional[torch.Tensor] = None,
    *,
    score_function: ScoreFunction = "softmax",
    norm_topk_prob: Optional[bool] = None,
    route_scale: float = 1.0,
    capacity_priority: CapacityPriority = "choice",
    balance_loss: BalanceLoss = "gshard",
    expert_bias: Optional[torch.Tensor] = None,
    num_expert_groups: int = 1,
    topk_groups: int = 1,
    sequence_length: Optional[int] = None,
) -> GateOutput:
    """Top-k gating for one group of tokens; see the module docstring for every option's formula.

    Checks its arguments (ValueError), then routes with ``gshard_gating`` and fills ``l_aux`` with the local
    loss of kind ``balance_loss``.

    Args:
        logits: (S, E) router logits, any float dtype (computed on in fp32).
        k: experts per token, 1..E.
        capacity_factor: cf in ``ceil(k·S·cf/E)``; pass the eval factor when not training.
        min_capacity: lower bound on the capacity.
        drop_tokens: False keeps every pair (capacity = largest load).
        noisy_gate_policy: None, "Jitter" (applied to the router input by the caller, a no-op here)
            or "RSample" (Gumbel noise on the logits for choosing the first expert while training).
        use_rts: random token selection: a random token order decides who is kept when an expert overflows.
        second_expert_policy: "argmax" or "sampling" (Gumbel noise for choices 2..k while training).
        training: noise is only applied while training.
        token_mask: (S,) bool; False marks tokens (padding) that are neither routed nor counted.
        expert_bias: (E,) added to the scores for choosing only (aux-loss-free balancing).
        sequence_length: T, with S = B·T tokens in row-major order; needed by ``balance_loss="sequence"``.
    """
    check_gating_inputs(logits, token_mask, expert_bias)
    check_gating_options(k, logits.shape[1], capacity_factor, min_capacity, noisy_gate_policy, second_expert_policy,
                         score_function=score_function, norm_topk_prob=norm_topk_prob, route_scale=route_scale,
                         capacity_priority=capacity_priority, balance_loss=balance_loss,
                         num_expert_groups=num_expert_groups, topk_groups=topk_groups, use_rts=use_rts)
    out = gshard_gating(logits, k, capacity_factor, min_capacity, drop_tokens, noisy_gate_policy, use_rts,
                        second_expert_policy, training, token_mask, score_function=score_function,
                        norm_topk_prob=norm_topk_prob, route_scale=route_scale, capacity_priority=capacity_priority,
                        balance_loss=balance_loss, expert_bias=expert_bias, num_expert_groups=num_expert_groups,
                        topk_groups=topk_groups, sequence_length=sequence_length)
    if balance_loss != "sequence":
        counts = out.balance_counts(balance_loss)
        out.l_aux = balancing_loss(balance_loss, out.gate_prob_mean, counts, out.num_tokens, k)
    return out


def gshard_gating(
    logits: torch.Tensor,
    k: int,
    capacity_factor: float = 1.0,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    noisy_gate_policy: NoisyGatePolicy = None,
    use_rts: bool = False,
    second_expert_policy: SecondExpertPolicy = "argmax",
    training: bool = True,
    token_mask: Optional[torch.Tensor] = None,
    *,
    score_function: ScoreFunction = "softmax",
    norm_topk_prob: Optional[bool] = None,
    route_scale: float = 1.0,
    capacity_priority: CapacityPriority = "choice",
    balance_loss: BalanceLoss = "gshard",
    expert_bias: Optional[torch.Tensor] = None,
    num_expert_groups: int = 1,
    topk_groups: int = 1,
    sequence_length: Optional[int] = None,
) -> GateOutput:
    """``top_k_gating`` without argument checks and with ``l_aux=None`` (but for ``balance_loss="sequence"``,
    computed here, per sequence): the MoE layer's per-forward path.

    The arguments must already be valid (the layer checks them when it is built; a bad k or policy
    here would route wrongly, not fail).
    """
    logits = logits.float()
    scores = router_scores(logits, score_function)  # (S, E) g
    expert_index = choose_experts(logits, k, noisy_gate_policy, second_expert_policy, training,
                                  score_function=score_function, expert_bias=expert_bias,
                                  num_expert_groups=num_expert_groups, topk_groups=topk_groups,
                                  scores=scores)  # (S, k)

    num_tokens = logits.shape[0] if token_mask is None else int(token_mask.sum())
    num_experts = logits.shape[1]
    capacity = expert_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity) if drop_tokens else None
    kept, sorted_pairs, tokens_per_expert, capacity = _fill_capacity(expert_index, scores, capacity, token_mask,
                                                                     use_rts, capacity_priority)
    score_dist = normalised_scores(scores, score_function)  # (S, E) g', rows sum to 1
    gate_prob_mean, first_choice_count, z_loss, entropy = router_statistics(
        logits, score_dist, expert_index[:, 0], token_mask, num_tokens
    )
    l_aux = None
    if balance_loss == "sequence":
        l_aux = sequence_balancing_loss(score_dist, expert_index, token_mask, sequence_length)
    weight = combine_weights(scores, expert_index, kept, norm_topk_prob, route_scale)
    return GateOutput(
        expert_index=expert_index, combine_weight=weight, kept=kept, capacity=capacity,
        tokens_per_expert=tokens_per_expert, sorted_pairs=sorted_pairs,
        l_aux=l_aux, z_loss=z_loss, gate_prob_mean=gate_prob_mean, first_choice_count=first_choice_count,
        choice_count=choice_counts(expert_index, num_experts, token_mask), router_entropy=entropy,
        num_tokens=num_tokens,
    )


def _fill_capacity(expert_index: torch.Tensor, scores: torch.Tensor, capacity: Optional[int],
                   token_mask: Optional[torch.Tensor], use_rts: bool, capacity_priority: CapacityPriority):
    """``assign_capacity`` for the gate; under "probs" the pairs queue by their unbiased score g."""
    pair_scores = scores.gather(1, expert_index) if capacity_priority == "probs" else None
    return assign_capacity(expert_index, scores.shape[1], capacity, token_mask, random_priority=use_rts,
                           priority=capacity_priority, pair_scores=pair_scores)


def router_scores(logits: torch.Tensor, score_function: ScoreFunction = "softmax") -> torch.Tensor:
    """(S, E) gate scores g: ``softmax(logits)`` over experts, or per-expert ``sigmoid(logits)`` (DeepSeek-V3)."""
    if score_function == "sigmoid":
        return torch.sigmoid(logits)
    return F.softmax(logits, dim=-1)


def normalised_scores(scores: torch.Tensor, score_function: ScoreFunction = "softmax") -> torch.Tensor:
    """(S, E) g' = g / Σ_e g_e, the per-token score distribution (softmax scores already are one)."""
    if score_function == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)


def group_limited_mask(choice_scores: torch.Tensor, num_expert_groups: int, topk_groups: int) -> Optional[torch.Tensor]:
    """(S, E) bool, True for the experts of each token's ``topk_groups`` best groups (DeepSeek-V2/V3), or None
    when every expert is allowed. A group's score is the sum of its top-min(2, E/G) ``choice_scores``."""
    if num_expert_groups <= 1 or topk_groups >= num_expert_groups:
        return None
    num_tokens, num_experts = choice_scores.shape
    per_group = num_experts // num_expert_groups
    grouped_SGX = choice_scores.view(num_tokens, num_expert_groups, per_group)
    group_score_SG = grouped_SGX.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    best_SK = group_score_SG.topk(topk_groups, dim=-1).indices
    allowed_SG = torch.zeros_like(group_score_SG, dtype=torch.bool).scatter_(1, best_SK, True)
    return allowed_SG.repeat_interleave(per_group, dim=1)


def choose_experts(
    logits: torch.Tensor,
    k: int,
    noisy_gate_policy: NoisyGatePolicy,
    second_expert_policy: SecondExpertPolicy,
    training: bool,
    *,
    score_function: ScoreFunction = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
    num_expert_groups: int = 1,
    topk_groups: int = 1,
    scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(S, k) long, first choice in column 0: ``topk(g + expert_bias, k)`` within each token's best groups
    (``scores``: g = ``router_scores(logits)``, if the caller has computed them already).

    Noise (training only) perturbs the logits before scoring: Gumbel noise for the first choice under
    ``RSample``, fresh Gumbel noise for choices 2..k under ``second_expert_policy="sampling"``. Without bias or
    groups the choice is made on the logits themselves (g is monotone in them), k <= 2 with argmax: GShard's
    code path and random-number stream.
    """
    plain = expert_bias is None and num_expert_groups <= 1
    clean, allowed = None, None
    if not plain:  # the noise-free choice scores, computed once: the group mask and the noise-free choices read them
        clean = _biased_scores(logits, score_function, expert_bias, scores)
        allowed = group_limited_mask(clean, num_expert_groups, topk_groups)

    def choice_scores(x: torch.Tensor) -> torch.Tensor:
        if plain:
            return x
        biased = clean if x is logits else _biased_scores(x, score_function, expert_bias)  # else: noisy logits
        return biased if allowed is None else biased.masked_fill(~allowed, float("-inf"))

    rsample = training and noisy_gate_policy == "RSample"
    sampling = training and second_expert_policy == "sampling"
    if k >= 3 and not rsample and not sampling:
        return torch.topk(choice_scores(logits), k, dim=-1, sorted=True).indices
    first = choice_scores(logits + gumbel_like(logits) if rsample else logits).argmax(dim=-1)  # (S,)
    if k == 1:
        return first.unsqueeze(1)
    rest = choice_scores(logits + gumbel_like(logits) if sampling else logits)
    rest = rest.scatter(1, first.unsqueeze(1), float("-inf"))  # rule out the first
    if k == 2:
        return torch.stack([first, rest.argmax(dim=-1)], dim=1)
    return torch.cat([first.unsqueeze(1), torch.topk(rest, k - 1, dim=-1, sorted=True).indices], dim=1)


def _biased_scores(logits: torch.Tensor, score_function: ScoreFunction, expert_bias: Optional[torch.Tensor],
                   scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """g + expert_bias, from ``scores`` = ``router_scores(logits)`` when the caller already has them."""
    if scores is None:
        scores = router_scores(logits, score_function)
    return scores if expert_bias is None else scores + expert_bias.to(scores.dtype)


def combine_weights(gates: torch.Tensor, expert_index: torch.Tensor, kept: torch.Tensor,
                    norm_topk_prob: Optional[bool] = None, route_scale: float = 1.0) -> torch.Tensor:
    """(S, k) output weight of each choice, 0 where dropped, times ``route_scale``, from the unbiased scores g.

    ``norm_topk_prob=True``: g over its sum over the k chosen, before dropping (Mixtral, Qwen3-MoE, DeepSeek-V3);
    ``False``: raw g (Qwen2-MoE, OLMoE, DeepSeek-V2); ``None`` (GShard, DeepSpeed): raw g for k=1, renormalised
    over the surviving choices for k >= 2 (a lone survivor gets 1, a token with all dropped 0).
    """
    eps = torch.finfo(gates.dtype).eps
    chosen = gates.gather(1, expert_index)
    if norm_topk_prob:
        weight = chosen / chosen.sum(dim=1, keepdim=True).clamp(min=eps) * kept
    else:
        weight = chosen * kept
        if norm_topk_prob is None and expert_index.shape[1] > 1:
            weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=eps)
    return weight if route_scale == 1.0 else weight * route_scale


def choice_counts(expert_index: torch.Tensor, num_experts: int,
                  token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E,) fp32: routed tokens having e among their k choices, before dropping (the expert load)."""
    if token_mask is None:
        return torch.bincount(expert_index.reshape(-1), minlength=num_experts).float()
    weight_N = token_mask.float().repeat_interleave(expert_index.shape[1])
    return torch.zeros(num_experts, device=expert_index.device).index_add_(0, expert_index.reshape(-1), weight_N)


def router_statistics(
    logits: torch.Tensor,
    gates: torch.Tensor,
    first_choice: torch.Tensor,
    token_mask: Optional[torch.Tensor],
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """me (E,), first-choice counts (E,), z-loss and mean gate entropy, over routed (unmasked) tokens only."""
    num_experts = logits.shape[1]
    denom = max(num_tokens, 1)
    if token_mask is None:
        gate_prob_mean = gates.sum(dim=0) / denom
        first_choice_count = torch.bincount(first_choice, minlength=num_experts).to(gates.dtype)
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() / denom
        with torch.no_grad():
            entropy = torch.special.entr(gates).sum() / denom
        return gate_prob_mean, first_choice_count, z_loss, entropy
    weight = token_mask.to(gates.dtype)
    gate_prob_mean = (gates * weight.unsqueeze(1)).sum(dim=0) / denom
    first_choice_count = torch.zeros(num_experts, dtype=gates.dtype, device=gates.device)
    first_choice_count.index_add_(0, first_choice, weight)
    z_loss = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / denom
    with torch.no_grad():
        entropy = (torch.special.entr(gates).sum(dim=-1) * weight).sum() / denom
    return gate_prob_mean, first_choice_count, z_loss, entropy


def check_gating_inputs(logits: torch.Tensor, token_mask: Optional[torch.Tensor],
                        expert_bias: Optional[torch.Tensor] = None) -> None:
    """ValueError for tensors ``top_k_gating`` cannot route (the layer's router never makes these)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    check_token_mask(token_mask, logits.shape[0])
    if expert_bias is not None and expert_bias.shape != (logits.shape[1],):
        raise ValueError(f"expert_bias must have shape ({logits.shape[1]},), got {tuple(expert_bias.shape)}")


def check_token_mask(token_mask: Optional[torch.Tensor], num_tokens: int) -> None:
    """ValueError unless ``token_mask`` is None or of shape (num_tokens,): a mask of one element would
    otherwise broadcast over every token."""
    if token_mask is not None and token_mask.shape != (num_tokens,):
        raise ValueError(f"token_mask must have shape ({num_tokens},), got {tuple(token_mask.shape)}")


def check_gating_options(
    k: int,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int,
    noisy_gate_policy: NoisyGatePolicy,
    second_expert_policy: SecondExpertPolicy,
    *,
    score_function: ScoreFunction = "softmax",
    norm_topk_prob: Optional[bool] = None,
    route_scale: float = 1.0,
    capacity_priority: CapacityPriority = "choice",
    balance_loss: BalanceLoss = "gshard",
    num_expert_groups: int = 1,
    topk_groups: int = 1,
    use_rts: bool = False,
) -> None:
    """ValueError for a gating option out of range: ``top_k_gating``'s checks, ``check_routing_options`` plus
    the capacity factor, ``min_capacity`` and the second-expert policy (the layer checks its own capacity
    factors, and those policies through ``check_routing_policies``, once when it is built)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    check_routing_options(k, num_experts, score_function, norm_topk_prob, route_scale, capacity_priority,
                          balance_loss, num_expert_groups, topk_groups, use_rts, noisy_gate_policy)
    _check_min_capacity(min_capacity)
    _check_second_expert_policy(second_expert_policy)


def check_routing_options(
    k: int,
    num_experts: int,
    score_function: ScoreFunction = "softmax",
    norm_topk_prob: Optional[bool] = None,
    route_scale: float = 1.0,
    capacity_priority: CapacityPriority = "choice",
    balance_loss: BalanceLoss = "gshard",
    num_expert_groups: int = 1,
    topk_groups: int = 1,
    use_rts: bool = False,
    noisy_gate_policy: NoisyGatePolicy = None,
) -> None:
    """ValueError for k, a routing option or a combination of them out of range (the layer calls it once,
    when it is built; ``top_k_gating`` through ``check_gating_options``)."""
    if k < 1:
        raise ValueError(f"k (moe_gate_k) must be >= 1, got {k}")
    if k > num_experts:
        raise ValueError(f"k={k} exceeds the number of experts {num_experts}; lower moe_gate_k or add experts")
    for name, value, allowed in (("score_function", score_function, SCORE_FUNCTIONS),
                                 ("capacity_priority", capacity_priority, CAPACITY_PRIORITIES),
                                 ("balance_loss", balance_loss, BALANCE_LOSSES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not (norm_topk_prob is None or isinstance(norm_topk_prob, bool)):
        raise ValueError(f"norm_topk_prob must be None, True or False, got {norm_topk_prob!r}")
    if not (route_scale > 0 and math.isfinite(route_scale)):
        raise ValueError(f"route_scale must be finite and > 0, got {route_scale}")
    if num_expert_groups < 1 or num_experts % num_expert_groups != 0:
        raise ValueError(f"num_expert_groups ({num_expert_groups}) must be >= 1 and divide num_experts ({num_experts})")
    if not 1 <= topk_groups <= num_expert_groups:
        raise ValueError(f"topk_groups ({topk_groups}) must be in 1..num_expert_groups ({num_expert_groups})")
    if k > topk_groups * (num_experts // num_expert_groups):
        raise ValueError(f"k={k} exceeds the {topk_groups * (num_experts // num_expert_groups)} experts in the "
                         f"best topk_groups={topk_groups} groups; raise topk_groups")
    if use_rts and capacity_priority == "probs":
        raise ValueError("use_rts=True with capacity_priority='probs': the gate values decide who is kept, so a "
                         "random order has nothing to decide; use 'choice' or 'position', or use_rts=False")
    _check_noisy_gate_policy(noisy_gate_policy)


def check_routing_policies(min_capacity: int, noisy_gate_policy: NoisyGatePolicy,
                           second_expert_policy: SecondExpertPolicy) -> None:
    """ValueError for ``min_capacity`` or a noise / second-expert policy out of range."""
    _check_min_capacity(min_capacity)
    _check_noisy_gate_policy(noisy_gate_policy)
    _check_second_expert_policy(second_expert_policy)


def _check_min_capacity(min_capacity: int) -> None:
    if min_capacity < 0:
        raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")


def _check_noisy_gate_policy(noisy_gate_policy: NoisyGatePolicy) -> None:
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"noisy_gate_policy must be one of {NOISY_GATE_POLICIES}, got {noisy_gate_policy!r}")


def _check_second_expert_policy(second_expert_policy: SecondExpertPolicy) -> None:
    if second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(
            f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}"
        )


GateFunction = Callable[..., GateOutput]

# name -> gating function with top_k_gating's signature; selectable as ``model.moe_gate = name``.
# The layer calls it every forward with options it checked once, so "gshard" is the unchecked path.
_GATE_REGISTRY: Dict[str, GateFunction] = {"gshard": gshard_gating}


def register_gate(name: str):
    """Decorator: make a gating function selectable from the config as ``model.moe_gate = name``.

    The function takes ``top_k_gating``'s arguments (the keyword-only routing options included) and returns a
    ``GateOutput``: start from ``top_k_gating`` and change its result, or choose experts your own way and let
    ``assign_capacity``, ``router_statistics`` and ``choice_counts`` fill in the bookkeeping. A
    ``GateOutput.l_aux`` you set is the layer's balancing loss when it balances per rank; over the data-parallel
    group (the default) the layer computes it with ``balancing_loss`` from ``gate_prob_mean``,
    ``first_choice_count``, ``choice_count`` and ``num_tokens``.
    """

    def decorator(fn: GateFunction) -> GateFunction:
        if name in _GATE_REGISTRY:
            raise ValueError(f"a gate named {name!r} is already registered")
        _GATE_REGISTRY[name] = fn
        return fn

    return decorator


def get_gate(name: str) -> GateFunction:
    if name not in _GATE_REGISTRY:
        raise ValueError(
            f"unknown gate {name!r}; registered: {sorted(_GATE_REGISTRY)}. "
            f"Register yours with @recipe.model.moe.register_gate({name!r})"
        )
    return _GATE_REGISTRY[name]
