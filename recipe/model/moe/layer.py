"""The MoE layer that fills an FFN slot: router -> gating -> dispatch -> experts -> weighted combine.

``MoEBase`` is the layer; two classes put it in front of the DeepSpeed engine, which treats MoE by class:

* ``MoE`` (ZeRO 0-2) also derives from ``deepspeed.moe.layer.MoE`` only so that the engine recognises it (it
  tests ``isinstance(module, MoE)``): it then puts expert parameters in their own optimizer groups, reduces
  their gradients over the expert-data-parallel group and saves one file per expert. None of DeepSpeed's MoE
  code runs: ``__init__`` and ``forward`` are ours.
* ``ShardedMoE`` (ZeRO-3) is invisible to that test, since the engine refuses ZeRO-3 for the class above.
  Its expert parameters carry the per-parameter tags that DeepSpeed's ZeRO-3 honours for any parameter (the
  ones its AutoEP layer sets): partitioned over the expert-data-parallel group instead of all ranks, gradients
  averaged over the data-parallel size, the grad norm summed over the expert-parallel group. The trainer marks
  the layer a ZeRO-3 leaf module (its parameters gathered once per call) and writes the per-expert checkpoint
  files itself (``recipe.training.checkpointing``). Facts and measurements: ../shared/DEEPSPEED-SCALE.md §1.

State dict: the router ``deepspeed_moe.gate.wg.weight`` (E, M), replicated, with aux-loss-free balancing its
bias ``deepspeed_moe.gate.e_score_correction_bias`` (E,), replicated, and the local experts under
``deepspeed_moe.experts``, one key set per expert as the engine's per-expert checkpoint cut expects (the
key forms are defined in ``recipe/model/expert_keys.py``). The bias is not called ``expert_bias`` in the
state dict because DeepSpeed's checkpointing treats every key of an MoE layer containing "expert" as a
routed expert's; ``e_score_correction_bias`` is also its name in Hugging Face's DeepSeek-V3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from ...config import BalanceLoss, CapacityPriority, NoisyGatePolicy, ScoreFunction, SecondExpertPolicy
from .dispatch import LocalDispatcher, expert_data_parallel_group, expert_parallel_dispatcher
from .experts import build_experts
from .gating import (GateOutput, balancing_loss, check_routing_options, check_routing_policies, check_token_mask,
                     get_gate)


@dataclass
class RoutingStats:
    """Detached routing figures of one layer call, for telemetry (rank-local; the trainer reduces)."""

    tokens_per_expert: torch.Tensor  # (E,) long: kept (token, choice) pairs per global expert
    first_choice_count: torch.Tensor  # (E,) fp32: tokens whose first choice is e
    choice_count: torch.Tensor  # (E,) fp32: tokens with e among their k choices, before dropping (the load)
    gate_prob_mean: torch.Tensor  # (E,) fp32
    router_entropy: torch.Tensor  # () fp32
    num_tokens: int  # routed tokens
    num_pairs_kept: int
    capacity: int
    k: int

    @property
    def drop_fraction(self) -> float:
        total = self.num_tokens * self.k
        return 0.0 if total == 0 else 1.0 - self.num_pairs_kept / total


class MoEOutput(NamedTuple):
    output: torch.Tensor  # same shape and dtype as the input
    l_aux: torch.Tensor  # () fp32 balancing loss of the layer's kind (1 at perfect balance)
    z_loss: torch.Tensor  # () fp32 router z-loss, unweighted
    stats: Optional[RoutingStats]  # None from layers without routing telemetry (DeepSpeed's baseline)


class Router(nn.Module):
    """Linear router kept in fp32 whatever the activation dtype (routing decisions are precision-sensitive).

    With ``bias_balancing`` it holds the aux-loss-free balancing bias (DeepSeek-V3), a persistent (E,) buffer:
    the trainer updates it after each applied optimizer step (``recipe.training.balancing``); the gate adds it
    to the scores to choose experts only. It stays fp32 when the model is cast to bf16/fp16: its steps
    (``moe_bias_update_rate``, ~1e-3) would vanish in 8 bits of mantissa.
    """

    def __init__(self, hidden_size: int, num_experts: int, jitter_eps: float = 0.0, bias_balancing: bool = False):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.jitter_eps = jitter_eps
        if bias_balancing:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            # A dtype cast (model.bfloat16(), the engine's fp16/bf16 set-up): keep the fp32 values, on the new device.
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def forward(self, x_SM: torch.Tensor) -> torch.Tensor:
        x_SM = x_SM.float()
        if self.training and self.jitter_eps > 0:
            # Multiplicative jitter (Switch Transformer) on the router input only.
            x_SM = x_SM * torch.empty_like(x_SM).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return nn.functional.linear(x_SM, self.wg.weight.float())  # (S, E) fp32


class MoECore(nn.Module):
    """Holds the router and the local experts under the names DeepSpeed's checkpointing looks for."""

    def __init__(self, gate: Router, experts: nn.Module):
        super().__init__()
        self.gate = gate
        self.experts = experts


