"""Expert networks and the expert registry.

An expert group holds the experts local to one rank and runs them over tokens already grouped
by expert: ``forward(x_NM, tokens_per_expert)`` where rows ``[0, n_0)`` belong to local expert 0,
the next ``n_1`` rows to expert 1, and so on. It returns ``(N, M)`` in the same row order.
The layer calls groups through ``run_experts_indexed``, which gathers the rows, runs ``forward`` and
scatters the results back; a group may instead implement ``forward_indexed`` to do all three at once
(``SwiGLUExperts`` does, so no permuted copy of the tokens is materialised).

Checkpoint layout: whatever the in-memory storage, a group's state dict presents one entry per
expert under the per-expert keys of ``recipe.model.expert_keys``, the names the DeepSpeed engine cuts
into one file per expert (``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..expert_keys import EXPERT_LIST_NAME, STACKED_WEIGHTS, parse_expert_key, stacked_keys

# name -> factory(hidden_size, intermediate_size) returning ONE expert module mapping (n, M) -> (n, M).
_EXPERT_REGISTRY: Dict[str, Callable[[int, int], nn.Module]] = {}


def register_expert(name: str):
    """Decorator: make an expert network selectable from the config as ``model.moe_expert = name``.

    The decorated callable takes ``(hidden_size, intermediate_size)`` and returns one expert
    (an ``nn.Module`` mapping ``(n, hidden_size) -> (n, hidden_size)``). The recipe builds one per local
    expert and runs them over contiguous token blocks.
    """

    def decorator(factory: Callable[[int, int], nn.Module]):
        if name in _EXPERT_REGISTRY:
            raise ValueError(f"an expert named {name!r} is already registered")
        _EXPERT_REGISTRY[name] = factory
        return factory

    return decorator


def registered_experts() -> list[str]:
    return sorted(_EXPERT_REGISTRY)


def ffn_intermediate_size(hidden_size: int, mlp_ratio: float, multiple_of: int) -> int:
    """InternEvo's rule: ``int(hidden_size · mlp_ratio)`` rounded up to a multiple of ``multiple_of``."""
    hidden = int(hidden_size * mlp_ratio)
    return multiple_of * math.ceil(hidden / multiple_of)


@register_expert("swiglu")
class SwiGLU(nn.Module):
    """One SwiGLU FFN ``w2(silu(w1·x) * w3·x)``; also the dense FFN and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ModuleListExperts(nn.Module):
    """Any registered expert, one module per local expert, run block by block (the generic path)."""

    def __init__(self, factory: Callable[[int, int], nn.Module], num_local_experts: int, hidden_size: int,
                 intermediate_size: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        # Registered under expert_keys' list name: DeepSpeed's per-expert checkpoint cut matches it.
        setattr(self, EXPERT_LIST_NAME,
                nn.ModuleList(factory(hidden_size, intermediate_size) for _ in range(num_local_experts)))

    @property
    def local_experts(self) -> nn.ModuleList:
        return getattr(self, EXPERT_LIST_NAME)

    def forward(self, x_NM: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(x_NM, tokens_per_expert.tolist())
        return torch.cat([expert(block) for expert, block in zip(self.local_experts, blocks)], dim=0)


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward for these shapes on this device.

    It needs 16-byte aligned strides and, on CUDA, a recent GPU; a tiny trial call decides once per key.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(6, hidden_size, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, intermediate_size, hidden_size, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([2, 6], device=device_type, dtype=torch.int32)
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        y.backward(torch.ones_like(y))
        reference = torch.cat([x[:2] @ w[0].t(), x[2:] @ w[1].t()])
        return bool(torch.allclose(y, reference, rtol=1e-2, atol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def prefer_grouped_mm(device_type: str, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> bool:
    """The automatic choice between ``torch._grouped_mm`` and the fused per-expert loop.

    On CPU ``_grouped_mm`` is itself a loop of matmuls, and the fused loop (``_SwiGLUBlocks``) beats it
    (bench/layer_bench.py, "path" rows): it keeps each expert's block in cache, saves half the activations
    and writes weight gradients in place. Elsewhere grouped GEMM is used wherever it works.
    """
    if device_type == "cpu":
        return False
    return grouped_mm_works(device_type, dtype, hidden_size, intermediate_size)


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _nt(weight: torch.Tensor, transpose_copy: bool) -> torch.Tensor:
    """``weight`` as the right operand of ``a @ weight``: for reduced precision on CPU, a transposed copy
    read back transposed, because oneDNN/MKL's bf16 GEMM is several times faster in "A·Bᵀ" layout."""
    return weight.t().contiguous().t() if transpose_copy else weight


