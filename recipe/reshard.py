"""Optimizer state across layouts: DeepSpeed's optimizer shards of a checkpoint, read on one process into one
tensor per parameter with global expert ids, and written into a live engine at another rank count / ep_size.

Why: ``--resume --reshard`` already moves weights, data position and LR schedule to a new layout; with the
fp32 master weights and Adam moments moved too, training continues as if the layout had never changed.

Source formats (what DeepSpeed 0.19 writes for our runs; targets are the same engines, live):

- ZeRO-1/2 (``zero_pp_rank_{R}_mp_rank_00_optim_states.pt``, one per rank) and bf16 without ZeRO
  (``bf16_zero_pp_rank_...``): per optimizer group a flat fp32 partition, the base optimizer's state of that
  partition, and ``param_slice_mappings`` (parameter name -> (start, numel) inside the partition). A
  parameter's full value is its fragments concatenated in partition order; non-expert groups are
  partitioned over all ranks, expert groups over the ranks holding the same experts (expert-data-parallel
  group), which is why each rank records its ``ep_rank`` / ``expert_dp_rank`` in ``recipe_rank{R}.pt``.
- ZeRO-3 (``zero_pp_rank_{R}_mp_rank_00_optim_states.pt`` beside ``..._model_states.pt``): per optimizer
  sub-group a flat fp32 partition and its Adam state, concatenating one partition of every parameter of the
  sub-group (listed in the model-states file's ``param_shapes``); experts are split over their
  expert-data-parallel group, dense weights over all ranks (ZeRO-3 records which, ``ds_zero_partition_groups``).
- ZeRO-1/2 with tensor parallelism (``zero_pp_rank_{D}_mp_rank_{T}_optim_states.pt``): one such set per TP rank
  over its data-parallel ranks, holding that rank's slices (``recipe.model.tp_layout``), joined after reading;
  ``sliced_for_tp`` cuts them again for an engine of another TP size.
- fp32 without ZeRO (``expp_rank_{E}_mp_rank_00_optim_states.pt``, one per expert-parallel rank): the torch
  optimizer's own state dict, keyed by parameter index; the names behind the indices are recorded by the
  trainer in ``recipe_rank{R}.pt`` (``optimizer_param_names``).

Names: a parameter name is local to its expert-parallel rank (stacked or per-expert, local ids; the forms
are in ``recipe.model.expert_keys``). ``OptimizerState`` stores everything under the per-expert state-dict
keys with global expert ids, the same key space as ``recipe.checkpoint.consolidated_state_dict``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import RankState, _latest_in, consolidated_state_dict, saved_rank_states
from .config import config_from_saved
from .model.expert_keys import global_keys, is_expert_parameter, parse_stacked
from .model.tp_layout import QKVRows, join_state_dicts, qkv_rows, tp_slice

QUANTITIES = ("fp32", "exp_avg", "exp_avg_sq")  # master weight and Adam's two moments


class ReshardError(ValueError):
    """The checkpoint's optimizer state cannot be read into per-parameter tensors (the message says why)."""


@dataclass
class OptimizerState:
    tensors: dict[str, dict[str, torch.Tensor]]  # quantity -> {global state-dict key: fp32 tensor}
    step: float  # optimizer steps taken (Adam's bias-correction count)


# fragments[(ep_rank, local parameter name)][quantity] -> [(partition index, tensor)]
Fragments = dict[tuple[int, str], dict[str, list[tuple[int, torch.Tensor]]]]


# ---- local parameter names <-> per-expert keys with global ids ----

def to_global_keys(name: str, value: torch.Tensor, ep_rank: int, num_local_experts: int) -> dict[str, torch.Tensor]:
    """One local parameter as entries of the global key space (several for stacked experts)."""
    keys = global_keys(name, ep_rank, num_local_experts)
    if parse_stacked(name) is None:
        return {keys[0]: value}
    if value.shape[0] != num_local_experts:
        raise ReshardError(f"{name} holds {value.shape[0]} experts, expected {num_local_experts}")
    return dict(zip(keys, value.unbind(0)))


