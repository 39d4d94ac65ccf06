"""Where a launch starts from (fresh, resumed at the same layout, or resharded from another) and how it saves.

The checkpoint layout, its commit protocol and the per-rank ``RankState`` are in ``recipe/checkpoint.py``;
moving optimizer state between layouts is ``recipe/reshard.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import deepspeed
import torch

from ..checkpoint import (MODEL_FILE, RankState, begin, checkpoint_root, commit, consolidated_state_dict,
                          expert_file_name, load_recipe_state, prune, rng_state, save_atomic, save_recipe_state,
                          set_rng_state, step_tag)
from ..hf_format import HF_SOURCE_CONFIG
from ..init_from import parse_init_from
from ..model.expert_keys import local_to_global, parse_expert_key, shard_experts
from ..model.moe.dispatch import expert_data_parallel_rank, tensor_parallel_rank
from ..model.transformer import TransformerLM
from ..model.tp_layout import qkv_rows
from ..reshard import ReshardError, load_optimizer_state, read_optimizer_state, sliced_for_tp
from .distributed import Ranks, barrier, ranks_where
from .plan import RunPlan, schedule_change

if TYPE_CHECKING:
    from .build import Job

Log = Callable[[str], None]


@dataclass
class ReshardSource:
    weights: dict[str, torch.Tensor]  # the whole saved model, global expert ids
    client_state: dict  # what the engine saved beside the weights (LR schedule, step, config)


def read_reshard_source(plan: RunPlan) -> ReshardSource:
    weights, client_state = consolidated_state_dict(checkpoint_root(plan.run_dir), plan.resume_tag)
    return ReshardSource(weights=weights, client_state=client_state)


def load_resharded_weights(model: TransformerLM, source: ReshardSource, ep_rank: int) -> None:
    model.load_state_dict(shard_experts(source.weights, ep_rank, model.num_local_experts))


def start_or_resume(plan: RunPlan, job: Job, ranks: Ranks, log: Log) -> Optional[int]:
    """The last step already trained (0 for a fresh run); None when this launch's checkpoint cannot be loaded,
    which every rank has learned and one has said."""
    if ranks.is_main:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    if plan.reshard:
        start_step = resume_resharded(plan, job, log)
    elif plan.resume_tag is not None:
        start_step = resume(plan, job, ranks, log)
    else:
        start_step = 0
        if ranks.is_main:
            _write_run_config(plan)
    if start_step is not None and plan.saved_lr_schedule is not None:
        _report_schedule_change(plan, job, start_step, ranks, log)
    if start_step is not None and ranks.is_main:  # a failed load writes nothing
        tokenizer = job.val_data.tokenizer_path  # tokenizer.model or tokenizer.json, as the shards' meta says
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, plan.run_dir / tokenizer.name)
    return start_step


def _write_run_config(plan: RunPlan) -> None:
    ds = plan.ds
    init = plan.config.train.init_from
    source = parse_init_from(init).path / "config.json" if init is not None else None
    if source is not None and not (source.parent / "checkpoints").is_dir():  # a Hugging Face folder, not a run:
        shutil.copyfile(source, plan.run_dir / HF_SOURCE_CONFIG)  # the export writes its fields back
    (plan.run_dir / "config.json").write_text(json.dumps(
        {"config": plan.config.to_dict(), "ds_config": ds.deepspeed, "ds_config_path": ds.path, "ep_size": ds.ep_size,
         "world_size": plan.world_size}, indent=2))


def resume(plan: RunPlan, job: Job, ranks: Ranks, log: Log) -> Optional[int]:
    """Same layout: DeepSpeed loads its own files, each rank its data position and RNG state."""
    tag, root = plan.resume_tag, checkpoint_root(plan.run_dir)
    # plan_run checked the files' sizes; what can still fail (a file damaged in place, an older checkpoint
    # without sizes) ends every rank with one line instead of a DeepSpeed traceback. Loading involves no
    # collective, so the ranks meet again in the vote below whatever happened.
    failure = None
    try:
        own = load_recipe_state(plan.run_dir, tag, ranks.rank)
        loaded, _ = job.engine.load_checkpoint(str(root), tag=tag)
        if loaded is None:
            raise FileNotFoundError("DeepSpeed found no model states file in it")
        job.loader.load_state_dict(own.loader)
        set_rng_state(own.rng)
    except Exception as exc:  # noqa: BLE001 - anything here means the checkpoint cannot be used
        failure = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if ranks_where(failure is not None):
        if failure is not None:
            print(f"error: rank {ranks.rank} cannot load checkpoint {tag} from {root} ({failure}); its files are "
                  f"damaged: move that folder out of {root} (or delete it) to --resume from the newest older "
                  f"complete checkpoint; nothing was written", file=sys.stderr, flush=True)
        return None
    put_schedule_rate(job.scheduler)
    log(f"resumed from {tag} (step {own.step})")
    return own.step


def put_schedule_rate(scheduler) -> None:
    """Put the rate of the restored schedule at its restored position into the optimizer's groups, so that the
    first resumed step runs at it on both resume paths: a same-layout load brings the rate the optimizer saved
    (the old schedule's, should its lengths have changed), a resharded one the initial rate."""
    if scheduler is None:
        return
    if hasattr(scheduler, "last_batch_iteration"):  # DeepSpeed's lr_schedules: their state is the position only
        scheduler.step(scheduler.last_batch_iteration)
    else:  # torch.optim.lr_scheduler: its state holds its lengths and the rates it last set
        for group, rate in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = rate


def _scheduled_rate(block: dict, base_lr: float, position: int) -> float:
    """The rate DeepSpeed's scheduler ``block`` sets at ``position`` for an optimizer of rate ``base_lr``."""
    from deepspeed.runtime import lr_schedules

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = getattr(lr_schedules, block["type"])(probe, **block.get("params", {}))
    scheduler.step(position)
    return probe.param_groups[0]["lr"]


def _report_schedule_change(plan: RunPlan, job: Job, start_step: int, ranks: Ranks, log: Log) -> None:
    """train.lr_schedule_on_resume "keep" / "stretch" took effect: say so; "stretch" also records the new
    schedule in config.json, which the next --resume compares against."""
    saved, now = plan.saved_lr_schedule, plan.ds.deepspeed.get("scheduler", {})
    if plan.config.train.lr_schedule_on_resume == "keep":
        log(f"train.lr_schedule_on_resume='keep': continuing the saved LR schedule ({saved.get('type', 'none')} "
            f"{json.dumps(saved.get('params', {}))}), not this launch's")
        return
    base_lr = plan.ds.deepspeed["optimizer"].get("params", {}).get("lr", 1e-3)  # torch's Adam/AdamW default
    position = job.scheduler.last_batch_iteration
    before, after = _scheduled_rate(saved, base_lr, position), _scheduled_rate(now, base_lr, position)
    log(f"train.lr_schedule_on_resume='stretch': LR schedule {schedule_change(saved, now)}; the rate jumps from "
        f"{before:.3g} to {after:.3g} at step {start_step + 1}")
    if ranks.is_main:
        _record_schedule(plan)


def _record_schedule(plan: RunPlan) -> None:
    """config.json now names the schedule the run follows (and the train.steps that resolved it)."""
    path = plan.run_dir / "config.json"
    run = json.loads(path.read_text())
    run["ds_config"]["scheduler"] = plan.ds.deepspeed["scheduler"]
    run["config"]["train"]["steps"] = plan.config.train.steps
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(run, indent=2))
    os.replace(partial, path)  # never half a config.json