class _SwiGLUBlocks(torch.autograd.Function):
    """Stacked SwiGLU experts over row blocks, one expert at a time, memory-lean.

    Plain mode (``index_N`` None): rows ``[0, n_0)`` of ``x`` go to expert 0, the next ``n_1`` to expert 1,
    and so on; the output has the same rows (``weight_N`` must then be None).
    Indexed mode: position i of the expert-grouped order reads row ``index_N[i]`` of ``x``, and
    ``weight_N[i] · y_i`` is added into row ``index_N[i]`` of an output shaped like ``x``. Each expert's
    rows are gathered into one block-sized scratch buffer and its results added back block by block,
    so no (N, M) copy of the routed rows exists (with fine-grained experts, N = k·S is large and the
    full-size gathers and scatters cost more than these cache-resident per-block ones).

    forward:  a = x·w1ᵀ, b = x·w3ᵀ, y = (silu(a)·b)·w2ᵀ per block; keeps only a and b besides the inputs
              (autograd of the plain expressions keeps the gathered rows, a, silu(a), b, the product and y).
              y is not kept even when the combine weight needs a gradient: <y, g> = <h, g·w2> with
              h = silu(a)·b, and backward computes g·w2 anyway.
    backward: recomputes silu(a) and h block by block (cheap, cache-resident) and writes each expert's
              weight gradient straight into its slice of the stacked gradient.
    """

    @staticmethod
    def forward(ctx, x, w1, w3, w2, weight_N, index_N, counts: list[int]):
        if index_N is None and weight_N is not None:
            raise ValueError("a combine weight needs index_N")
        num_rows = x.shape[0] if index_N is None else index_N.shape[0]
        a_NF = x.new_empty(num_rows, w1.shape[1])
        b_NF = x.new_empty(num_rows, w1.shape[1])
        if index_N is None:
            out = x.new_empty(num_rows, w2.shape[1])
        else:
            out = x.new_zeros(x.shape[0], w2.shape[1])
            scratch = x.new_empty(max(counts, default=0), x.shape[1])  # one block's rows, reused
        for e, rows in _blocks(counts):
            if index_N is None:
                x_nM = x[rows]
            else:
                index_n = index_N[rows]
                x_nM = torch.index_select(x, 0, index_n, out=scratch[: rows.stop - rows.start])
            a_nF = torch.mm(x_nM, w1[e].t(), out=a_NF[rows])
            b_nF = torch.mm(x_nM, w3[e].t(), out=b_NF[rows])
            h_nF = F.silu(a_nF).mul_(b_nF)
            if index_N is None:
                torch.mm(h_nF, w2[e].t(), out=out[rows])
                continue
            y_nM = torch.mm(h_nF, w2[e].t(), out=x_nM)  # x_nM is dead once a and b are written
            if weight_N is not None:
                y_nM.mul_(weight_N[rows].unsqueeze(1))
            out.index_add_(0, index_n, y_nM)
        ctx.counts = counts
        ctx.save_for_backward(x, a_NF, b_NF, w1, w3, w2, weight_N, index_N)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        x, a_NF, b_NF, w1, w3, w2, weight_N, index_N = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2, need_weight = ctx.needs_input_grad[:5]
        g_out = g_out.contiguous()
        transpose_copy = g_out.device.type == "cpu" and g_out.dtype != torch.float32
        w = (w1, w3, w2, transpose_copy)
        dws = tuple(torch.empty_like(p) if need else None
                    for p, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2)))
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert without tokens gets a zero gradient
                for grad in dws:
                    if grad is not None:
                        grad[e].zero_()
        dweight_N = torch.empty_like(weight_N) if need_weight else None
        if index_N is None:
            dx = torch.empty_like(x) if need_x else None
        else:  # block-sized scratch, reused by every expert; x's rows are overwritten by dx
            dx = torch.zeros_like(x) if need_x else None
            x_buf, g_buf = (x.new_empty(max(ctx.counts, default=0), x.shape[1]) for _ in range(2))
        need_x_rows = need_w1 or need_w3
        for e, rows in _blocks(ctx.counts):
            if index_N is None:
                x_nM, g_nM = x[rows], g_out[rows]
                dx_nM = dx[rows] if need_x else None
            else:
                index_n, n = index_N[rows], rows.stop - rows.start
                x_nM = torch.index_select(x, 0, index_n, out=x_buf[:n]) if need_x_rows else None
                g_nM = torch.index_select(g_out, 0, index_n, out=g_buf[:n])
                dx_nM = x_buf[:n] if need_x else None  # written after dw1 and dw3, x_nM's last readers
            weight_n1 = None if weight_N is None else weight_N[rows].unsqueeze(1)
            _block_backward(e, x_nM, a_NF[rows], b_NF[rows], g_nM, weight_n1, w, dws,
                            None if dweight_N is None else dweight_N[rows], dx_nM)
            if need_x and index_N is not None:
                dx.index_add_(0, index_n, dx_nM)
        return (dx, *dws, dweight_N, None, None)