def from_global_keys(name: str, store: dict[str, torch.Tensor], ep_rank: int, num_local_experts: int) -> torch.Tensor:
    """The value of local parameter ``name`` on ``ep_rank``, assembled from global keys (inverse of the above)."""
    keys = global_keys(name, ep_rank, num_local_experts)
    missing = [key for key in keys if key not in store]
    if missing:
        raise ReshardError(f"the checkpoint's optimizer state has no entry for {missing[0]} (parameter {name}); "
                           f"it was saved from another model")
    return store[keys[0]] if parse_stacked(name) is None else torch.stack([store[key] for key in keys])


# ---- reading a checkpoint ----

def read_optimizer_state(folder: str | Path, weights: dict[str, torch.Tensor], num_experts: int,
                         rows: Optional[QKVRows] = None) -> OptimizerState:
    """Per-parameter fp32 master weights and Adam moments of the checkpoint in ``folder``.

    ``weights``: the checkpoint's consolidated weights (global keys); they give each parameter's shape.
    Each saving rank's layout comes from its ``recipe_rank{R}.pt``. ``rows``: the model's wqkv rows, needed to
    join a tensor-parallel checkpoint's slices.
    """
    folder = Path(folder)
    try:
        ranks = saved_rank_states(folder)
    except (OSError, RuntimeError, KeyError, TypeError) as exc:
        raise ReshardError(f"the per-rank state files of {folder} cannot be read ({exc})") from exc
    ep_size = ranks[0].ep_size
    for state in ranks:
        if state.ep_rank is None:
            raise ReshardError("the checkpoint predates optimizer resharding (its ranks did not record their "
                               "expert-parallel coordinates)")
    num_local = max(num_experts // ep_size, 1)
    if ranks[0].tp_size > 1:
        return _read_tensor_parallel(folder, ranks, weights, num_local, rows)
    zero_files = [_first_existing(folder, [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                                           f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"])
                  for r in range(len(ranks))]
    if all(path is not None for path in zero_files):
        reader = _read_zero3 if ranks[0].zero_stage == 3 else _read_partitioned
        return reader(zero_files, ranks, weights, num_local)
    torch_files = [folder / f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(ep_size)]
    if all(path.is_file() for path in torch_files):
        return _read_torch_optimizer(torch_files, ranks, num_local)
    raise ReshardError(f"{folder} holds no optimizer shards this reader knows (ZeRO-1/2, bf16 or plain torch "
                       f"optimizer files)")


def _read_tensor_parallel(folder: Path, ranks: list[RankState], weights: dict[str, torch.Tensor], num_local: int,
                          rows: Optional[QKVRows]) -> OptimizerState:
    """ZeRO-1/2 under TP: each TP rank's data-parallel ranks partition that rank's slices
    (``zero_pp_rank_{D}_mp_rank_{T}``); read them as one ZeRO-1/2 run per TP rank, then join the slices."""
    tp_size = ranks[0].tp_size
    if rows is None:
        raise ReshardError("a tensor-parallel checkpoint needs the model's attention shape to join its slices")
    per_tp_rank = []
    for tp_rank in range(tp_size):
        peers = [state for state in ranks if state.tp_rank == tp_rank]
        files = [_first_existing(folder, [f"{prefix}zero_pp_rank_{state.dp_rank}_mp_rank_{tp_rank:02d}_"
                                          f"optim_states.pt" for prefix in ("", "bf16_")]) for state in peers]
        if any(path is None for path in files):
            raise ReshardError(f"{folder} lacks ZeRO-1/2 optimizer files of TP rank {tp_rank} (only ZeRO-1/2 and "
                               f"bf16 optimizer state is carried across tensor-parallel layouts)")
        local = {key: tp_slice(key, value, tp_rank, tp_size, rows) for key, value in weights.items()}
        per_tp_rank.append(_read_partitioned(files, peers, local, num_local))
    steps = {state.step for state in per_tp_rank}
    if len(steps) != 1:
        raise ReshardError(f"the TP ranks' optimizer state disagrees on the step count ({sorted(steps)})")
    return OptimizerState(tensors={q: join_state_dicts([state.tensors[q] for state in per_tp_rank], rows)
                                   for q in QUANTITIES}, step=steps.pop())


def sliced_for_tp(state: OptimizerState, tp_rank: int, tp_size: int, rows: QKVRows) -> OptimizerState:
    """TP rank ``tp_rank``'s slices of every tensor, to write into an engine of ``tp_size``."""
    return OptimizerState(tensors={q: {key: tp_slice(key, value, tp_rank, tp_size, rows)
                                       for key, value in values.items()} for q, values in state.tensors.items()},
                          step=state.step)


def _first_existing(folder: Path, names: list[str]) -> Optional[Path]:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ReshardError(f"{path} cannot be read ({exc}); the file is truncated or corrupt") from exc


def _read_partitioned(files: list[Path], ranks: list[RankState], weights: dict[str, torch.Tensor],
                      num_local: int) -> OptimizerState:
    fragments: Fragments = {}
    steps = set()
    for path, coords in zip(files, ranks):
        saved = _load(path)["optimizer_state_dict"]
        base = saved["base_optimizer_state"]
        group_states = [base["state"][g] for g in range(len(saved["param_slice_mappings"]))] \
            if isinstance(base, dict) else base  # torch state dict, or the elastic per-group list
        for g, mapping in enumerate(saved["param_slice_mappings"]):
            _check_adam(group_states[g], path.name)
            flat = {"fp32": saved["single_partition_of_fp32_groups"][g],
                    "exp_avg": group_states[g]["exp_avg"], "exp_avg_sq": group_states[g]["exp_avg_sq"]}
            steps.add(float(group_states[g]["step"]))
            for name, address in mapping.items():
                expert = is_expert_parameter(name)
                partition = coords.expert_dp_rank if expert else coords.dp_rank
                owner = coords.ep_rank if expert else 0
                entry = fragments.setdefault((owner, name), {q: [] for q in QUANTITIES})
                for q in QUANTITIES:
                    entry[q].append((partition, flat[q].narrow(0, address.start, address.numel).float()))
    return _assemble(fragments, steps, weights, num_local, padded=False)


def _assemble(fragments: Fragments, steps: set, weights: dict[str, torch.Tensor], num_local: int,
              padded: bool) -> OptimizerState:
    """Each parameter's fragments concatenated in partition order, under global keys. ``padded``: ZeRO-3 gives
    every partition ceil(n / partitions) values, so the last holds fewer than one value per partition of padding."""
    if len(steps) != 1:
        raise ReshardError(f"optimizer groups disagree on the step count ({sorted(steps)})")
    tensors: dict[str, dict[str, torch.Tensor]] = {q: {} for q in QUANTITIES}
    for (ep_rank, name), entry in fragments.items():
        shape = from_global_keys(name, weights, 0, num_local).shape  # same on every expert-parallel rank
        for q in QUANTITIES:
            parts = sorted(entry[q], key=lambda item: item[0])
            if len({index for index, _ in parts}) != len(parts):
                raise ReshardError(f"{name}: two optimizer shards claim the same partition")
            full = torch.cat([t for _, t in parts])
            padding = full.numel() - shape.numel()
            if not (0 <= padding < len(parts) if padded else padding == 0):
                raise ReshardError(f"{name}: optimizer fragments hold {full.numel()} values, the parameter "
                                   f"{shape.numel()}; a shard is missing")
            tensors[q].update(to_global_keys(name, full[:shape.numel()].view(shape), ep_rank, num_local))
    return OptimizerState(tensors=tensors, step=steps.pop())


def _read_zero3(files: list[Path], ranks: list[RankState], weights: dict[str, torch.Tensor],
                num_local: int) -> OptimizerState:
    """ZeRO-3 (``files``, one per rank, ``[bf16_]zero_pp_rank_{R}_mp_rank_00_optim_states.pt``): per optimizer
    sub-group, each rank's flat fp32 partition and Adam state concatenate every parameter's partition, in the
    order its model-states file lists the sub-group's parameters (``param_shapes``); a parameter of n values split
    over p ranks has ceil(n / p) of them on each. Which ranks split a sub-group is ZeRO-3's own record
    (``ds_zero_partition_groups``): all ranks for dense weights, the expert-data-parallel group for experts
    (``ShardedMoE``)."""
    fragments: Fragments = {}
    steps = set()
    for rank, (path, coords) in enumerate(zip(files, ranks)):
        saved = _load(path)["optimizer_state_dict"]
        shapes = _load(path.parent / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")["param_shapes"]
        placement = {entry["sub_group"]: entry for entry in saved["ds_zero_partition_groups"]}
        if len(shapes) != len(saved["fp32_flat_groups"]) or set(placement) != set(range(len(shapes))):
            raise ReshardError(f"rank {rank}'s ZeRO-3 files disagree on the optimizer sub-groups")
        for group, names in enumerate(shapes):
            state = saved["optimizer_state_dict"]["state"][group]
            _check_adam(state, f"rank {rank}'s ZeRO-3 state")
            steps.add(float(state["step"]))
            flat = {"fp32": saved["fp32_flat_groups"][group], "exp_avg": state["exp_avg"],
                    "exp_avg_sq": state["exp_avg_sq"]}
            count, index, offset = placement[group]["partition_count"], placement[group]["partition_rank"], 0
            for name, shape in names.items():
                size = -(-shape.numel() // count)
                owner = coords.ep_rank if is_expert_parameter(name) else 0
                entry = fragments.setdefault((owner, name), {q: [] for q in QUANTITIES})
                for q in QUANTITIES:
                    entry[q].append((index, flat[q].narrow(0, offset, size).float()))
                offset += size
    return _assemble(fragments, steps, weights, num_local, padded=True)


def _check_adam(state: dict, where: str) -> None:
    unknown = set(state) - {"step", "exp_avg", "exp_avg_sq"}
    if unknown:
        raise ReshardError(f"{where} holds optimizer state {sorted(unknown)}; only Adam/AdamW state "
                           f"(step, exp_avg, exp_avg_sq) is carried across layouts")


def _read_torch_optimizer(files: list[Path], ranks: list[RankState], num_local: int) -> OptimizerState:
    names_by_ep = {state.ep_rank: state.optimizer_param_names for state in ranks}
    tensors: dict[str, dict[str, torch.Tensor]] = {q: {} for q in QUANTITIES}
    steps = set()
    for ep_rank, path in enumerate(files):
        names = names_by_ep.get(ep_rank)
        if names is None:
            raise ReshardError("the checkpoint did not record its optimizer's parameter names")
        saved = _load(path)["optimizer"]
        for group, group_names in zip(saved["param_groups"], names):
            for index, name in zip(group["params"], group_names):
                state = saved["state"].get(index)
                if state is None:  # never stepped: nothing to carry
                    continue
                steps.add(float(state["step"]))
                for q in ("exp_avg", "exp_avg_sq"):
                    tensors[q].update(to_global_keys(name, state[q].float(), ep_rank, num_local))
    if len(steps) > 1:
        raise ReshardError(f"optimizer parameters disagree on the step count ({sorted(steps)})")
    del tensors["fp32"]  # the model weights are the fp32 master here
    return OptimizerState(tensors=tensors, step=steps.pop() if steps else 0.0)


# ---- writing into a live engine ----

@torch.no_grad()
def load_optimizer_state(engine, state: OptimizerState, ep_rank: int, num_local_experts: int) -> None:
    """Write ``state`` into ``engine``'s optimizer at this rank's layout (call after ``deepspeed.initialize``,
    before the first step, on every rank: ZeRO-3 gathers its persistent parameters afterwards).

    ZeRO-1/2 and DeepSpeed's bf16 optimizer keep one flat fp32 partition per group and map every parameter
    onto its fragment of it (``param._hp_mapping``: where the fragment starts in the parameter and in the
    partition); Adam's moments live in the base optimizer's state of that flat partition, created here
    (torch creates it lazily at the first step). The plain torch optimizer (fp32 without ZeRO) keeps state
    per parameter.
    """
    params = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    optimizer = engine.optimizer
    if all(hasattr(p, "ds_id") for _, p in params):
        _load_zero3(optimizer, params, state, ep_rank, num_local_experts)
    elif all(hasattr(p, "_hp_mapping") for _, p in params):  # None where this rank's partition holds none of p
        base = optimizer.optimizer
        for group in base.param_groups:
            for flat in group["params"]:
                entry = base.state[flat]
                for q in ("exp_avg", "exp_avg_sq"):
                    entry.setdefault(q, torch.zeros_like(flat))
                _set_step(entry, state.step)
        for name, p in params:
            fragment = p._hp_mapping
            if fragment is None:  # this rank's partition holds no part of p
                continue
            flat = base.param_groups[fragment.param_group_index]["params"][0]
            source = fragment.lp_fragment_address
            target = fragment.hp_fragment_address
            for q, values in state.tensors.items():
                value = from_global_keys(name, values, ep_rank, num_local_experts).reshape(-1)
                piece = value.narrow(0, source.start, source.numel)
                destination = fragment.hp_fragment if q == "fp32" else base.state[flat][q].narrow(
                    0, target.start, target.numel)
                destination.copy_(piece)
            if "fp32" in state.tensors:
                fragment.update_lp()  # the module's (bf16) copy of this fragment follows its master
    elif isinstance(optimizer, torch.optim.Optimizer):
        for name, p in params:
            entry = optimizer.state[p]
            for q in ("exp_avg", "exp_avg_sq"):
                value = from_global_keys(name, state.tensors[q], ep_rank, num_local_experts)
                entry[q] = value.to(device=p.device, dtype=torch.float32).clone()
            if "fp32" in state.tensors:  # a ZeRO / bf16 source: its master weights are the exact weights
                p.data.copy_(from_global_keys(name, state.tensors["fp32"], ep_rank, num_local_experts))
            _set_step(entry, state.step)
    else:
        raise ReshardError(f"optimizer {type(optimizer).__name__} keeps its state in a form this loader does "
                           f"not know (fp16 without ZeRO?)")


def _load_zero3(optimizer, params, state: OptimizerState, ep_rank: int, num_local_experts: int) -> None:
    """ZeRO-3: each parameter's partition of the master weights and moments (ceil(n / partitions) values of the
    flattened tensor, the last padded), found through the optimizer's own map from parameter to sub-group slice;
    then the module's 16-bit partitions follow the masters, as after an optimizer step."""
    base = optimizer.optimizer
    for flat in optimizer.fp32_partitioned_groups_flat:
        entry = base.state[flat]
        for q in ("exp_avg", "exp_avg_sq"):
            entry.setdefault(q, torch.zeros_like(flat))
        _set_step(entry, state.step)
    for name, p in params:
        index = optimizer._get_param_partition_rank(p)
        for q, values in state.tensors.items():
            target, _ = optimizer._get_fp32_opt_state_partition(p, False, None if q == "fp32" else q)
            full = from_global_keys(name, values, ep_rank, num_local_experts).reshape(-1)
            start = index * target.numel()
            piece = full[start:start + target.numel()]
            target[:piece.numel()].copy_(piece)
    if "fp32" in state.tensors:
        for group in range(len(optimizer.fp32_partitioned_groups_flat)):
            optimizer._reassign_or_swap_out_partitioned_parameters(group)
        optimizer.checkpoint_event_epilogue()  # parameters kept whole on every rank are gathered anew


def _set_step(entry: dict, step: float) -> None:
    if torch.is_tensor(entry.get("step")):
        entry["step"].fill_(step)
    else:
        entry["step"] = torch.tensor(step, dtype=torch.float32)


def master_state_dict(checkpoint_dir: str | Path, tag: Optional[str] = None) -> tuple[dict, dict, bool]:
    """The checkpoint's weights at full precision: like ``consolidated_state_dict`` (global expert ids), but
    for bf16/fp16 runs every trained weight is the optimizer's fp32 master rather than its 16-bit module copy.

    Returns (state, client state, whether master weights were used). fp32 runs need no optimizer files.
    """
    root = Path(checkpoint_dir)
    tag = tag or _latest_in(root)
    weights, client = consolidated_state_dict(root, tag)
    if all(not v.is_floating_point() or v.dtype == torch.float32 for v in weights.values()):
        return weights, client, False
    config = config_from_saved(client["config"])
    model = client["config"]["model"]
    masters = read_optimizer_state(root / tag, weights, model["num_experts"], qkv_rows(config)).tensors.get("fp32", {})
    state = {key: masters.get(key, value).float() for key, value in weights.items()}
    if model.get("tie_word_embeddings") and "embedding.weight" in masters:
        state["lm_head.weight"] = state["embedding.weight"]  # one parameter, two state-dict keys
    return state, client, True


def best_weights(checkpoint_dir: str | Path, tag: Optional[str] = None) -> tuple[dict, dict, bool]:
    """``master_state_dict``, or where the optimizer's fp32 masters cannot be read (older checkpoints, fp16
    without ZeRO) the 16-bit weights upcast, with a warning on stderr: still a faithful model, only rounded."""
    try:
        return master_state_dict(checkpoint_dir, tag)
    except ReshardError as exc:
        print(f"warning: fp32 master weights not readable ({exc}); using the 16-bit weights upcast", file=sys.stderr)
        state, client = consolidated_state_dict(checkpoint_dir, tag)
        return state, client, False
