"""Per-rank memory planner: what one rank of a launch will hold, before you launch it.

    python -m recipe.memory --config recipe/configs/qwen3_moe_30b_a3b.py --ds_config ds_configs/zero1_bf16_ep2.json \
        --nproc 8 --ep_size 4 --tp_size 2

Reads the config and the DeepSpeed JSON exactly as the trainer does (``--set`` overrides, validation) and prints
one line naming the run and a table of this rank's bytes: the module's parameters (dense and expert), gradients,
optimizer state (fp32 master copy where DeepSpeed keeps one, plus the moments), communication buffers, one
micro-batch's activations and the total. No model is built: parameter shapes come from the config
(``parameter_shapes``, held to ``TransformerLM`` by the tests), so a 30B config plans in milliseconds.

What DeepSpeed 0.19.8 allocates, per stage (read from its code, measured on real engines by tests/test_memory.py):

* ZeRO-0 fp32: torch's optimizer on the module's parameters; moments fp32, no master copy. bf16/fp16:
  ``FP16_UnfusedOptimizer`` (the JSON's optimizer is torch's, not DeepSpeed's FusedAdam), a full fp32 master copy
  and fp32 moments on every rank, and fp32 copies of all gradients during ``step``. The all-reduce flattens up
  to 5e8 gradient elements into one buffer.
* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each optimizer group (decay, no-decay, experts: DeepSpeed's split) is one
  flat buffer of module-dtype parameters on every rank, padded to 2·dp elements; a separate fp32 master partition
  (even in fp32 training) and the moments, over dp (dense: all ranks; experts: the expert-data-parallel group).
  After backward (ZeRO-1 and 2 alike) a rank holds the gradients of every parameter that overlaps its partition,
  whole: one module-dtype buffer (``grads_in_partition``) of them, over all groups, that the step's partition
  slices (``averaged_gradients``) keep alive, plus zeros where no parameter fills a partition; gradients outside
  it are dropped (the expert groups' partitions are over the expert-data-parallel group). ZeRO-1 holds every
  gradient, full size, until the end of backward. Backward allocates a reduce bucket of
  ``reduce_bucket_size`` elements (two with ``overlap_comm``), whatever the model's size.
  ZeRO-1 with bf16 and ``data_types.grad_accum_dtype: fp32`` is ``BF16_Optimizer``: full fp32 gradients.
* ZeRO-3: each parameter partitioned over its group (experts over the expert-data-parallel group, the recipe's
  placement), ``ceil(numel / group)`` elements; parameters of at most ``stage3_param_persistence_threshold``
  elements are also kept whole once gathered (not where the group is one rank: the partition is the parameter).
  Gradient partitions in the grad-accumulation dtype; a separate fp32 master partition, in fp32 training too;
  the reduce bucket is allocated at start-up and held; the step adds the fp32 gradients of one sub-group.
  Forward and backward gather a module's parameters (an MoE layer's all at once) plus the prefetch bucket, each
  twice while the all-gather's flat buffer lives.

Tensor parallelism (``tp_size``, DeepSpeed's ``tensor_parallel.autotp_size``), Megatron-style as the trainer
shards: each TP rank holds 1/tp of attention's ``wqkv`` (q, k and v split by heads; its bias too) and ``wo``, of
the dense and shared-expert SwiGLUs, and of every routed expert along its intermediate size F; the embedding,
lm_head, every RMSNorm (q_norm / k_norm included), the router and ``shared_gate`` are whole on every TP rank.
TP groups are consecutive ranks, so rank r is data-parallel rank r // tp of dp = world / tp: ZeRO divides dense
state over dp, and experts over the expert-data-parallel group, dp / ep = world / (tp·ep) (EP groups inside the
DP group, DeepSpeed's E+M+D layout). Activations: the per-head and F-sized tensors are divided by tp, the
residual-stream ones, the router's and the logits are not (TP peers see the same micro-batch). Communication
buffers and bucket sizes are as without TP. ZeRO-3 with tp > 1 is refused, as the trainer refuses it (expert-TP
shards would miss the model-parallel reduction of the gradient norm).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .config import ConfigError, RecipeConfig, load_config, parameter_counts
from .ds_config import DSConfig, check_tensor_parallel_model, read_ds_config, resolve_ds_config
from .model.expert_keys import is_expert_parameter

GIB = 1024 ** 3
FP32 = 4
ALLREDUCE_BUCKET_NUMEL = 500_000_000  # ZeRO-0: the engine's allreduce_gradients bucket (MEMORY_OPT_ALLREDUCE_SIZE)
ALIGNMENT_PER_RANK = 2  # ZeRO-1/2 and BF16_Optimizer pad each flat group to a multiple of 2·dp elements
# Moments per parameter of the optimizer types the JSON may name (lower-case); others are assumed Adam-like.
MOMENTS = {"adam": 2, "adamw": 2, "fusedadam": 2, "cpuadam": 2, "lamb": 2, "fusedlamb": 2, "lion": 1, "adagrad": 1}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


@dataclass
class RankMemory:
    """Bytes one rank holds. ``total`` adds the activations and backward buffers (they coexist at the backward's
    peak) or the optimizer step's transient copies, whichever is larger: activations are freed before the step."""

    dense_params: int  # this rank's share of non-expert parameters (module copy, the training dtype)
    expert_params: int  # this rank's share of expert parameters (module copy)
    grads: int  # gradient storage this rank holds between backward and the optimizer step
    optimizer: int  # fp32 master partition (where DeepSpeed keeps one) + the optimizer's moments
    activations: int  # estimate for one micro-batch forward+backward (0 in measure_engine)
    buffers: int = 0  # communication buffers and not-yet-reduced gradients at the backward's peak
    step_buffers: int = 0  # transient fp32 gradient copies inside the optimizer step

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def total(self) -> int:
        held = self.params + self.grads + self.optimizer
        return held + max(self.activations + self.buffers, self.step_buffers)