def _block_backward(e, x_nM, a_nF, b_nF, g_nM, weight_n1, w, dws, dweight_n, dx_nM) -> None:
    """One expert's block of ``_SwiGLUBlocks.backward``; writes into the gradients it is given.

    ``g_nM`` is the gradient of the (weighted, when ``weight_n1`` is given) output rows. With a weight,
    the unweighted gradient of h is ``dh_raw = g·w2``; then <y, g> = rowsum(h ∘ dh_raw) (so y need not
    be kept), the gradient of h is ``dh_raw · weight`` and dw2 = gᵀ·(h · weight).
    """
    w1, w3, w2, transpose_copy = w
    dw1, dw3, dw2 = dws
    s_nF = F.silu(a_nF)
    h_nF = s_nF * b_nF if (dw2 is not None or dweight_n is not None) else None
    dh_nF = torch.mm(g_nM, _nt(w2[e], transpose_copy))  # (n, F)
    if weight_n1 is not None:
        if dweight_n is not None:
            torch.sum(h_nF * dh_nF, dim=1, out=dweight_n)  # <h, g·w2> = <y, g>
        dh_nF.mul_(weight_n1)
        # dw2 = (g·weight)ᵀ·h = gᵀ·(h·weight): scale the narrower one (g is a private copy in indexed mode)
        if dw2 is not None:
            (h_nF if h_nF.shape[1] <= g_nM.shape[1] else g_nM).mul_(weight_n1)
    if dw2 is not None:
        torch.mm(g_nM.t(), h_nF, out=dw2[e])  # (M, F)
    db_nF = s_nF.mul_(dh_nF)  # d/db = dh·silu(a); s is not needed after this
    da_nF = torch.ops.aten.silu_backward(dh_nF.mul_(b_nF), a_nF)  # dh·b·silu'(a)
    if dw1 is not None:
        torch.mm(da_nF.t(), x_nM, out=dw1[e])
    if dw3 is not None:
        torch.mm(db_nF.t(), x_nM, out=dw3[e])
    if dx_nM is not None:  # after dw1 and dw3, the last readers of x_nM (dx_nM may share its storage)
        torch.mm(da_nF, _nt(w1[e], transpose_copy), out=dx_nM)
        dx_nM.addmm_(db_nF, _nt(w3[e], transpose_copy))