def resume_resharded(plan: RunPlan, job: Job, log: Log) -> int:
    """Another layout: the weights are in place already (``build_job``); LR schedule, data position, fp32 master
    weights and Adam moments follow."""
    tag, source = plan.resume_tag, job.reshard_source
    if job.scheduler is not None:
        job.scheduler.load_state_dict(source.client_state["lr_scheduler"])
        put_schedule_rate(job.scheduler)  # else the first step runs at the initial rate
    own = load_recipe_state(plan.run_dir, tag, 0)  # the data position is global; RNG is per layout
    job.loader.load_state_dict(own.loader)
    start_step = job.engine.global_steps = own.step
    try:
        rows = qkv_rows(plan.config)
        moved = read_optimizer_state(checkpoint_root(plan.run_dir) / tag, source.weights, plan.config.model.num_experts,
                                     rows)
        if plan.ds.tp_size > 1:
            moved = sliced_for_tp(moved, tensor_parallel_rank(), plan.ds.tp_size, rows)
        load_optimizer_state(job.engine, moved, job.ep_rank, job.model.num_local_experts)
        carried = "fp32 master weights, Adam moments, "
    except ReshardError as exc:  # the weights are in place already; only the moments are lost
        carried = ""
        log(f"warning: optimizer state not carried over ({exc}); Adam moments restart from zero")
    log(f"resharded {tag} (step {start_step}) into {plan.world_size} ranks, ep_size {plan.ds.ep_size}: "
        f"weights, {carried}data position and LR schedule carried over")
    return start_step