def _check_layer_options(num_experts: int, ep_size: int, k: int, capacity_factor: float,
                         eval_capacity_factor: float, min_capacity: int, noisy_gate_policy: NoisyGatePolicy,
                         second_expert_policy: SecondExpertPolicy, use_rts: bool, routing_options: dict) -> None:
    """ValueError for an ``MoE`` option out of range: checked once, when the layer is built."""
    if num_experts < 1 or ep_size < 1 or num_experts % ep_size != 0:
        raise ValueError(
            f"num_experts ({num_experts}) must be a positive multiple of ep_size ({ep_size}); "
            f"change num_experts or the expert-parallel size"
        )
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    check_routing_policies(min_capacity, noisy_gate_policy, second_expert_policy)
    check_routing_options(k, num_experts, use_rts=use_rts, noisy_gate_policy=noisy_gate_policy, **routing_options)


def _local_experts(expert: str, num_local_experts: int, hidden_size: int, intermediate_size: int,
                   group_name: str) -> nn.Module:
    """This rank's experts, each parameter tagged the way DeepSpeed's ZeRO and optimizer grouping recognise an
    expert's (not all-reduced over all ranks: over the expert-data-parallel group ``group_name``)."""
    experts = build_experts(expert, num_local_experts, hidden_size, intermediate_size)
    for param in experts.parameters():
        param.allreduce = False
        param.group_name = group_name
    return experts