def _blocks(counts: list[int]):
    """(expert, row slice) of every non-empty block of an expert-grouped order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class SwiGLUExperts(nn.Module):
    """All local SwiGLU experts in stacked weights, run with one grouped GEMM per projection.

    ``w1, w3``: (E_local, F, M); ``w2``: (E_local, M, F), each slice laid out like ``nn.Linear.weight``.
    Two interchangeable paths (tests compare them): ``torch._grouped_mm`` with plain autograd, and a
    fused per-expert loop (``_SwiGLUBlocks``) that keeps fewer activations. ``use_grouped_mm=None``
    picks per device (``prefer_grouped_mm``: the loop on CPU, grouped GEMM where it works elsewhere);
    True/False forces a path.
    The state dict shows the per-expert keys of ``recipe.model.expert_keys`` (slice i of ``w1`` as expert i's
    ``w1.weight``), the same keys a ``ModuleListExperts`` of ``SwiGLU`` has, so checkpoints move freely
    between the two.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int,
                 use_grouped_mm: bool | None = None):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.use_grouped_mm = use_grouped_mm
        self.tp_size = 1  # > 1 after shard_intermediate: each rank holds intermediate_size of F = tp·that
        self.w1 = nn.Parameter(torch.empty(num_local_experts, intermediate_size, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_local_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, hidden_size, intermediate_size))
        self.reset_parameters()
        self.register_state_dict_post_hook(_unstack_expert_state)
        self.register_load_state_dict_pre_hook(_stack_expert_state)

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default, per expert.
        for weight in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    @torch.no_grad()
    def shard_intermediate(self, tp_rank: int, tp_size: int) -> None:
        """Keep TP rank ``tp_rank``'s 1/tp_size of every expert's F (``recipe.model.tp_layout``): the partial outputs
        of the TP ranks sum to the full expert's (the dispatcher adds them). Weights must be final: init, load or
        reshard the full experts first."""
        if self.intermediate_size % tp_size:
            raise ValueError(f"expert intermediate size {self.intermediate_size} is not divisible by TP {tp_size}")
        for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            full = getattr(self, name)
            shard = nn.Parameter(full.chunk(tp_size, dim=dim)[tp_rank].clone())
            shard.__dict__.update(full.__dict__)  # DeepSpeed's expert tags (allreduce=False, group_name)
            shard.tensor_model_parallel = True  # DeepSpeed counts it in the grad norm on every TP rank
            setattr(self, name, shard)
        self.intermediate_size //= tp_size
        self.tp_size = tp_size

    def _grouped(self, x_NM: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        return prefer_grouped_mm(x_NM.device.type, x_NM.dtype, self.hidden_size, self.intermediate_size)

    def forward(self, x_NM: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self._grouped(x_NM):
            offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)

            def project(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                out = torch._grouped_mm(inp, weight.transpose(-2, -1), offs=offsets)
                if out.requires_grad:
                    out.register_hook(_contiguous_grad)  # its backward rejects broadcast (stride-0) grads
                return out

            hidden_NF = F.silu(project(x_NM, self.w1)) * project(x_NM, self.w3)
            return project(hidden_NF, self.w2)
        counts = tokens_per_expert.tolist()  # one host sync; the loop needs the block sizes
        return _SwiGLUBlocks.apply(x_NM.contiguous(), self.w1, self.w3, self.w2, None, None, counts)

    def forward_indexed(self, x_SM: torch.Tensor, tokens_per_expert: torch.Tensor, index_N: torch.Tensor,
                        weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``run_experts_indexed`` for stacked SwiGLU: fused per block on the loop path."""
        if self._grouped(x_SM):
            return _gather_run_combine(self, x_SM, tokens_per_expert, index_N, weight_N)
        counts = tokens_per_expert.tolist()
        return _SwiGLUBlocks.apply(x_SM.contiguous(), self.w1, self.w3, self.w2, weight_N, index_N, counts)


def combine(y_NM: torch.Tensor, index_N: torch.Tensor, weight_N: Optional[torch.Tensor], num_rows: int) -> torch.Tensor:
    """``out[index_N[i]] += weight_N[i] · y_NM[i]`` into ``num_rows`` zero rows (differentiable)."""
    if weight_N is not None:
        y_NM = y_NM * weight_N.unsqueeze(1)
    return y_NM.new_zeros(num_rows, y_NM.shape[1]).index_add_(0, index_N, y_NM)


def _gather_run_combine(experts: nn.Module, x_SM: torch.Tensor, tokens_per_expert: torch.Tensor,
                        index_N: torch.Tensor, weight_N: Optional[torch.Tensor]) -> torch.Tensor:
    return combine(experts(x_SM.index_select(0, index_N), tokens_per_expert), index_N, weight_N, x_SM.shape[0])


def run_experts_indexed(experts: nn.Module, x_SM: torch.Tensor, tokens_per_expert: torch.Tensor,
                        index_N: torch.Tensor, weight_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run an expert group on rows picked by ``index_N`` and add the results back where they came from.

    Position i of the expert-grouped order (``tokens_per_expert`` rows per local expert, in order) is
    row ``index_N[i]`` of ``x_SM``; the output, shaped like ``x_SM``, gets ``weight_N[i] · y_i`` added
    into row ``index_N[i]`` (rows never indexed stay 0; an index may repeat, as with top-2 routing).
    Expert groups with a ``forward_indexed`` method of this signature run it (``SwiGLUExperts`` fuses
    gather, experts and combine); any other group is gathered, run with ``forward`` and scattered back.
    """
    fused = getattr(experts, "forward_indexed", None)
    if fused is not None:
        return fused(x_SM, tokens_per_expert, index_N, weight_N)
    return _gather_run_combine(experts, x_SM, tokens_per_expert, index_N, weight_N)


def _unstack_expert_state(module: SwiGLUExperts, state_dict, prefix, local_metadata) -> None:
    """State-dict post hook: replace each stacked weight (E, ...) by its per-expert keys, one slice each.

    A weight ZeRO-3 holds partitioned is an empty placeholder outside a gather: it keeps its stacked key (the
    engine's own model-states file has placeholders only; the per-expert files are written from gathered
    weights)."""
    for name in STACKED_WEIGHTS:
        weight = getattr(module, name)
        if hasattr(weight, "ds_numel") and state_dict[prefix + name].numel() != weight.ds_numel:
            continue  # a ZeRO-3 placeholder
        stacked = state_dict.pop(prefix + name)
        for i, key in enumerate(stacked_keys(prefix, name, range(module.num_local_experts))):
            state_dict[key] = stacked[i]


def _stack_expert_state(module: SwiGLUExperts, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """Load pre hook: the inverse of ``_unstack_expert_state``; stacked keys are accepted as they are."""
    for name in STACKED_WEIGHTS:
        keys = stacked_keys(prefix, name, range(module.num_local_experts))
        present = [key for key in keys if key in state_dict]
        if not present:
            continue  # stacked key given directly, or missing: load_state_dict reports it
        if len(present) != len(keys):
            absent = sorted(set(keys) - set(present))
            error_msgs.append(f"expert weights incomplete: missing {absent[:3]}{'...' if len(absent) > 3 else ''}")
            continue
        state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])
    # Experts beyond the local count mean the checkpoint was saved with more local experts.
    extra = [key for key in state_dict if (parsed := parse_expert_key(key)) is not None and parsed.group == prefix]
    if extra:
        error_msgs.append(
            f"checkpoint has expert entries this layer does not hold ({extra[0]} ...): it was saved with "
            f"a different number of experts per rank; load it through recipe.checkpoint to reshard"
        )
        for key in extra:
            state_dict.pop(key)


def build_experts(name: str, num_local_experts: int, hidden_size: int, intermediate_size: int) -> nn.Module:
    """The expert group for ``model.moe_expert = name``: stacked SwiGLU for "swiglu", else a module list."""
    if name == "swiglu":
        return SwiGLUExperts(num_local_experts, hidden_size, intermediate_size)
    if name not in _EXPERT_REGISTRY:
        raise ValueError(
            f"unknown expert {name!r}; registered: {registered_experts()}. "
            f"Register yours with @recipe.model.moe.register_expert({name!r})"
        )
    return ModuleListExperts(_EXPERT_REGISTRY[name], num_local_experts, hidden_size, intermediate_size)
