"""Moving tokens to their experts: the only module of the MoE layer that talks across ranks.

The layer hands a dispatcher its tokens ``x_SM``, the token of each kept (token, choice) pair in
(global) expert order, the pairs' combine weights and the pairs per expert. A dispatcher runs the
experts on those rows and returns ``out_SM``: each token's weighted sum of its experts' outputs.

* ``LocalDispatcher``: every expert is local (ep_size = 1); no communication.
* ``AllToAllDispatcher``: experts are spread over the expert-parallel (EP) group, rank r owning the
  contiguous block ``[r·E_local, (r+1)·E_local)``. Three steps, communication only in the middle:
  pre (counts per destination), all-to-all out, regroup by local expert, experts, un-regroup,
  all-to-all back.

Both also offer ``sum_over_data_parallel``: the balancing loss uses routing counts summed over the
data-parallel group, so its value and gradient do not depend on how the batch is split over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.utils import groups
from torch import nn

from .experts import combine, run_experts_indexed


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad_out.contiguous(), input_splits, output_splits, ctx.group), None, None, None


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over ``group``; returns a new tensor."""
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


class LocalDispatcher:
    """All experts on this rank. ``dp_group`` (optional) only serves ``sum_over_data_parallel``."""

    def __init__(self, dp_group=None):
        self.dp_group = dp_group

    def run(self, x_SM: torch.Tensor, token_of_pair_N: torch.Tensor, weight_N: torch.Tensor,
            tokens_per_expert: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        return run_experts_indexed(experts, x_SM, tokens_per_expert, token_of_pair_N, weight_N)

    def sum_over_data_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp_group is None or dist.get_world_size(self.dp_group) == 1:
            return tensor.detach()
        return _all_reduce_sum(tensor, self.dp_group)


class AllToAllDispatcher(LocalDispatcher):
    """Experts sharded over an expert-parallel group of ``ep_size`` ranks."""

    def __init__(self, ep_group, dp_group=None):
        super().__init__(dp_group)
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)

    def run(self, x_SM: torch.Tensor, token_of_pair_N: torch.Tensor, weight_N: torch.Tensor,
            tokens_per_expert: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        ep_size, num_local = self.ep_size, experts.num_local_experts
        if tokens_per_expert.numel() != ep_size * num_local:
            raise ValueError(
                f"routed over {tokens_per_expert.numel()} experts but the EP group holds {ep_size}x{num_local}"
            )
        # pre: how many rows go to each (destination rank, its local expert), and how many come back.
        send_counts = tokens_per_expert.to(torch.long).contiguous()  # (ep·E_local,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_EL = send_counts.view(ep_size, num_local)
        recv_EL = recv_counts.view(ep_size, num_local)  # [source rank, local expert]
        input_splits = send_EL.sum(dim=1).tolist()
        output_splits = recv_EL.sum(dim=1).tolist()

        # communication (the send buffer is the one (N, M) copy of the routed rows on this path)
        x_NM = x_SM.index_select(0, token_of_pair_N)
        x_recv = _AllToAll.apply(x_NM, output_splits, input_splits, self.ep_group)

        # post: rows arrive as (source, local expert); experts want them as (local expert, source).
        # run_experts_indexed reads them in that order and writes the results back in arrival order.
        segment = torch.arange(ep_size * num_local, device=x_SM.device).repeat_interleave(recv_counts)
        by_expert = torch.argsort(segment % num_local, stable=True)
        y_recv = run_experts_indexed(experts, x_recv, recv_EL.sum(dim=0), by_expert)

        y_NM = _AllToAll.apply(y_recv, input_splits, output_splits, self.ep_group)
        return combine(y_NM, token_of_pair_N, weight_N, x_SM.shape[0])  # weighted, into each pair's token


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> str:
    """Create DeepSpeed's ``ep_size_{N}`` expert / expert-data-parallel groups once; return the name."""
    world_size = dist.get_world_size()
    if world_size % ep_size != 0:
        raise ValueError(
            f"expert-parallel size {ep_size} must divide the world size {world_size}; "
            f"set ep_size to a divisor of the number of ranks"
        )
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size,
                                                use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return group_name


def expert_parallel_dispatcher(ep_size: int, use_data_before_expert_parallel: bool = False) -> LocalDispatcher:
    """The dispatcher for an ``ep_size`` layer, creating DeepSpeed's ``ep_size_{N}`` groups on first use.

    Called once per layer when the DeepSpeed engine sets up parallelism (``set_deepspeed_parallelism``).
    The groups are DeepSpeed's, so ZeRO reduces expert gradients over the matching expert-data-parallel
    group and saves one checkpoint file per expert.
    """
    if not dist.is_initialized():
        if ep_size > 1:
            raise RuntimeError(f"ep_size={ep_size} needs torch.distributed; launch with the deepspeed launcher")
        return LocalDispatcher()
    group_name = ensure_expert_groups(ep_size, use_data_before_expert_parallel)
    dp_group = groups._get_data_parallel_group()
    if ep_size == 1:
        return LocalDispatcher(dp_group)
    return AllToAllDispatcher(groups._get_expert_parallel_group(group_name), dp_group)


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's index inside its expert-parallel group (0 without distributed); creates the groups."""
    if ep_size == 1 or not dist.is_initialized():
        return 0
    return groups._get_expert_parallel_rank(ensure_expert_groups(ep_size))


def expert_data_parallel_rank(ep_size: int) -> int:
    """This rank's index among the ranks that hold the same experts (its expert-data-parallel group), the
    order in which ZeRO partitions those experts' optimizer state; 0 without distributed."""
    if not dist.is_initialized():
        return 0
    return groups._get_expert_data_parallel_rank(ensure_expert_groups(ep_size))


def expert_data_parallel_group(ep_size: int):
    """The process group of the ranks holding the same experts as this one (creates the groups); what ZeRO-3
    partitions this rank's experts over (``ShardedMoE``)."""
    return groups._get_expert_data_parallel_group(ensure_expert_groups(ep_size))
