"""GShard top-1 / top-2 gating as pure tensor functions (no torch.distributed here).

Notation: S tokens in the local group, E experts, k choices per token, N = S·k (token, choice) pairs.
A pair is identified by its flat index ``p = s·k + j`` into an ``[S, k]`` array.

Semantics (GShard, as DeepSpeed and InternEvo implement it):

* ``gates = softmax(logits)`` in fp32.
* capacity per expert: ``ceil(k·S/E·cf)``, at least ``min_capacity``, at most S (S counts routed
  tokens only; masked tokens are not routed). ``drop_tokens=False`` sets capacity to the largest load.
* top-1: expert = argmax (optionally argmax of logits + Gumbel noise, ``noisy_gate_policy="RSample"``);
  combine weight = the raw softmax probability of that expert (not renormalised).
* top-2: second expert = argmax of the other experts (``second_expert_policy="sampling"`` adds Gumbel
  noise while training); weights ``g1/(g1+g2)`` renormalised over the choices that survive the
  capacity cut, a lone survivor gets 1, a token with both choices dropped gets 0.
* overflow: an expert keeps the first ``capacity`` pairs in priority order. All first choices come
  before all second choices; within a choice, tokens are in position order, or in a random order
  with ``use_rts=True`` (Random Token Selection).
* balancing loss: ``me_e`` = mean gate probability of expert e, ``ce_e`` = fraction of tokens whose
  first choice is e (before dropping); ``l_aux = E · Σ_e me_e·ce_e`` (1 at perfect balance).
* router z-loss (ST-MoE): ``mean_s logsumexp(logits_s)²``, returned unweighted.

Two entry points to the same math: ``top_k_gating`` checks its arguments (for direct calls and for
user gates built on it); ``gshard_gating``, registered as ``"gshard"``, is what the MoE layer calls
every forward: it checks nothing, the layer checked its options once when it was built, and leaves
``l_aux`` to the layer, which computes it once (per rank or over the data-parallel group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, get_args

import torch
import torch.nn.functional as F

from ...config import NoisyGatePolicy, SecondExpertPolicy

NOISY_GATE_POLICIES = get_args(NoisyGatePolicy)  # (None, "Jitter", "RSample")
SECOND_EXPERT_POLICIES = get_args(SecondExpertPolicy)  # ("argmax", "sampling")


@dataclass
class GateOutput:
    """What a gating function decides for S tokens; every tensor lives on the logits' device."""

    expert_index: torch.Tensor  # (S, k) long: chosen experts, first choice in column 0
    combine_weight: torch.Tensor  # (S, k) fp32: output weight of each choice, 0 where dropped
    kept: torch.Tensor  # (S, k) bool: the pair fits in its expert's capacity
    capacity: int  # per-expert capacity used for this call
    tokens_per_expert: torch.Tensor  # (E,) long: kept pairs per expert
    sorted_pairs: torch.Tensor  # (n_kept,) long: flat ids s·k+j of kept pairs, grouped by expert in order
    # () fp32: GShard balancing loss over this group's tokens (``local_balancing_loss``); None from
    # ``gshard_gating``, whose caller, the layer, computes it (per rank or over the data-parallel group)
    l_aux: Optional[torch.Tensor]
    z_loss: torch.Tensor  # () fp32: router z-loss, unweighted
    gate_prob_mean: torch.Tensor  # (E,) fp32: me, mean softmax probability per expert
    first_choice_count: torch.Tensor  # (E,) fp32: tokens whose first choice is e (ce·S), before dropping
    router_entropy: torch.Tensor  # () fp32, detached: mean entropy of the gate distribution
    num_tokens: int  # tokens routed (mask applied)

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """``ceil(k·S/E·cf)`` floored at ``min_capacity`` and capped at S (an expert never needs more than S slots)."""
    capacity = math.ceil(k * num_tokens / num_experts * capacity_factor)
    return min(max(capacity, min_capacity), num_tokens)