def save(plan: RunPlan, job: Job, ranks: Ranks, step: int) -> None:
    """Every rank writes its files into the tag's folder; rank 0 commits the checkpoint once all are in place."""
    tag, root = step_tag(step), checkpoint_root(plan.run_dir)
    if ranks.is_main:
        begin(plan.run_dir, tag)
    barrier()
    save_recipe_state(plan.run_dir, tag, ranks.rank, rank_state(plan, job, ranks, step))
    client_state = {"step": step, "config": plan.config.to_dict(), "tp_size": plan.ds.tp_size}
    job.engine.save_checkpoint(str(root), tag=tag, save_latest=False, client_state=client_state)
    if plan.ds.zero_stage == 3:
        write_gathered_weights(job, root / tag, ranks, plan.ds.ep_size, client_state)
    barrier()  # every rank's files are written
    if ranks.is_main:
        commit(plan.run_dir, tag, ranks.world_size, len(job.model.moe_layers()), plan.config.model.num_experts,
               plan.ds.tp_size)
        prune(plan.run_dir, plan.config.train.keep_last)
    barrier()


def write_gathered_weights(job: Job, folder: Path, ranks: Ranks, ep_size: int, client_state: dict) -> None:
    """ZeRO-3: the engine's model-states files hold partition placeholders only. Write the recipe's layout beside
    them, as ZeRO 0-2 runs have it (``mp_rank_00_model_states.pt`` with the non-expert weights, LR schedule and
    client state; one file per expert), from weights gathered one module at a time (a collective: every rank
    joins), so that generate, export and --reshard read ZeRO-3 checkpoints like any other. Rank 0 writes the
    dense file, the first rank of each expert-data-parallel group its experts."""
    model, num_local = job.model, job.model.num_local_experts
    writes_experts = bool(model.moe_layers()) and expert_data_parallel_rank(ep_size) == 0
    dense: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (MoE layer, global expert) -> its entries
    for prefix, module, moe_layer in _save_units(model):
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            for key, value in module.state_dict(prefix=prefix).items():  # copied only by the rank that writes it
                if parse_expert_key(key) is None:
                    if ranks.is_main:
                        dense[key] = value.detach().cpu().clone()
                elif writes_experts:
                    global_key = local_to_global(key, job.ep_rank, num_local)
                    expert = parse_expert_key(global_key).expert
                    experts.setdefault((moe_layer, expert), {})[global_key] = value.detach().cpu().clone()
    if ranks.is_main:
        scheduler = job.engine.lr_scheduler
        save_atomic({**client_state, "module": dense, "num_experts": [m.num_experts for m in model.moe_layers()],
                     "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "global_steps": job.engine.global_steps}, folder / MODEL_FILE)
    for (moe_layer, expert), entries in experts.items():
        save_atomic(entries, folder / expert_file_name(moe_layer, expert))


def _save_units(model: TransformerLM):
    """(state-dict prefix, module, index of its MoE layer or None) for each top-level module, blocks one by one:
    the pieces ``write_gathered_weights`` gathers in turn."""
    moe_layer = 0
    for name, child in model.named_children():
        if not isinstance(child, torch.nn.ModuleList):
            yield f"{name}.", child, None
            continue
        for index, block in enumerate(child):
            yield f"{name}.{index}.", block, moe_layer if getattr(block, "is_moe", False) else None
            moe_layer += int(getattr(block, "is_moe", False))


def rank_state(plan: RunPlan, job: Job, ranks: Ranks, step: int) -> RankState:
    """This rank's ``recipe_rank{R}.pt``: what resumes it, and what --reshard needs to read its optimizer shard
    back at another layout (recipe/reshard.py)."""
    param_names = None
    optimizer = job.engine.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):  # plain torch optimizer: state keyed by index
        names = {p: n for n, p in job.engine.module.named_parameters()}
        param_names = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    return RankState(
        step=step, loader=job.loader.state_dict(), rng=rng_state(), world_size=ranks.world_size,
        ep_size=plan.ds.ep_size, rank=ranks.rank, ep_rank=job.ep_rank,
        expert_dp_rank=expert_data_parallel_rank(plan.ds.ep_size) if plan.config.is_moe else ranks.rank,
        zero_stage=plan.ds.zero_stage, precision=plan.ds.precision, tp_size=plan.ds.tp_size,
        tp_rank=ranks.tp_rank, optimizer_param_names=param_names)