@dataclass(frozen=True)
class Activations:
    """One micro-batch. ``saved``: what autograd keeps when the forward ends, plus the logits it returns (what
    ``saved_tensors_hooks`` sees, and the output). ``peak``: at the start of backward, ``saved`` plus the loss's
    two (S, V) fp32 gradients and, with activation checkpointing, one block's full set being recomputed."""

    saved: int
    peak: int


# ---- parameter shapes, from the config --------------------------------------------------------------------------


def _swiglu_shapes(prefix: str, hidden: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}w1.weight", (width, hidden)), (f"{prefix}w3.weight", (width, hidden)),
            (f"{prefix}w2.weight", (hidden, width))]


def _attention_shapes(prefix: str, config: RecipeConfig, tp_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """wqkv's rows and wo's columns are this TP rank's heads; the q/k norms are whole on every TP rank."""
    m = config.model
    q_size, kv_size = m.num_attention_heads * m.resolved_head_dim, m.resolved_kv_heads * m.resolved_head_dim
    local_qkv, local_q = (q_size + 2 * kv_size) // tp_size, q_size // tp_size
    shapes = [(f"{prefix}wqkv.weight", (local_qkv, m.hidden_size))]
    if m.qkv_bias:
        shapes.append((f"{prefix}wqkv.bias", (local_qkv,)))
    shapes.append((f"{prefix}wo.weight", (m.hidden_size, local_q)))
    if m.qk_norm != "none":
        per_head = m.qk_norm == "head"
        shapes += [(f"{prefix}q_norm.weight", (m.resolved_head_dim if per_head else q_size,)),
                   (f"{prefix}k_norm.weight", (m.resolved_head_dim if per_head else kv_size,))]
    return shapes


def _moe_shapes(prefix: str, config: RecipeConfig, ep_size: int, tp_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """The MoE FFN slot: router, this rank's experts (stacked, or one module each for DeepSpeed's layer; F / tp
    wide), and the shared experts (F / tp wide) with their gate, which live beside the MoE module."""
    m = config.model
    hidden, width, local = m.hidden_size, m.expert_size // tp_size, m.num_experts // ep_size
    shapes = [(f"{prefix}ffn.deepspeed_moe.gate.wg.weight", (m.num_experts, hidden))]
    experts = f"{prefix}ffn.deepspeed_moe.experts."
    if m.moe_impl == "deepspeed":
        for i in range(local):
            shapes += _swiglu_shapes(f"{experts}deepspeed_experts.{i}.", hidden, width)
    elif m.moe_expert == "swiglu":
        shapes += [(f"{experts}w1", (local, width, hidden)), (f"{experts}w3", (local, width, hidden)),
                   (f"{experts}w2", (local, hidden, width))]
    else:
        raise ConfigError(f"`model.moe_expert={m.moe_expert!r}`: the memory planner knows the shapes of the built-in "
                          f"'swiglu' expert only; plan with moe_expert='swiglu' of the same width")
    if m.moe_num_shared_experts > 0:
        shapes += _swiglu_shapes(f"{prefix}shared_mlp.", hidden, m.shared_expert_size // tp_size)
    if m.moe_shared_expert_gate:
        shapes.append((f"{prefix}shared_gate.weight", (1, hidden)))
    return shapes


def _check_tp_divides_model(config: RecipeConfig, tp_size: int) -> None:
    """The trainer's check (``estimate`` may get a DSConfig that ``resolve_ds_config`` did not make)."""
    if tp_size > 1:
        check_tensor_parallel_model(config, tp_size, f"tp_size {tp_size}")


def parameter_shapes(config: RecipeConfig, ep_size: int = 1, tp_size: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of ``TransformerLM(config, ep_size).named_parameters()``, in that order, on one rank
    (its ``num_experts // ep_size`` experts), without building the model; with ``tp_size`` > 1 one TP rank's
    shards (the module docstring says which)."""
    _check_tp_divides_model(config, tp_size)
    m = config.model
    shapes = [("embedding.weight", (m.vocab_size, m.hidden_size))]
    moe_layers = set(config.moe_layer_ids())
    for layer in range(m.num_layers):
        prefix = f"blocks.{layer}."
        shapes.append((f"{prefix}attention_norm.weight", (m.hidden_size,)))
        shapes += _attention_shapes(f"{prefix}attention.", config, tp_size)
        shapes.append((f"{prefix}ffn_norm.weight", (m.hidden_size,)))
        if layer in moe_layers:
            shapes += _moe_shapes(prefix, config, ep_size, tp_size)
        else:
            shapes += _swiglu_shapes(f"{prefix}ffn.", m.hidden_size, m.ffn_size // tp_size)
    shapes.append(("norm.weight", (m.hidden_size,)))
    if not m.tie_word_embeddings:  # tied: named_parameters() lists the shared tensor once, as the embedding
        shapes.append(("lm_head.weight", (m.vocab_size, m.hidden_size)))
    return shapes


@dataclass
class _ShapeParam:
    """Stands in for a parameter where DeepSpeed's optimizer grouping and ``build.param_groups`` read one."""

    name: str
    shape: tuple[int, ...]
    expert: bool

    def __post_init__(self):
        if self.expert:  # what the MoE layer sets on its expert parameters (is_moe_param reads `allreduce`)
            self.allreduce = False
            self.group_name = "experts"

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)


class _ShapeModel:
    def __init__(self, params: list[_ShapeParam]):
        self.params = params

    def named_parameters(self) -> Iterator[tuple[str, _ShapeParam]]:
        return ((p.name, p) for p in self.params)


def _shape_params(config: RecipeConfig, ep_size: int, tp_size: int) -> list[_ShapeParam]:
    shapes = parameter_shapes(config, ep_size, tp_size)
    return [_ShapeParam(name, shape, is_expert_parameter(name)) for name, shape in shapes]


def _optimizer_groups(params: list[_ShapeParam], split_experts: bool) -> list[list[_ShapeParam]]:
    """The optimizer's parameter groups in the engine's order: the trainer's decay / no-decay groups, then (ZeRO-1/2
    with MoE layers) DeepSpeed's expert groups split off them; empty groups dropped as the engine drops them."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from .training.build import param_groups

    groups = param_groups(_ShapeModel(params), weight_decay=0.0)
    if split_experts:
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [group["params"] for group in groups if group["params"]]


# ---- the ZeRO stages --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What the estimate needs to know about the launch."""

    stage: int
    world: int
    ep: int
    tp: int
    precision: str
    param_bytes: int  # module dtype
    grad_bytes: int  # gradient-accumulation dtype
    moments: int
    zero: object  # DeepSpeedZeroConfig, DeepSpeed's own defaults filled in

    @property
    def dense_dp(self) -> int:
        """The data-parallel group dense state is partitioned over: TP peers hold other shards, not copies."""
        return self.world // self.tp

    @property
    def expert_dp(self) -> int:
        return self.dense_dp // self.ep

    def dp(self, group: list[_ShapeParam]) -> int:
        return self.expert_dp if group[0].expert else self.dense_dp


def _layout(ds: DSConfig, world_size: int) -> _Layout:
    from deepspeed.runtime.zero.config import get_zero_config

    param_bytes = DTYPE_BYTES[ds.precision]
    accum = ds.deepspeed.get("data_types", {}).get("grad_accum_dtype")
    grad_bytes = DTYPE_BYTES[str(accum).lower()] if accum else param_bytes
    optimizer = str(ds.deepspeed.get("optimizer", {}).get("type", "adamw")).lower()
    moments = MOMENTS.get(optimizer, 2)
    if optimizer == "sgd":
        moments = 1 if ds.deepspeed["optimizer"].get("params", {}).get("momentum", 0) else 0
    return _Layout(stage=ds.zero_stage, world=world_size, ep=ds.ep_size, tp=ds.tp_size, precision=ds.precision,
                   param_bytes=param_bytes, grad_bytes=grad_bytes, moments=moments, zero=get_zero_config(ds.deepspeed))


def _split(params: list[_ShapeParam], numel_of) -> tuple[int, int]:
    """(dense, expert) sums of ``numel_of(param)``."""
    dense = sum(numel_of(p) for p in params if not p.expert)
    return dense, sum(numel_of(p) for p in params if p.expert)


def _zero0(params: list[_ShapeParam], layout: _Layout) -> RankMemory:
    dense, expert = _split(params, _ShapeParam.numel)
    numel, s = dense + expert, layout.param_bytes
    master = numel * FP32 if s != FP32 else 0  # FP16_UnfusedOptimizer's fp32 copy of every parameter
    # allreduce_gradients flattens the dense, then the expert gradients (even on one rank)
    bucket = max(min(dense, ALLREDUCE_BUCKET_NUMEL), min(expert, ALLREDUCE_BUCKET_NUMEL)) * s
    return RankMemory(dense_params=dense * s, expert_params=expert * s, grads=numel * s,
                      optimizer=master + numel * FP32 * layout.moments, activations=0,
                      buffers=bucket, step_buffers=master)


def _flat_group(group: list[_ShapeParam], dp: int, param_alignment: int) -> tuple[list[int], int]:
    """(start offset of each parameter, flat numel) of one ZeRO-1/2 group: parameters back to back, each but the
    last padded to ``param_alignment`` elements, the whole padded to a multiple of 2·dp."""
    starts, offset = [], 0
    for index, param in enumerate(group):
        starts.append(offset)
        offset += param.numel()
        if index < len(group) - 1:
            offset += -offset % param_alignment
    return starts, offset + -offset % (ALIGNMENT_PER_RANK * dp)


def _grads_in_partition(group: list[_ShapeParam], starts: list[int], partition: int,
                        rank: int) -> tuple[int, int]:
    """(elements of the whole parameters that overlap rank ``rank``'s partition, the partition's elements no
    parameter covers): ZeRO-1/2 keep the first whole, and zero-fill the second."""
    begin, end = partition * rank, partition * (rank + 1)
    whole = covered = 0
    for p, start in zip(group, starts):
        overlap = min(end, start + p.numel()) - max(begin, start)
        if overlap > 0:
            whole, covered = whole + p.numel(), covered + overlap
    return whole, partition - covered


def _bf16_optimizer(params: list[_ShapeParam], layout: _Layout) -> RankMemory:
    """ZeRO-1, bf16 with ``data_types.grad_accum_dtype: fp32``: DeepSpeed's BF16_Optimizer. Flat bf16 groups, fp32
    master partitions, a full-size fp32 gradient flat per group beside the bf16 ``.grad`` of every parameter,
    and an all-reduce that flattens the fp32 gradients as ZeRO-0 does."""
    held = {"dense_params": 0, "expert_params": 0, "optimizer": 0, "grads": 0}
    for group in _optimizer_groups(params, split_experts=any(p.expert for p in params)):
        dp = layout.dp(group)
        _, flat = _flat_group(group, dp, 1)
        held["expert_params" if group[0].expert else "dense_params"] += flat * layout.param_bytes
        held["optimizer"] += flat // dp * FP32 * (1 + layout.moments)
        held["grads"] += flat * FP32 + sum(p.numel() for p in group) * layout.param_bytes
    dense, expert = _split(params, _ShapeParam.numel)
    bucket = max(min(dense, ALLREDUCE_BUCKET_NUMEL), min(expert, ALLREDUCE_BUCKET_NUMEL)) * FP32
    return RankMemory(activations=0, buffers=bucket, **held)


def _zero12(params: list[_ShapeParam], layout: _Layout, rank: Optional[int]) -> RankMemory:
    """ZeRO-1/2: DeepSpeedZeroOptimizer."""
    s, g, zero = layout.param_bytes, layout.grad_bytes, layout.zero
    if layout.stage == 1 and s == 2 and g == FP32 and layout.precision == "bf16":
        return _bf16_optimizer(params, layout)
    compact = g == FP32 and s != FP32  # fp32 accumulation into one fp32 partition per group, no step copy
    alignment = 16 // math.gcd(16, s) if zero.parameter_alignment else 1
    held = {"dense_params": 0, "expert_params": 0, "optimizer": 0, "step": 0}
    ranks = range(layout.dense_dp) if rank is None else [rank // layout.tp]  # data-parallel ranks: TP is innermost
    grads_per_rank = [0 for _ in ranks]
    full_grads = 0
    for group in _optimizer_groups(params, split_experts=any(p.expert for p in params)):
        dp = layout.dp(group)
        starts, flat = _flat_group(group, dp, alignment)
        partition = flat // dp
        held["expert_params" if group[0].expert else "dense_params"] += flat * s
        held["optimizer"] += partition * FP32 * (1 + layout.moments)
        held["step"] = max(held["step"], 0 if compact else partition * FP32)  # the group's fp32 gradient in step
        full_grads += sum(p.numel() for p in group) * s
        for i, r in enumerate(ranks):  # expert-data-parallel groups are every ep-th rank: r // ep is r's index
            whole, pad = _grads_in_partition(group, starts, partition, r // layout.ep if group[0].expert else r)
            grads_per_rank[i] += partition * FP32 if compact else whole * s + pad * g
    bucket = 0
    if zero.contiguous_gradients:
        bucket = zero.reduce_bucket_size * (g if layout.stage == 1 else s) * (2 if zero.overlap_comm else 1)
    grads = max(grads_per_rank)
    # ZeRO-1: every param.grad, full size, until the reduction moves this rank's share into its partition
    unreduced = full_grads - grads if layout.stage == 1 else 0
    return RankMemory(dense_params=held["dense_params"], expert_params=held["expert_params"], grads=grads,
                      optimizer=held["optimizer"], activations=0, buffers=bucket + max(unreduced, 0),
                      step_buffers=held["step"])


def _persistent(params: list[_ShapeParam], layout: _Layout) -> set[str]:
    """ZeRO-3 parameters kept whole after their first gather: at most ``stage3_param_persistence_threshold``
    elements each, in module order while their sum stays within ``stage3_model_persistence_threshold``."""
    names, total = set(), 0
    for p in params:
        if total + p.numel() > layout.zero.model_persistence_threshold:
            continue
        if p.numel() <= layout.zero.param_persistence_threshold:
            names.add(p.name)
            total += p.numel()
    return names


def _gathered(params: list[_ShapeParam], layout: _Layout, persistent: set[str]) -> int:
    """Elements ZeRO-3 gathers at once in forward and backward, twice over (the all-gather's flat buffer and each
    parameter's copy out of it): the largest module's parameters (an MoE layer, a ZeRO-3 leaf module in the recipe,
    gathers router and experts together) plus up to the prefetch bucket, at most ``stage3_max_live_parameters``.
    Persistent parameters, and those whose partition group is one rank (used in place), are not gathered."""
    units: dict[str, int] = {}
    for p in params:
        if p.name in persistent or (layout.expert_dp if p.expert else layout.dense_dp) == 1:
            continue
        module = p.name.split(".deepspeed_moe.")[0] if ".deepspeed_moe." in p.name else p.name.rsplit(".", 1)[0]
        units[module] = units.get(module, 0) + p.numel()
    if not units:
        return 0
    zero = layout.zero
    return 2 * min(max(units.values()) + zero.prefetch_bucket_size, zero.max_live_parameters, sum(units.values()))


def _zero3_sub_groups(params: list[_ShapeParam], layout: _Layout) -> list[int]:
    """Partition elements of each ZeRO-3 optimizer sub-group: the trainer's groups split by partition group (dense,
    experts), each cut after the parameter that reaches ``sub_group_size``."""
    sizes = []
    for group in _optimizer_groups(params, split_experts=False):
        for expert in (False, True):
            size = 0
            for p in (p for p in group if p.expert == expert):
                size += math.ceil(p.numel() / (layout.expert_dp if expert else layout.dense_dp))
                if size >= layout.zero.sub_group_size:
                    sizes.append(size)
                    size = 0
            sizes.append(size)
    return sizes


def _zero3(params: list[_ShapeParam], layout: _Layout) -> RankMemory:
    """ZeRO-3. The fp32 master partition exists in fp32 training too: DeepSpeed 0.19.8 would reuse the partitions
    only when a tensor's device equals the accelerator's device *name* (a string), which never holds."""
    s, g, zero = layout.param_bytes, layout.grad_bytes, layout.zero
    held = {"dense_params": 0, "expert_params": 0}
    persistent, numel = _persistent(params, layout), 0
    for p in params:
        group = layout.expert_dp if p.expert else layout.dense_dp
        kind = "expert_params" if p.expert else "dense_params"
        numel += math.ceil(p.numel() / group)
        held[kind] += math.ceil(p.numel() / group) * s
        if p.name in persistent and group > 1:  # gathered at the first forward and kept, beside its partition
            held[kind] += p.numel() * s
    bucket = zero.reduce_bucket_size * s if zero.contiguous_gradients else 0  # allocated at start-up
    return RankMemory(dense_params=held["dense_params"], expert_params=held["expert_params"], grads=numel * g,
                      optimizer=numel * FP32 * (1 + layout.moments), activations=0,
                      buffers=bucket + _gathered(params, layout, persistent) * s,
                      step_buffers=max(_zero3_sub_groups(params, layout)) * FP32)  # the step's fp32 gradients


# ---- activations ------------------------------------------------------------------------------------------------


def _norm_saved(rows: int, width: int, s: int) -> int:
    """RMSNorm keeps its input, the fp32 copy of it (reduced precision only), 1/rms and the normalised cast."""
    return rows * width * (2 * s + (FP32 if s != FP32 else 0)) + rows * FP32


def _attention_saved(config: RecipeConfig, tokens: int, s: int, tp_size: int) -> int:
    """Attention norm to ``wo``: the fused qkv output (v is a view of it), q and k rotated (fp32 copies on the way
    in reduced precision; the q/k RMSNorm's own set with ``qk_norm``), SDPA's output and log-sum-exp, wo's input.
    The per-head tensors are this TP rank's heads; the norm and wqkv's input are the whole residual stream."""
    m = config.model
    heads, kv_heads, head_dim = m.num_attention_heads // tp_size, m.resolved_kv_heads // tp_size, m.resolved_head_dim
    upcast = FP32 if s != FP32 else 0
    qk = tokens * (heads + kv_heads) * head_dim
    saved = _norm_saved(tokens, m.hidden_size, s) + tokens * m.hidden_size * s  # norm, and wqkv's input
    saved += tokens * (heads + 2 * kv_heads) * head_dim * s
    if m.qk_norm != "none":
        saved += qk * (upcast + s) + qk * FP32  # the q/k norm's set, then rotary's fp32 view of its output
    else:
        saved += qk * upcast  # rotary's fp32 copy of q and k (in fp32: a view of qkv)
    saved += qk * s  # rotated q and k as SDPA keeps them
    saved += tokens * heads * head_dim * s + tokens * heads * FP32  # SDPA output, log-sum-exp
    return saved + tokens * heads * head_dim * s  # wo's input (the heads merged)


def _moe_saved(config: RecipeConfig, tokens: int, s: int, ep_size: int, grouped_mm: bool, tp_size: int) -> int:
    """Router and gating (fp32 scores, the pairs' indices and weights), the experts over N = S·k routed rows
    (fewer when capacity caps them): the fused CPU loop keeps the two (N, F) projections, grouped GEMM (CUDA)
    four and the gathered rows; across EP ranks the received rows and the returned outputs too. Under TP each
    rank routes every token (router replicated) through its F / tp of each expert: only the (N, F) terms shrink."""
    from .model.moe.gating import expert_capacity

    m = config.model
    k, experts, hidden, width = m.moe_gate_k, m.num_experts, m.hidden_size, m.expert_size // tp_size
    pairs = tokens * k
    if m.moe_drop_tokens:
        pairs = min(pairs, experts * expert_capacity(tokens, experts, k, m.moe_capacity_factor, m.moe_min_capacity))
    upcast = FP32 if s != FP32 else 0
    saved = tokens * hidden * upcast + experts * hidden * upcast  # the router's fp32 input and weight
    saved += 2 * tokens * experts * FP32 + tokens * k * 13 + tokens * 16 + pairs * (16 + s)  # gating, pair indices
    if grouped_mm:
        saved += 4 * pairs * width * s + 2 * pairs * hidden * s  # a, b, silu(a), h; gathered rows, outputs
    else:
        saved += 2 * pairs * width * s + (2 * pairs * hidden * s if ep_size > 1 else 0)
    return saved


def _block_saved(config: RecipeConfig, tokens: int, s: int, use_moe: bool, ep_size: int, grouped_mm: bool,
                 tp_size: int) -> int:
    """One block's saved tensors: attention, the FFN norm and its output, the FFN (dense SwiGLU keeps its four
    (S, F) intermediates, F / tp under TP), shared experts and their gate."""
    m = config.model
    saved = _attention_saved(config, tokens, s, tp_size) + _norm_saved(tokens, m.hidden_size, s)
    saved += tokens * m.hidden_size * s  # the FFN's input h
    if not use_moe:
        return saved + 4 * tokens * (m.ffn_size // tp_size) * s
    saved += _moe_saved(config, tokens, s, ep_size, grouped_mm, tp_size)
    if m.moe_num_shared_experts > 0:
        saved += 4 * tokens * (m.shared_expert_size // tp_size) * s
    if m.moe_shared_expert_gate:
        saved += tokens * m.hidden_size * s + tokens * FP32
    return saved


def activation_bytes(config: RecipeConfig, micro_batch: int, dtype_bytes: int, ep_size: int = 1,
                     device_type: str = "cuda", tp_size: int = 1) -> Activations:
    """One micro-batch of ``micro_batch`` x ``data.seq_len`` tokens on one rank, derived from the model's code.

    ``saved``: per block the tensors autograd saves (``_block_saved``: RMSNorm sets, qkv, rotated q/k, SDPA's output
    and log-sum-exp, the FFN's intermediates, the routed experts' (N, F) projections over N = S·k rows (capacity-
    capped when tokens drop), gating's (S, E) fp32 scores); with ``model.checkpoint`` each block's input instead.
    Then the final norm, lm_head's input, the fp32 log-softmax over (S, V) and the logits the forward returns.
    ``peak`` adds the loss's two (S, V) fp32 gradients at the start of backward and, with checkpointing, the
    largest block's full set, recomputed. Held to ``saved_tensors_hooks`` within 15% by tests/test_memory.py (on
    CPU, one rank). Neglected: the (E,)- and (S, 1)-sized odds and ends, the rotary tables, routing imbalance
    (dropless experts get S·k rows per rank on average, more on a hot rank), gradients of activations alive
    during backward, transients inside one op, allocator fragmentation, and DeepSpeed's own buffers (in
    ``RankMemory.buffers``). The expert-parallel terms (received rows, returned outputs) are read from the code,
    not measured. ``device_type`` picks the experts' path the layer takes there (``prefer_grouped_mm`` in
    ``recipe.model.moe.experts``: grouped GEMM on CUDA, the fused loop on CPU). ``tp_size``: one TP rank's share,
    the per-head and (S, F) tensors divided by tp, the (S, C) and (S, V) ones whole (module docstring).
    """
    _check_tp_divides_model(config, tp_size)
    m = config.model
    tokens, s = micro_batch * config.data.seq_len, dtype_bytes
    grouped_mm = device_type != "cpu"
    moe_layers = set(config.moe_layer_ids())
    blocks = [_block_saved(config, tokens, s, i in moe_layers, ep_size, grouped_mm, tp_size)
              for i in range(m.num_layers)]
    recompute = 0
    if m.checkpoint:  # each block keeps its input; backward recomputes one block at a time
        saved, recompute = m.num_layers * tokens * m.hidden_size * s, max(blocks)
    else:
        saved = sum(blocks)
    saved += tokens * 8  # the embedding's token ids
    saved += _norm_saved(tokens, m.hidden_size, s) + tokens * m.hidden_size * s  # final norm, lm_head's input
    logits = tokens * m.vocab_size
    saved += logits * FP32 + tokens * 8 + logits * s  # log-softmax output, targets; the returned logits
    return Activations(saved=saved, peak=saved + recompute + 2 * logits * FP32)


# ---- estimate and measurement -----------------------------------------------------------------------------------


def _check_parallel_layout(ds: DSConfig, world_size: int) -> None:
    """tp divides the ranks, ep the data-parallel ranks (EP groups live inside a DP group); no ZeRO-3 with TP."""
    tp, ep = ds.tp_size, ds.ep_size
    if tp < 1 or world_size % tp:
        raise ConfigError(f"tp_size {tp} does not divide the world size {world_size}; launch a multiple of {tp} "
                          f"ranks or use a smaller tp_size")
    if ds.dp_size(world_size) % ep:
        ranks = f"the world size {world_size}" if tp == 1 else \
            f"the data-parallel size {ds.dp_size(world_size)} ({world_size} ranks / tp_size {tp})"
        raise ConfigError(f"ep_size {ep} does not divide {ranks}; use an ep_size that divides it")
    if tp > 1 and ds.zero_stage == 3:
        raise ConfigError(f"ZeRO-3 with tp_size {tp} is refused (the trainer refuses it: expert-TP shards would miss "
                          f"the model-parallel gradient-norm reduction); use ZeRO-1/2 with TP, or tp_size 1")


def estimate(config: RecipeConfig, ds: DSConfig, world_size: int, rank: Optional[int] = None,
             device_type: str = "cuda") -> RankMemory:
    """What one rank of a ``world_size``-rank launch of ``config`` with ``ds`` holds (see the module docstring).

    ZeRO-1/2 ranks differ slightly (each keeps whole the gradients of parameters crossing its partition): ``rank``
    picks one (TP peers hold the same), None the largest. ``device_type`` only changes the activation estimate
    (``activation_bytes``)."""
    _check_parallel_layout(ds, world_size)
    params = _shape_params(config, ds.ep_size if config.is_moe else 1, ds.tp_size)
    layout = _layout(ds, world_size)
    if layout.stage == 0:
        memory = _zero0(params, layout)
    elif layout.stage in (1, 2):
        memory = _zero12(params, layout, rank)
    else:
        memory = _zero3(params, layout)
    activations = activation_bytes(config, ds.micro_batch_size, layout.param_bytes, ds.ep_size, device_type,
                                   ds.tp_size)
    memory.activations = activations.peak
    return memory


class _Claims:
    """Bytes of tensor storage, each byte counted once, for the first category that claims it (views of one flat
    buffer, a tensor reached on several paths, a master copy that is the parameter itself)."""

    def __init__(self):
        self.totals = {name: 0 for name in ("dense_params", "expert_params", "grads", "optimizer", "buffers")}
        self.spans: dict[tuple, list[tuple[int, int]]] = {}  # storage -> claimed [start, end) byte spans
        self.owner: dict[tuple, str] = {}  # storage -> the category that claimed most of it first

    def add(self, category: str, tensor, leftover_to_owner: bool = False, whole: bool = False) -> None:
        """``whole``: claim the tensor's whole storage (what no one claimed yet of it), not only its view's span."""
        if tensor is None or tensor.numel() == 0 or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = (tensor.device.type, storage.data_ptr())
        start = tensor.storage_offset() * tensor.element_size()
        last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        end = start + (last + 1) * tensor.element_size()
        if leftover_to_owner:  # a flat buffer behind parameter views: its padding is its parameters' kind
            category = self.owner.get(key, category)
        if leftover_to_owner or whole:
            start, end = 0, storage.nbytes()
        claimed = self.spans.setdefault(key, [])
        new = (end - start) - sum(max(0, min(end, b) - max(start, a)) for a, b in claimed)
        if new > 0:
            self.totals[category] += new
            self.owner.setdefault(key, category)
            claimed.append((start, end))


# Where the engine keeps what, by the attribute names on the path to a tensor (checked in this order).
_PARAM_STORAGE = ("bit16", "fp16_groups", "fp16_partitioned", "lp_param", "round_robin", "parallel_partitioned")
_BUFFERS = ("ipg_bucket", "inflight_param_registry")  # reduce buckets; ZeRO-3 all-gather flats
_GRADS = ("grad",)


def _tensors_of(obj, path: str = "", seen: Optional[set] = None, depth: int = 0) -> Iterator[tuple[str, object]]:
    """(path, tensor) for every tensor reachable from ``obj`` through DeepSpeed / torch objects, lists and dicts
    (not through nn.Modules: parameters are read from the module itself)."""
    import torch

    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        yield path, obj
        if obj.grad is not None:
            yield f"{path}.grad", obj.grad
        return
    if id(obj) in seen or depth > 12 or isinstance(obj, (torch.nn.Module, type, str, bytes, int, float)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(f"{path}[{'tensor' if torch.is_tensor(k) else k}]", v) for k, v in obj.items()]
        items += [(f"{path}.key", k) for k in obj if torch.is_tensor(k)]
    elif isinstance(obj, (list, tuple, set)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = [(f"{path}.{name}", v) for name, v in vars(obj).items()]
    else:
        return
    for item_path, value in items:
        yield from _tensors_of(value, item_path, seen, depth + 1)


def _category(path: str) -> Optional[str]:
    """grads / buffers / optimizer for a tensor found in the optimizer; None for parameter storage."""
    if any(word in path for word in _BUFFERS):
        return "buffers"
    if any(word in path.lower() for word in _GRADS):
        return "grads"
    if any(word in path for word in _PARAM_STORAGE):
        return None
    return "optimizer"


def measure_engine(engine) -> RankMemory:
    """What a live DeepSpeed engine holds on this rank now, by walking its module and optimizer: parameters (the
    module's tensors, or their ZeRO-3 partitions ``ds_tensor``; expert by ``is_expert_parameter``), gradients
    (``.grad``, ``grad_accum`` and the optimizer's gradient buffers), the reduce buckets while allocated, and
    everything else the optimizer holds (fp32 masters, moments, step counts). Each storage byte counts once.
    Called after a backward, before ``engine.step()``, it sees what ``estimate`` calls grads; the optimizer's
    moments exist once a first step has run. Activations are not seen: ``activations`` is 0.

    A gradient that is a view keeps its whole storage alive: what no other category claims of that storage counts
    as gradients (ZeRO-1/2's ``averaged_gradients`` are partition slices of ``grads_in_partition``, the whole
    gradients crossing the partition, whose own reference is dropped at the end of backward)."""
    claims = _Claims()
    named = list(engine.module.named_parameters())
    for name, param in named:
        kind = "expert_params" if is_expert_parameter(name) else "dense_params"
        zero3 = getattr(param, "ds_tensor", None) is not None
        claims.add(kind, getattr(param, "ds_tensor", None))
        # ZeRO-3: a whole parameter beside its partition is kept (persistent) or gathered for this module only
        claims.add(kind if not zero3 or getattr(param, "ds_persist", False) else "buffers", param.data)
    grads = [t for _, param in named for t in (param.grad, getattr(param, "grad_accum", None))]
    for tensor in grads:
        claims.add("grads", tensor)
    found = list(_tensors_of(engine.optimizer, "optimizer"))
    for path, tensor in found:  # parameter flats first: their padding belongs to their parameters
        if _category(path) is None:
            claims.add("dense_params", tensor, leftover_to_owner=True)
    for path, tensor in found:
        category = _category(path)
        if category is not None:
            claims.add(category, tensor)
        if category == "grads":
            grads.append(tensor)
    for tensor in grads:  # last: a buffer or master copy that a gradient views stays what it is
        claims.add("grads", tensor, whole=True)
    return RankMemory(activations=0, **claims.totals)


# ---- the command line -------------------------------------------------------------------------------------------


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:,.2f}"


def _row_notes(config: RecipeConfig, ds: DSConfig, layout: _Layout) -> dict[str, str]:
    """What each row counts, in words, for this launch."""
    m = config.model
    stage, dtype, edp, dp = layout.stage, ds.precision, layout.expert_dp, layout.dense_dp
    sharded = f", each F/{layout.tp} wide (TP)" if layout.tp > 1 else ""
    experts = f"{dtype}, {m.num_experts // ds.ep_size} of {m.num_experts} per MoE layer{sharded}" if config.is_moe \
        else "none"
    if stage == 3 and config.is_moe:
        experts += f", partitioned over {edp} ranks" if edp > 1 else ", whole (expert-data-parallel size 1)"
    grad_dtype = ds.deepspeed.get("data_types", {}).get("grad_accum_dtype") or dtype
    grads = {0: "every parameter", 1: "params crossing the partition (the largest rank)", 3: "this rank's partitions"}
    moments = {2: "Adam exp_avg, exp_avg_sq", 1: "1 moment", 0: "no moments"}[layout.moments]
    master = "fp32 master + " if stage > 0 or layout.param_bytes != FP32 else ""
    buffers = {0: "the all-reduce's flat gradient copy", 1: "reduce bucket + gradients before their reduction",
               2: "reduce bucket", 3: "reduce bucket + gathered parameters"}[stage]
    dense = f"partitioned over {dp} ranks" if stage == 3 else "whole on every rank"
    if layout.tp > 1:  # attention and FFN sharded, the rest replicated on the TP peers
        dense = f"attention/FFN 1/{layout.tp} (TP), embedding/head/norms/router whole"
    return {
        "dense_params": f"{dtype}, {dense}",
        "expert_params": experts,
        "grads": f"{grad_dtype}, {grads.get(stage, grads[1])}",
        "optimizer": master + moments + ("" if stage == 0 else f"; over {dp} ranks, experts over {edp}"),
        "buffers": buffers,
        "activations": f"micro-batch {ds.micro_batch_size} x {config.data.seq_len} tokens, checkpointing "
                       f"{'on' if m.checkpoint else 'off'}, backward's start",
        "step_buffers": "fp32 grads inside step(): total uses max(this, the two rows above)",
    }


def plan_table(config: RecipeConfig, ds: DSConfig, world_size: int, device_type: str = "cuda") -> str:
    """The header line and the table ``python -m recipe.memory`` prints."""
    memory, counts = estimate(config, ds, world_size, device_type=device_type), parameter_counts(config)
    name = Path(config.source).stem if config.source else "config"
    header = (f"moe-recipe memory plan: {name} ({config.model_type}) {counts['total'] / 1e6:.2f}M params "
              f"({counts['active'] / 1e6:.2f}M active) | {world_size} ranks, ep_size {ds.ep_size}, "
              f"tp_size {ds.tp_size} (dp {ds.dp_size(world_size)}), ZeRO-{ds.zero_stage} {ds.precision} | per rank:")
    labels = {"dense_params": "parameters, dense", "expert_params": "parameters, experts", "grads": "gradients",
              "optimizer": "optimizer state", "buffers": "communication buffers", "activations": "activations",
              "step_buffers": "optimizer step"}
    layout = _layout(ds, world_size)
    notes = _row_notes(config, ds, layout)
    lines = [header, f"  {'':<22} {'GiB':>9} {'bytes':>17}  what"]
    for name, label in labels.items():
        value = getattr(memory, name)
        lines.append(f"  {label:<22} {_gib(value):>9} {value:>17,}  {notes[name]}")
    lines.append(f"  {'total':<22} {_gib(memory.total):>9} {memory.total:>17,}")
    zero = layout.zero
    for key, block in (("offload_optimizer", zero.offload_optimizer), ("offload_param", zero.offload_param)):
        if block is not None and str(block.device) != "none":
            lines.append(f"  note: {key} to {block.device}: what it moves lives in host memory, this plan counts it "
                         f"as device memory")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipe.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="Python model/train config (recipe/configs/*.py)")
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    parser.add_argument("--nproc", type=int, required=True, help="ranks in the launch (all nodes)")
    parser.add_argument("--ep_size", type=int, help="expert-parallel size, instead of the JSON's moe_recipe.ep_size")
    parser.add_argument("--tp_size", type=int,
                        help="tensor-parallel size, instead of the JSON's tensor_parallel.autotp_size")
    parser.add_argument("--micro_batch", type=int,
                        help="sequences per rank per micro-batch, instead of the JSON's train_micro_batch_size_per_gpu")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set model.checkpoint=False (repeatable)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where it will run: picks the experts' path for the activations (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be a positive number of ranks, got {args.nproc}")
        config = load_config(args.config, args.set)
        raw = read_ds_config(args.ds_config)
        if args.ep_size is not None:
            raw.setdefault("moe_recipe", {})["ep_size"] = args.ep_size
        if args.tp_size is not None:
            if args.tp_size < 1:
                raise ConfigError(f"--tp_size must be a positive number of ranks, got {args.tp_size}")
            if args.nproc % args.tp_size:
                raise ConfigError(f"--tp_size {args.tp_size} does not divide --nproc {args.nproc}; use a tp_size "
                                  f"that divides the number of ranks")
            raw.setdefault("tensor_parallel", {})["autotp_size"] = args.tp_size
        if args.micro_batch is not None:  # train_batch_size, if given, follows from it
            raw["train_micro_batch_size_per_gpu"] = args.micro_batch
            raw.pop("train_batch_size", None)
        ds = resolve_ds_config(raw, config, args.nproc, args.ds_config)
        print(plan_table(config, ds, args.nproc, args.device))
    except (ConfigError, FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