def load_balancing_loss(gate_prob_mean: torch.Tensor, first_choice_fraction: torch.Tensor) -> torch.Tensor:
    """GShard auxiliary loss ``E · Σ_e me_e · ce_e``.

    ``gate_prob_mean`` (me) carries the gradient; ``first_choice_fraction`` (ce) is a count and has none.
    It equals 1 when both are uniform (1/E each) and grows as routing concentrates.
    """
    num_experts = gate_prob_mean.numel()
    return num_experts * torch.sum(gate_prob_mean * first_choice_fraction.detach())


def local_balancing_loss(gate_prob_mean: torch.Tensor, first_choice_count: torch.Tensor,
                         num_tokens: int) -> torch.Tensor:
    """``load_balancing_loss`` over one group's tokens: ce = first-choice count / routed tokens."""
    return load_balancing_loss(gate_prob_mean, first_choice_count / max(num_tokens, 1))


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise with the shape, dtype and device of ``x``."""
    uniform = torch.rand_like(x).clamp_(min=1e-20, max=1.0 - 1e-7)
    return -torch.log(-torch.log(uniform))


def assign_capacity(
    expert_index: torch.Tensor,
    num_experts: int,
    capacity: Optional[int],
    token_mask: Optional[torch.Tensor] = None,
    random_priority: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Decide which (token, choice) pairs fit in their expert, and group the kept ones by expert.

    Priority: all first choices, then all second choices; within a choice, token order (or a random
    order when ``random_priority``). One stable sort by expert id gives each pair its position in its
    expert's queue, O(N log N) with no (S, E) temporaries.

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
    # Pair ids in priority order: column-major over (S, k), so choice j=0 for every token comes first.
    if random_priority:
        token_order = torch.randperm(num_tokens, device=device)
    else:
        token_order = torch.arange(num_tokens, device=device)
    priority = (token_order.unsqueeze(0) * k + torch.arange(k, device=device).unsqueeze(1)).reshape(-1)  # (N,)
    expert_of_pair = expert_index
    if token_mask is not None:
        # Masked tokens get the sentinel expert id E: they sort last and are never kept.
        expert_of_pair = torch.where(token_mask.unsqueeze(1), expert_of_pair, num_experts)
    if random_priority:
        expert_in_priority = expert_of_pair.reshape(-1)[priority]
    else:
        expert_in_priority = expert_of_pair.t().reshape(-1)  # (k, S) flattened: the same order, no gather
    order = torch.argsort(expert_in_priority, stable=True)
    pairs_by_expert = priority[order]  # (N,) pair ids grouped by expert, priority order inside a group
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
) -> GateOutput:
    """GShard top-k gating (k in {1, 2}) for one group of tokens; see the module docstring.

    Checks its arguments (ValueError), then routes with ``gshard_gating`` and adds ``l_aux``.

    Args:
        logits: (S, E) router logits, any float dtype (computed on in fp32).
        k: experts per token, 1 or 2.
        capacity_factor: cf in ``ceil(k·S/E·cf)``; pass the eval factor when not training.
        min_capacity: lower bound on the capacity.
        drop_tokens: False keeps every pair (capacity = largest load).
        noisy_gate_policy: None, "Jitter" (applied to the router input by the caller, a no-op here)
            or "RSample" (Gumbel noise on the logits for choosing the first expert while training).
        use_rts: random token selection: a random order decides who is kept when an expert overflows.
        second_expert_policy: "argmax" or "sampling" (Gumbel noise for the 2nd expert while training).
        training: noise is only applied while training.
        token_mask: (S,) bool; False marks tokens (padding) that are neither routed nor counted in l_aux.
    """
    check_gating_inputs(logits, token_mask)
    check_gating_options(k, logits.shape[1], capacity_factor, min_capacity, noisy_gate_policy, second_expert_policy)
    out = gshard_gating(logits, k, capacity_factor, min_capacity, drop_tokens, noisy_gate_policy, use_rts,
                        second_expert_policy, training, token_mask)
    out.l_aux = local_balancing_loss(out.gate_prob_mean, out.first_choice_count, out.num_tokens)
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
) -> GateOutput:
    """``top_k_gating`` without argument checks and with ``l_aux=None``: the MoE layer's per-forward path.

    The arguments must already be valid (the layer checks them when it is built; a bad k or policy
    here would route wrongly, not fail).
    """
    logits = logits.float()
    gates = F.softmax(logits, dim=-1)  # (S, E)
    expert_index = choose_experts(logits, k, noisy_gate_policy, second_expert_policy, training)  # (S, k)

    num_tokens = logits.shape[0] if token_mask is None else int(token_mask.sum())
    num_experts = logits.shape[1]
    capacity = expert_capacity(num_tokens, num_experts, k, capacity_factor, min_capacity) if drop_tokens else None
    kept, sorted_pairs, tokens_per_expert, capacity = assign_capacity(
        expert_index, num_experts, capacity, token_mask, random_priority=use_rts
    )
    gate_prob_mean, first_choice_count, z_loss, entropy = router_statistics(
        logits, gates, expert_index[:, 0], token_mask, num_tokens
    )
    return GateOutput(
        expert_index=expert_index,
        combine_weight=combine_weights(gates, expert_index, kept),
        kept=kept,
        capacity=capacity,
        tokens_per_expert=tokens_per_expert,
        sorted_pairs=sorted_pairs,
        l_aux=None,
        z_loss=z_loss,
        gate_prob_mean=gate_prob_mean,
        first_choice_count=first_choice_count,
        router_entropy=entropy,
        num_tokens=num_tokens,
    )


def choose_experts(
    logits: torch.Tensor,
    k: int,
    noisy_gate_policy: NoisyGatePolicy,
    second_expert_policy: SecondExpertPolicy,
    training: bool,
) -> torch.Tensor:
    """(S, k) long: the first expert (argmax, with Gumbel noise under RSample while training), then for
    k=2 the argmax of the others (with Gumbel noise under "sampling" while training)."""
    choice_logits = logits
    if training and noisy_gate_policy == "RSample":
        choice_logits = logits + gumbel_like(logits)
    first = choice_logits.argmax(dim=-1)  # (S,)
    if k == 1:
        return first.unsqueeze(1)
    second_logits = logits + gumbel_like(logits) if training and second_expert_policy == "sampling" else logits
    second_logits = second_logits.scatter(1, first.unsqueeze(1), float("-inf"))  # rule out the first
    return torch.stack([first, second_logits.argmax(dim=-1)], dim=1)


def combine_weights(gates: torch.Tensor, expert_index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(S, k) output weight of each choice, 0 where dropped: the raw probability for top-1,
    renormalised over the surviving choices for top-2 (a lone survivor gets 1)."""
    chosen_gates = gates.gather(1, expert_index) * kept
    if expert_index.shape[1] == 1:
        return chosen_gates
    return chosen_gates / chosen_gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)


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


