"""Which expert a state-dict key belongs to, and the two forms expert weights take. The one home of that rule.

An MoE layer keeps its local experts (an "expert group") at ``{layer}.deepspeed_moe.experts``: DeepSpeed's
attribute path, the same in our layer and in DeepSpeed's. Expert weights are named in two forms:

per-expert  ``...deepspeed_moe.experts.deepspeed_experts.{i}.{rest}``, e.g. ``...deepspeed_experts.3.w1.weight``
            What every state dict shows, and what DeepSpeed's engine cuts into one file per expert
            (``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``): its checkpoint code matches
            ``.deepspeed_moe.experts.deepspeed_experts.{i}``.
stacked     ``...deepspeed_moe.experts.w1``: (E_local, F, M), likewise ``w3``; ``w2`` is (E_local, M, F)
            A parameter name only (``SwiGLUExperts``): its state-dict hooks show slice ``i`` of ``w1`` as the
            per-expert key ``...deepspeed_experts.{i}.w1.weight``.

The expert id ``i`` is local (0 .. E_local-1 on each expert-parallel rank: what a live model names) or
global (``ep_rank · E_local + local id``: what DeepSpeed's expert files, consolidated checkpoints, init and
resharding name). Pure string functions; no torch.distributed.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Optional

# The module list of per-expert modules: DeepSpeed's checkpoint cut looks for keys under this name.
EXPERT_LIST_NAME = "deepspeed_experts"
# Where an MoE layer keeps its expert group.
EXPERT_GROUP_PATH = "deepspeed_moe.experts"
# The stacked weights of an expert group, each the stack of one per-expert ``{name}.weight``.
STACKED_WEIGHTS = ("w1", "w2", "w3")

# Non-greedy group: the first ``deepspeed_experts.{digits}.`` in the key decides.
_PER_EXPERT = re.compile(rf"(?P<group>|.*?\.){EXPERT_LIST_NAME}\.(?P<expert>\d+)\.(?P<rest>.+)")
_STACKED = re.compile(rf"(?P<group>(?:.*\.)?{re.escape(EXPERT_GROUP_PATH)}\.)(?P<weight>{'|'.join(STACKED_WEIGHTS)})")


class ExpertKey(NamedTuple):
    """A per-expert key cut in three: ``f"{group}{EXPERT_LIST_NAME}.{expert}.{rest}"``."""

    group: str  # the expert group's prefix: "" or ending in ".", e.g. "blocks.0.ffn.deepspeed_moe.experts."
    expert: int  # local or global id, as the key had it
    rest: str  # the name inside the expert, e.g. "w1.weight"


def expert_key(group: str, expert: int, rest: str) -> str:
    """The per-expert key of ``rest`` in expert ``expert`` of the group with prefix ``group``."""
    return f"{group}{EXPERT_LIST_NAME}.{expert}.{rest}"


def parse_expert_key(key: str) -> Optional[ExpertKey]:
    """``key`` cut into (group prefix, expert id, rest), or None for a key of no single expert."""
    match = _PER_EXPERT.fullmatch(key)
    if match is None:
        return None
    return ExpertKey(match["group"], int(match["expert"]), match["rest"])


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter or state-dict name (either form) lies in an expert group."""
    return f".{EXPERT_GROUP_PATH}." in f".{name}"


def local_to_global(key: str, ep_rank: int, num_local_experts: int) -> str:
    """A per-expert key with its local id replaced by the global id on ``ep_rank``; other keys unchanged."""
    parsed = parse_expert_key(key)
    if parsed is None:
        return key
    if parsed.expert >= num_local_experts:
        raise ValueError(f"{key}: local expert id {parsed.expert} but a rank holds {num_local_experts} experts")
    return expert_key(parsed.group, ep_rank * num_local_experts + parsed.expert, parsed.rest)


def global_to_local(key: str, ep_rank: int, num_local_experts: int) -> Optional[str]:
    """A per-expert key with its global id replaced by the local id on ``ep_rank``, or None where that rank
    does not hold the expert; other keys unchanged."""
    parsed = parse_expert_key(key)
    if parsed is None:
        return key
    local = parsed.expert - ep_rank * num_local_experts
    if not 0 <= local < num_local_experts:
        return None
    return expert_key(parsed.group, local, parsed.rest)


def parse_stacked(name: str) -> Optional[tuple[str, str]]:
    """(group prefix, weight) of a stacked parameter name such as ``...deepspeed_moe.experts.w1``, else None."""
    match = _STACKED.fullmatch(name)
    return None if match is None else (match["group"], match["weight"])


def stacked_keys(group: str, weight: str, expert_ids: Iterable[int]) -> list[str]:
    """The per-expert keys of stacked ``weight``'s slices, one per id in ``expert_ids``."""
    return [expert_key(group, i, f"{weight}.weight") for i in expert_ids]


def global_keys(name: str, ep_rank: int, num_local_experts: int) -> list[str]:
    """The keys with global expert ids that local parameter ``name`` on ``ep_rank`` covers, in order:
    one per local expert for a stacked weight, else the single (renumbered) key."""
    stacked = parse_stacked(name)
    if stacked is None:
        return [local_to_global(name, ep_rank, num_local_experts)]
    first = ep_rank * num_local_experts
    return stacked_keys(*stacked, range(first, first + num_local_experts))


def shard_experts(state: dict, ep_rank: int, num_local_experts: int) -> dict:
    """From a whole-model state dict (global expert ids), the entries an ``ep_rank`` shard holds, renumbered
    to local ids; non-expert entries pass through. The inverse of what ``consolidated_state_dict`` gathers."""
    local = {}
    for key, value in state.items():
        local_key = global_to_local(key, ep_rank, num_local_experts)
        if local_key is not None:
            local[local_key] = value
    return local
