"""Moving tokens to their experts: the only module of the MoE layer that talks across ranks.

The layer hands a dispatcher its tokens ``x_SM``, the token of each kept (token, choice) pair in
(global) expert order, the pairs' combine weights and the pairs per expert. A dispatcher runs the
experts on those rows and returns ``out_SM``: each token's weighted sum of its experts' outputs.

* ``LocalDispatcher``: every expert is local (ep_size = 1); no communication.
* ``AllToAllDispatcher``: experts are spread over the expert-parallel (EP) group, rank r owning the
  contiguous block ``[r·E_local, (r+1)·E_local)``. Three steps, communication only in the middle:
  pre (counts per destination), all-to-all out, regroup by local expert, experts, un-regroup,
  all-to-all back.

* ``TensorParallelExperts``: wraps either when every expert's F is split over a tensor-parallel (TP) group whose
  ranks hold the same tokens: Megatron's *f* (identity forward, all-reduce backward) on the tokens and on the
  combine weights, *g* (all-reduce forward) on the combined output. The combine is linear in the expert outputs,
  so one forward all-reduce per layer suffices; without *f* on the weights the router's gradient would miss the
  other ranks' shares.

All offer ``sum_over_data_parallel``: the balancing loss uses routing counts summed over the
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


class _CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the TP ranks' gradients (each saw part of the experts)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: forward sums the TP ranks' partial outputs; backward passes the (replicated) gradient on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


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


class TensorParallelExperts:
    """A dispatcher (local or all-to-all) over experts whose F is split over ``tp_group``."""

    def __init__(self, inner: LocalDispatcher, tp_group):
        self.inner = inner
        self.tp_group = tp_group

    def run(self, x_SM: torch.Tensor, token_of_pair_N: torch.Tensor, weight_N: torch.Tensor,
            tokens_per_expert: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        x_SM = _CopyToTensorParallel.apply(x_SM, self.tp_group)
        weight_N = _CopyToTensorParallel.apply(weight_N, self.tp_group)
        partial_SM = self.inner.run(x_SM, token_of_pair_N, weight_N, tokens_per_expert, experts)
        return _ReduceFromTensorParallel.apply(partial_SM, self.tp_group)

    def sum_over_data_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.inner.sum_over_data_parallel(tensor)


# ---- Process groups. TP peers hold the same tokens, so expert-parallel groups must lie inside one data-parallel
# group (same TP rank): made before the TP mesh, DeepSpeed's TP-unaware groups would pair TP peers, and every
# expert would see its tokens twice (doubled expert gradients, no error; DEEPSPEED-SCALE.md §2). Hence one entry
# point, ``create_parallel_groups``, that builds the mesh first, and a record of the TP size each EP group was
# made under, which ``check_group_order`` compares before the engine starts.
_EP_GROUPS_MADE_AT_TP: dict[str, int] = {}


def tensor_parallel_size() -> int:
    """The TP mesh's size (1 when none was made)."""
    if not dist.is_initialized() or groups.mpu is None:
        return 1
    return groups.get_tensor_model_parallel_world_size()


def tensor_parallel_rank() -> int:
    return groups.get_tensor_model_parallel_rank() if tensor_parallel_size() > 1 else 0


def create_parallel_groups(tp_size: int, ep_size: int) -> None:
    """The TP x data-parallel mesh (ranks r·tp .. r·tp+tp-1 form a TP group), then ``ep_size`` expert groups inside
    each data-parallel group. DeepSpeed's engine finds the mesh made and keeps it."""
    if tp_size > 1 and tensor_parallel_size() != tp_size:
        if _EP_GROUPS_MADE_AT_TP:
            raise RuntimeError(f"expert-parallel groups {sorted(_EP_GROUPS_MADE_AT_TP)} were made before the "
                               f"tensor-parallel mesh; they would pair TP peers (doubled expert gradients). Call "
                               f"create_parallel_groups before anything builds expert groups")
        if groups.mpu is not None:
            raise RuntimeError(f"a tensor-parallel mesh of size {tensor_parallel_size()} exists; this run asks "
                               f"for {tp_size}")
        groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
        groups.mpu = groups
    ensure_expert_groups(ep_size)


def check_group_order(tp_size: int) -> None:
    """Refuse to start an engine whose expert groups were made for another TP size than its mesh's."""
    if tensor_parallel_size() != tp_size:
        raise RuntimeError(f"the run has TP {tp_size} but the process groups were made for TP "
                           f"{tensor_parallel_size()}; call create_parallel_groups({tp_size}, ep_size) first")
    wrong = {name: tp for name, tp in _EP_GROUPS_MADE_AT_TP.items() if tp != tp_size}
    if wrong:
        raise RuntimeError(f"expert-parallel groups {sorted(wrong)} were made before the TP {tp_size} mesh (at TP "
                           f"{sorted(set(wrong.values()))}); they pair TP peers: make the mesh first "
                           f"(create_parallel_groups)")


def ensure_expert_groups(ep_size: int, use_data_before_expert_parallel: bool = False) -> str:
    """Create DeepSpeed's ``ep_size_{N}`` expert / expert-data-parallel groups once; return the name. With a TP
    mesh, inside each data-parallel group (DeepSpeed's "E + M + D" layout)."""
    tp_size, world_size = tensor_parallel_size(), dist.get_world_size()
    if (world_size // tp_size) % ep_size != 0:
        raise ValueError(
            f"expert-parallel size {ep_size} must divide the data-parallel size {world_size // tp_size}; "
            f"set ep_size to a divisor of the number of ranks / TP"
        )
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        if tp_size > 1:
            groups._create_expert_data_and_model_parallel(
                ep_size, mpu=groups.mpu, use_data_before_expert_parallel_=use_data_before_expert_parallel)
        else:
            groups._create_expert_and_data_parallel(
                ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
        _EP_GROUPS_MADE_AT_TP[group_name] = tp_size
    return group_name


def expert_parallel_dispatcher(ep_size: int, use_data_before_expert_parallel: bool = False,
                               experts_tp_size: int = 1) -> LocalDispatcher:
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
        dispatcher = LocalDispatcher(dp_group)
    else:
        dispatcher = AllToAllDispatcher(groups._get_expert_parallel_group(group_name), dp_group)
    if experts_tp_size == 1:
        return dispatcher
    if experts_tp_size != tensor_parallel_size():
        raise RuntimeError(f"the experts are split over TP {experts_tp_size}, the mesh has TP "
                           f"{tensor_parallel_size()}")
    return TensorParallelExperts(dispatcher, groups.get_tensor_model_parallel_group())


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