def check_gating_inputs(logits: torch.Tensor, token_mask: Optional[torch.Tensor]) -> None:
    """ValueError for tensors ``top_k_gating`` cannot route (the layer's router never makes these)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    check_token_mask(token_mask, logits.shape[0])


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
) -> None:
    """ValueError for a gating option out of range (``top_k_gating``'s checks; the layer checks its own k and
    capacity factors, and the policies through ``check_routing_policies``, once when it is built)."""
    if k not in (1, 2):
        raise ValueError(f"k (moe_gate_k) must be 1 or 2 for GShard gating, got {k}")
    if k > num_experts:
        raise ValueError(f"k={k} exceeds the number of experts {num_experts}; lower moe_gate_k or add experts")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    check_routing_policies(min_capacity, noisy_gate_policy, second_expert_policy)


def check_routing_policies(min_capacity: int, noisy_gate_policy: NoisyGatePolicy,
                           second_expert_policy: SecondExpertPolicy) -> None:
    """ValueError for ``min_capacity`` or a noise / second-expert policy out of range."""
    if min_capacity < 0:
        raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"noisy_gate_policy must be one of {NOISY_GATE_POLICIES}, got {noisy_gate_policy!r}")
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

    The function takes ``top_k_gating``'s arguments and returns a ``GateOutput``: start from
    ``top_k_gating`` and change its result, or choose experts your own way and let ``assign_capacity``
    and ``router_statistics`` fill in the capacity bookkeeping. A ``GateOutput.l_aux`` you set is the
    layer's balancing loss when it balances per rank; over the data-parallel group (the default) the
    layer computes it from ``gate_prob_mean``, ``first_choice_count`` and ``num_tokens``.
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