class MoEBase(nn.Module):
    """Mixture-of-Experts FFN with top-k gating (GShard semantics by default) and index-based dispatch.

    Args:
        hidden_size: M, input and output width.
        num_experts: E, experts in total over the expert-parallel group.
        k: experts per token, 1..E.
        capacity_factor / eval_capacity_factor: cf in training / eval.
        min_capacity: lower bound on the per-expert capacity.
        drop_tokens: False disables the capacity cut (no token is ever dropped).
        ep_size: expert-parallel size; this rank holds ``num_experts // ep_size`` experts.
        intermediate_size: F, hidden width of each expert.
        expert: registered expert name ("swiglu" or one added with ``register_expert``).
        gate: registered gate name ("gshard" or one added with ``register_gate``).
        noisy_gate_policy: None, "Jitter" (``jitter_eps`` on the router input) or "RSample".
        use_rts: random token selection on overflow.
        second_expert_policy: "argmax" or "sampling".
        balance_over_data_parallel: compute the balancing loss from routing counts summed over the
            data-parallel group (one all-reduce of E numbers), making the loss independent of how the
            global batch is split over ranks. False gives DeepSpeed's per-rank loss. The "sequence" loss
            is per sequence by definition and ignores it.
        score_function, norm_topk_prob, route_scale, capacity_priority, balance_loss, num_expert_groups,
            topk_groups: the routing options of ``recipe.model.moe.gating`` (formulas there).
        bias_balancing: hold an aux-loss-free balancing bias (``Router``), which the trainer updates.

    ``forward(hidden_states, token_mask=None)`` takes ``(..., M)`` and an optional bool mask of the
    leading shape (False = padding: not routed, output 0, not counted in the loss) and returns
    ``MoEOutput(output, l_aux, z_loss, stats)``.

    Options are checked here, once (ValueError); ``forward`` only checks the mask it is given.
    Build ``MoE`` or ``ShardedMoE`` (below), which differ only in how the DeepSpeed engine sees them.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        ep_size: int = 1,
        intermediate_size: Optional[int] = None,
        expert: str = "swiglu",
        gate: str = "gshard",
        noisy_gate_policy: NoisyGatePolicy = None,
        use_rts: bool = False,
        second_expert_policy: SecondExpertPolicy = "argmax",
        balance_over_data_parallel: bool = True,
        jitter_eps: float = 1e-2,
        score_function: ScoreFunction = "softmax",
        norm_topk_prob: Optional[bool] = None,
        route_scale: float = 1.0,
        capacity_priority: CapacityPriority = "choice",
        balance_loss: BalanceLoss = "gshard",
        bias_balancing: bool = False,
        num_expert_groups: int = 1,
        topk_groups: int = 1,
    ):
        nn.Module.__init__(self)  # (in MoE: DeepSpeed's MoE.__init__ would build its own gate and experts)
        self.routing_options = dict(score_function=score_function, norm_topk_prob=norm_topk_prob,
                                    route_scale=route_scale, capacity_priority=capacity_priority,
                                    balance_loss=balance_loss, num_expert_groups=num_expert_groups,
                                    topk_groups=topk_groups)
        _check_layer_options(num_experts, ep_size, k, capacity_factor, eval_capacity_factor, min_capacity,
                             noisy_gate_policy, second_expert_policy, use_rts, self.routing_options)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.noisy_gate_policy = noisy_gate_policy
        self.use_rts = use_rts
        self.second_expert_policy = second_expert_policy
        self.balance_over_data_parallel = balance_over_data_parallel
        self.gate_fn = get_gate(gate)
        if intermediate_size is None:
            intermediate_size = 4 * hidden_size
        experts = _local_experts(expert, self.num_local_experts, hidden_size, intermediate_size, self.expert_group_name)
        jitter = jitter_eps if noisy_gate_policy == "Jitter" else 0.0
        self.deepspeed_moe = MoECore(Router(hidden_size, num_experts, jitter, bias_balancing), experts)
        self.dispatcher: Optional[LocalDispatcher] = LocalDispatcher() if ep_size == 1 else None

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize`` (or by hand after ``deepspeed.init_distributed``)."""
        self.dispatcher = expert_parallel_dispatcher(self.ep_size, use_data_before_expert_parallel_,
                                                     getattr(self.deepspeed_moe.experts, "tp_size", 1))

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed's own route to group creation; its version expects DeepSpeed's MOELayer inside.
        self.set_deepspeed_parallelism(use_data_before_expert_parallel_)

    def forward(self, hidden_states: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> MoEOutput:
        if self.dispatcher is None:
            raise RuntimeError(
                f"MoE layer with ep_size={self.ep_size} has no expert-parallel group yet: build the model "
                f"before deepspeed.initialize(...) (which sets it up) or call set_deepspeed_parallelism()"
            )
        leading_shape, hidden = hidden_states.shape[:-1], hidden_states.shape[-1]
        x_SM = hidden_states.reshape(-1, hidden)
        mask_S = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        check_token_mask(mask_S, x_SM.shape[0])
        k = self.k

        logits_SE = self.deepspeed_moe.gate(x_SM)
        gate: GateOutput = self.gate_fn(
            logits_SE,
            k,
            capacity_factor=self.capacity_factor if self.training else self.eval_capacity_factor,
            min_capacity=self.min_capacity,
            drop_tokens=self.drop_tokens,
            noisy_gate_policy=self.noisy_gate_policy,
            use_rts=self.use_rts,
            second_expert_policy=self.second_expert_policy,
            training=self.training,
            token_mask=mask_S,
            expert_bias=self.deepspeed_moe.gate.e_score_correction_bias,
            sequence_length=leading_shape[-1] if len(leading_shape) >= 2 else None,
            **self.routing_options,
        )
        l_aux = self._balancing_loss(gate)

        # One entry per kept (token, choice) pair, grouped by expert: its token and its combine weight.
        token_of_pair_N = torch.div(gate.sorted_pairs, k, rounding_mode="floor")
        weight_N = gate.combine_weight.reshape(-1).index_select(0, gate.sorted_pairs).to(x_SM.dtype)
        out_SM = self.dispatcher.run(x_SM, token_of_pair_N, weight_N, gate.tokens_per_expert,
                                     self.deepspeed_moe.experts)

        stats = RoutingStats(
            tokens_per_expert=gate.tokens_per_expert.detach(),
            first_choice_count=gate.first_choice_count.detach(),
            choice_count=gate.choice_count.detach(),
            gate_prob_mean=gate.gate_prob_mean.detach(),
            router_entropy=gate.router_entropy.detach(),
            num_tokens=gate.num_tokens,
            num_pairs_kept=int(gate.sorted_pairs.numel()),
            capacity=gate.capacity,
            k=k,
        )
        return MoEOutput(out_SM.view(*leading_shape, hidden), l_aux, gate.z_loss, stats)

    def _balancing_loss(self, gate: GateOutput) -> torch.Tensor:
        """l_aux, computed here once: from routing counts summed over the data-parallel group (one all-reduce of
        E+1 numbers), or per rank, where a user gate's own ``l_aux`` is kept. The "sequence" loss comes from the
        gate (per sequence, so the same on any split of the batch)."""
        kind = self.routing_options["balance_loss"]
        if kind == "sequence":
            return gate.l_aux
        counts = gate.balance_counts(kind)
        if self.balance_over_data_parallel:
            counts = torch.cat([counts, counts.new_tensor([gate.num_tokens])])
            counts = self.dispatcher.sum_over_data_parallel(counts)
            return balancing_loss(kind, gate.gate_prob_mean, counts[:-1], counts[-1], self.k)
        if gate.l_aux is not None:
            return gate.l_aux
        return balancing_loss(kind, gate.gate_prob_mean, counts, gate.num_tokens, self.k)


class MoE(MoEBase, DeepSpeedMoE):
    """The layer for ZeRO stages 0-2 (and no engine): the DeepSpeed engine recognises it as an MoE layer.
    ``MoEBase`` comes first in the bases, so its ``__init__``, ``forward`` and group set-up are the ones used."""


# DeepSpeed's ZeRO-3 placement tags (the values its AutoEP layer gives routed experts): the family makes ZeRO-3
# average expert gradients over the data-parallel size and sum their grad norm over the expert-parallel group;
# the process group is what their partitions are split over.
ZERO3_EXPERT_FAMILY = "autoep_expert"


class ShardedMoE(MoEBase):
    """The layer for ZeRO stage 3: not a ``deepspeed.moe.layer.MoE`` (the engine refuses ZeRO-3 for those), its
    experts tagged so that ZeRO-3 partitions each over the ranks holding the same experts (expert-data-parallel
    group) and reduces it there, as ZeRO-2 does for ``MoE``. Dense parameters (router included) are partitioned
    over all ranks as usual."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.deepspeed_moe.experts.parameters():
            if hasattr(param, "ds_id"):  # built under deepspeed.zero.Init: partitioned over all ranks already
                raise RuntimeError("ShardedMoE was built inside deepspeed.zero.Init, which partitions each expert "
                                   "over all ranks before the layer can tag it; build the model outside zero.Init")
            param.ds_zero_placement_family = ZERO3_EXPERT_FAMILY
            param.ds_zero_partition_group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize`` before it partitions the parameters."""
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        group = expert_data_parallel_group(self.ep_size)
        for param in self.deepspeed_moe.experts.parameters():
            param.ds_zero_partition_process_group = group
