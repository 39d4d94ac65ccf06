"""Train an MoE (or dense) language model with the DeepSpeed engine.

Run by the deepspeed launcher (see launch/train.sh)::

    deepspeed --num_gpus 2 -m recipe.train --config recipe/configs/tiny_moe.py \
        --ds_config ds_configs/zero2_fp32_ep2.json --set train.steps=100

Everything is validated before the process group starts. Each rank then trains on its shard of every
global batch; rank 0 writes ``<run_dir>/metrics.jsonl`` (one JSON object per logged step or eval)
and ``<run_dir>/summary.json`` at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, RecipeConfig, config_from_saved, load_config, parameter_counts
from .ds_config import DSConfig, read_ds_config, resolve_ds_config
from .metrics import MetricsWriter, expert_load_heatmap

DEFAULT_CONFIG = "recipe/configs/tiny_moe.py"
DEFAULT_DS_CONFIG = "ds_configs/zero2_fp32_ep2.json"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipe.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Python model/train config (recipe/configs/*.py)")
    parser.add_argument("--ds_config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON (ds_configs/*.json)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set model.num_experts=16 (repeatable)")
    parser.add_argument("--run_dir", help="where checkpoints and metrics go (default: train.run_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    parser.add_argument("--reshard", action="store_true",
                        help="with --resume: move the checkpoint into a different rank count / ep_size / ZeRO stage "
                             "(weights, fp32 master weights, Adam moments, data position and LR schedule carry over)")
    parser.add_argument("--samples", type=int, default=0, help="print this many generated samples at the end")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


@dataclass
class Setup:
    config: RecipeConfig
    ds: DSConfig
    run_dir: Path
    world_size: int
    resume_tag: Optional[str] = None
    reshard: bool = False  # resume into another layout: weights only


def setup(args: argparse.Namespace) -> Setup:
    """All checks that need no process group: config, ds_config, data, run dir. Raises ConfigError."""
    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir!r}")
    if args.resume:
        overrides.append("train.resume=True")
    config = load_config(args.config, overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds = resolve_ds_config(read_ds_config(args.ds_config), config, world_size, args.ds_config)

    from .data.loader import TokenDataset

    try:
        train_data = TokenDataset(Path(config.data.path), "train")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    if train_data.vocab_size != config.model.vocab_size:
        raise ConfigError(
            f"`model.vocab_size` ({config.model.vocab_size}) differs from the tokenizer of {config.data.path} "
            f"({train_data.vocab_size}); set model.vocab_size={train_data.vocab_size} or prepare the data again"
        )
    made_by = train_data.meta.get("tokenizer_sha256")  # None in data prepared without it: nothing to compare
    tokenizer = Path(config.data.path) / train_data.meta.get("tokenizer_model", "tokenizer.model")
    if made_by and tokenizer.is_file() and _sha256(tokenizer) != made_by:
        raise ConfigError(f"{tokenizer} is not the tokenizer the token shards in {config.data.path} were made with "
                          f"(sha256 differs); prepare the data again (make data) or put that tokenizer back")
    samples = (train_data.num_tokens - 1) // config.data.seq_len
    if samples < ds.micro_batch_size * world_size:
        raise ConfigError(
            f"{config.data.path} holds {samples} sequences of {config.data.seq_len} tokens, fewer than one global "
            f"micro-batch ({ds.micro_batch_size} x {world_size} ranks); lower data.seq_len or the micro batch"
        )

    run_dir = Path(config.train.run_dir)
    from .checkpoint import checkpoint_root, latest_tag, load_recipe_state, resume_problem

    has_checkpoint = checkpoint_root(run_dir).is_dir() and any(checkpoint_root(run_dir).iterdir())
    if config.train.resume:
        tag = latest_tag(run_dir)
        if tag is None:
            raise ConfigError(f"--resume: no complete checkpoint in {checkpoint_root(run_dir)}; "
                              f"train without --resume first")
        problem = resume_problem(run_dir, tag)  # files missing or changed size since the checkpoint was committed
        if problem:
            raise ConfigError(problem)
        trained_with = run_dir / "tokenizer.model"
        if made_by and trained_with.is_file() and _sha256(trained_with) != made_by:
            raise ConfigError(f"--resume into {run_dir}, trained on tokens of its {trained_with.name}, but the shards "
                              f"in {config.data.path} were made by another tokenizer; resume with the data it was "
                              f"trained on, or train anew in another --run_dir")
        saved = config_from_saved(json.loads((run_dir / "config.json").read_text())["config"]).to_dict()
        mismatched = [key for key in ("model_type", "model") if saved[key] != config.to_dict()[key]]
        if mismatched:
            diff = {k: (saved["model"][k], v) for k, v in config.to_dict()["model"].items() if saved["model"].get(k) != v}
            raise ConfigError(
                f"--resume into {run_dir}, which was trained with another model config "
                f"(saved vs now: {diff or saved['model_type']}); use the same config or a new --run_dir"
            )
        saved_layout = load_recipe_state(run_dir, tag, 0)
        # DeepSpeed's own loader needs the ranks, expert-parallel size, ZeRO stage and precision the checkpoint
        # was written with (checkpoints from before the last two were recorded: assume unchanged).
        saved_shape = (saved_layout.world_size, saved_layout.ep_size,
                       ds.zero_stage if saved_layout.zero_stage is None else saved_layout.zero_stage,
                       saved_layout.precision or ds.precision)
        same_layout = saved_shape == (world_size, ds.ep_size, ds.zero_stage, ds.precision)
        if not same_layout and not args.reshard:
            raise ConfigError(
                f"checkpoint {tag} was saved with {saved_shape[0]} ranks and ep_size {saved_shape[1]} (ZeRO-"
                f"{saved_shape[2]} {saved_shape[3]}), this launch has {world_size} ranks and ep_size {ds.ep_size} "
                f"(ZeRO-{ds.zero_stage} {ds.precision}); resume with the same layout, or add --reshard to move it "
                f"into this one"
            )
        saved_batch = saved_layout.loader["global_micro_batch"]
        if args.reshard and saved_batch != ds.micro_batch_size * world_size:
            raise ConfigError(
                f"--reshard keeps the data order, so the global micro-batch must stay {saved_batch} sequences; "
                f"set train_micro_batch_size_per_gpu to {saved_batch} / number of ranks"
            )
        return Setup(config=config, ds=ds, run_dir=run_dir, world_size=world_size, resume_tag=tag,
                     reshard=not same_layout)
    elif has_checkpoint:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another "
                          f"--run_dir (nothing was overwritten)")
    elif args.reshard:
        raise ConfigError("--reshard only makes sense with --resume")
    return Setup(config=config, ds=ds, run_dir=run_dir, world_size=world_size)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms); DeepSpeed then splits out the expert parameters."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class RoutingTally:
    """Sums routing statistics of every MoE layer over micro-steps; reduced over ranks when logged."""

    def __init__(self, num_layers: int, num_experts: int):
        self.kept = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.first_choice = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.figures = torch.zeros(num_layers, 4, dtype=torch.float64)  # tokens, pairs, entropy·tokens, l_aux
        self.calls = 0

    def add(self, routing, l_aux_per_layer) -> None:
        for layer, (stats, l_aux) in enumerate(zip(routing, l_aux_per_layer)):
            self.kept[layer] += stats.tokens_per_expert.double().cpu()
            self.first_choice[layer] += stats.first_choice_count.double().cpu()
            self.figures[layer] += torch.tensor([stats.num_tokens, stats.num_tokens * stats.k,
                                                 float(stats.router_entropy) * stats.num_tokens, float(l_aux)],
                                                dtype=torch.float64)
        self.calls += 1

    def reduce_and_reset(self, all_reduce) -> list[dict]:
        packed = all_reduce(torch.cat([self.kept, self.first_choice, self.figures], dim=1))
        num_experts = self.kept.shape[1]
        kept, figures = packed[:, :num_experts], packed[:, 2 * num_experts:]
        world_calls = max(all_reduce(torch.tensor([float(self.calls)], dtype=torch.float64)).item(), 1.0)
        layers = []
        for layer in range(kept.shape[0]):
            tokens, pairs, entropy_sum, l_aux_sum = figures[layer].tolist()
            load = kept[layer]
            layers.append({
                "layer": layer,
                "tokens_per_expert": [int(v) for v in load.tolist()],
                "drop_fraction": 0.0 if pairs == 0 else 1.0 - load.sum().item() / pairs,
                "l_aux": l_aux_sum / world_calls,
                "router_entropy": entropy_sum / max(tokens, 1.0),
                "max_over_mean_load": load.max().item() / max(load.mean().item(), 1e-9),
            })
        self.kept.zero_(), self.first_choice.zero_(), self.figures.zero_()
        self.calls = 0
        return layers


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run = setup(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return train(run, samples=args.samples)


def release_shm_workspace(rank: int, barrier) -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce segment once every rank has mapped it.

    On one node the CPU accelerator's shm comm op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>`` (about 66 MB per rank) and never removes it: every run, finished or killed, would leave that
    much RAM taken until reboot. The mappings stay valid after the name is gone; the memory is freed when the
    last rank exits. The barrier makes sure no rank is still opening a peer's segment by name.
    """
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


def train(run: Setup, samples: int = 0) -> int:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    from .checkpoint import begin as begin_checkpoint
    from .checkpoint import checkpoint_root, consolidated_state_dict, latest_tag, load_recipe_state, prune, rng_state
    from .checkpoint import commit as commit_checkpoint
    from .checkpoint import RankState, save_recipe_state, set_rng_state, shard_experts, step_tag
    from .data.loader import BatchLoader, TokenDataset, eval_batches
    from .model.moe.dispatch import expert_data_parallel_rank, expert_parallel_rank
    from .model.transformer import TransformerLM
    from .reshard import ReshardError, load_optimizer_state, read_optimizer_state

    config, ds, run_dir = run.config, run.ds, run.run_dir
    # Keep the console to our progress lines: DeepSpeed's INFO chatter (MOE_RECIPE_DS_LOG=info brings it
    # back) and a deprecation warning DeepSpeed triggers inside torch on every ZeRO step.
    ds_logger.setLevel(getattr(logging, os.environ.get("MOE_RECIPE_DS_LOG", "warning").upper(), logging.WARNING))
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    release_shm_workspace(rank, dist.barrier)
    torch.manual_seed(config.train.seed * 1000 + rank)  # per-rank stream for routing noise, if enabled

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced)
        return reduced

    progress = None  # tqdm bar on rank 0 when stderr is a terminal; plain log lines otherwise

    def log(message: str) -> None:
        if is_main:
            if progress is not None:
                progress.write(message)
            else:
                print(message, flush=True)

    # ---- model, engine, data ----
    ep_rank = expert_parallel_rank(ds.ep_size) if config.is_moe else 0  # creates DeepSpeed's EP groups
    model = TransformerLM(config, ep_size=ds.ep_size)
    model.init_weights(config.train.seed, ep_rank)
    resharded_from = None
    if run.reshard:  # another layout: every expert file is read, this rank keeps its own experts
        resharded_weights, resharded_from = consolidated_state_dict(checkpoint_root(run_dir), run.resume_tag)
        model.load_state_dict(shard_experts(resharded_weights, ep_rank, model.moe_layers()[0].num_local_experts
                                            if config.is_moe else 1))
    weight_decay = ds.deepspeed["optimizer"].get("params", {}).get("weight_decay", 0.0)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                                   config=ds.deepspeed)
    # Non-finite guard, part 1. DeepSpeed's ZeRO-1/2 optimizer and its bf16/fp16 wrappers look at the gradients
    # before every update and, if any is inf/NaN (on any rank), apply nothing and set their `overflow` flag;
    # the engine then skips the LR scheduler step too and counts the step in `skipped_steps`. A plain torch
    # optimizer (ZeRO-0 fp32) has no such check: the recipe checks the gradients itself and, for a bad step,
    # has the engine run a no-op optimizer step and read the same `overflow` attribute (see the loop).
    own_grad_check = not hasattr(engine.optimizer, "overflow")
    if own_grad_check:
        engine.optimizer.overflow = False
    device = engine.device
    train_data = TokenDataset(Path(config.data.path), "train")
    val_data = TokenDataset(Path(config.data.path), "val")
    loader = BatchLoader(train_data, config.data.seq_len, ds.micro_batch_size, rank, world_size, seed=config.data.seed)
    counts = parameter_counts(config)

    start_step = 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    # What --reshard needs to read this rank's optimizer shard back at another layout (recipe/reshard.py).
    layout = {"rank": rank, "ep_rank": ep_rank, "expert_dp_rank": expert_data_parallel_rank(ds.ep_size)
              if config.is_moe else rank, "zero_stage": ds.zero_stage, "precision": ds.precision}
    if isinstance(engine.optimizer, torch.optim.Optimizer):  # plain torch optimizer: state keyed by index
        names = {p: n for n, p in engine.module.named_parameters()}
        layout["optimizer_param_names"] = [[names[p] for p in g["params"]] for g in engine.optimizer.param_groups]
    if config.train.resume and resharded_from is not None:
        if scheduler is not None:
            scheduler.load_state_dict(resharded_from["lr_scheduler"])
            # Put the schedule's current rate into the new optimizer's groups now, as loading the optimizer's
            # own state does on a same-layout resume; otherwise the first step runs at the initial rate.
            scheduler.step(scheduler.last_batch_iteration)
        own = load_recipe_state(run_dir, run.resume_tag, 0)  # the data position is global; RNG is per layout
        loader.load_state_dict(own.loader)
        start_step = engine.global_steps = own.step
        try:
            moved = read_optimizer_state(checkpoint_root(run_dir) / run.resume_tag, resharded_weights,
                                         config.model.num_experts)
            load_optimizer_state(engine, moved, ep_rank, model.moe_layers()[0].num_local_experts
                                 if config.is_moe else 1)
            carried = "fp32 master weights, Adam moments"
        except ReshardError as exc:  # the weights are in place already; only the moments are lost
            carried = None
            log(f"warning: optimizer state not carried over ({exc}); Adam moments restart from zero")
        log(f"resharded {run.resume_tag} (step {start_step}) into {world_size} ranks, ep_size {ds.ep_size}: "
            f"weights, {carried + ', ' if carried else ''}data position and LR schedule carried over")
    elif config.train.resume:
        tag = run.resume_tag
        # setup() checked the files' sizes; what can still fail (a file damaged in place, an older checkpoint
        # without sizes) ends every rank with one line instead of a DeepSpeed traceback. Loading involves no
        # collective, so the ranks meet again in the all-reduce below whatever happened.
        failure = None
        try:
            own = load_recipe_state(run_dir, tag, rank)
            loaded, _ = engine.load_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
            if loaded is None:
                raise FileNotFoundError("DeepSpeed found no model states file in it")
            loader.load_state_dict(own.loader)
            set_rng_state(own.rng)
        except Exception as exc:  # noqa: BLE001 - anything here means the checkpoint cannot be used
            failure = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if all_reduce(torch.tensor([float(failure is not None)])).item():
            if failure is not None:
                print(f"error: rank {rank} cannot load checkpoint {tag} from {checkpoint_root(run_dir)} ({failure}); "
                      f"its files are damaged: move that folder out of {checkpoint_root(run_dir)} (or delete it) to "
                      f"--resume from the newest older complete checkpoint; nothing was written", file=sys.stderr,
                      flush=True)
            return 2
        start_step = own.step
        log(f"resumed from {tag} (step {start_step})")
    elif is_main:
        (run_dir / "config.json").write_text(json.dumps(
            {"config": config.to_dict(), "ds_config": ds.deepspeed, "ds_config_path": ds.path, "ep_size": ds.ep_size,
             "world_size": world_size}, indent=2))
    if is_main:
        tokenizer = Path(config.data.path) / "tokenizer.model"
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, run_dir / "tokenizer.model")
    metrics = MetricsWriter(run_dir, is_main, monitor=engine.monitor, wandb_mode=config.train.wandb,
                            wandb_project=config.train.wandb_project, run_config=config.to_dict(),
                            resume_step=start_step if config.train.resume else None)

    def evaluate(step: int) -> float:
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        eval_tally = RoutingTally(len(model.moe_layers()), config.model.num_experts) if model.reports_routing else None
        with torch.no_grad():
            for x, y in eval_batches(val_data, config.data.seq_len, ds.micro_batch_size, rank, world_size,
                                     max_batches=config.train.eval_batches):
                out = engine(x.to(device), y.to(device))
                totals += torch.tensor([out.lm_loss.item() * y.numel(), y.numel()], dtype=torch.float64)
                if eval_tally is not None:
                    eval_tally.add(out.routing, out.moe_layer_losses)
        engine.train()
        total_loss, total_tokens = all_reduce(totals).tolist()
        val_loss = total_loss / max(total_tokens, 1)
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if eval_tally is not None:
            layers = eval_tally.reduce_and_reset(all_reduce)
            if is_main:
                heatmap = run_dir / f"expert_load_step{step:08d}.png"
                expert_load_heatmap([layer["tokens_per_expert"] for layer in layers], heatmap,
                                    f"expert load on validation, step {step}")
                record["heatmap"] = heatmap.name
        metrics.write(record)
        log(f"eval step {step}: val_loss {val_loss:.4f} ppl {math.exp(min(val_loss, 50)):.1f}")
        return val_loss

    def save(step: int) -> None:
        tag = step_tag(step)
        if is_main:
            begin_checkpoint(run_dir, tag)
        dist.barrier()
        save_recipe_state(run_dir, tag, rank, RankState(step=step, loader=loader.state_dict(), rng=rng_state(),
                                                        world_size=world_size, ep_size=ds.ep_size, **layout))
        engine.save_checkpoint(str(checkpoint_root(run_dir)), tag=tag, save_latest=False,
                               client_state={"step": step, "config": config.to_dict()})
        dist.barrier()  # every rank's files are written
        if is_main:
            commit_checkpoint(run_dir, tag, world_size, len(model.moe_layers()), config.model.num_experts)
            prune(run_dir, config.train.keep_last)
        dist.barrier()

    # ---- training loop ----
    gas, tokens_per_step = ds.grad_accum_steps, ds.global_batch_size(world_size) * config.data.seq_len
    loss_coeff, z_coeff = config.loss.moe_loss_coeff, config.loss.router_z_loss_coeff
    tally = RoutingTally(len(model.moe_layers()), config.model.num_experts) if model.reports_routing else None
    running = torch.zeros(5, dtype=torch.float64)  # loss, lm, moe, z, micro-steps (since last log)
    bad_steps, val_loss = 0, float("nan")
    last_log_time, last_log_step, started = time.time(), start_step, time.time()
    if is_main and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=config.train.steps, initial=start_step, unit="step", dynamic_ncols=True)
    log(f"training {config.model_type} ({counts['total'] / 1e6:.2f}M params, {counts['active'] / 1e6:.2f}M active) "
        f"on {world_size} ranks, ep_size {ds.ep_size}, ZeRO-{ds.zero_stage} {ds.precision}, "
        f"{tokens_per_step} tokens/step, steps {start_step + 1}..{config.train.steps}")

    def grads_finite() -> bool:
        """Every gradient of every rank finite (ZeRO-0 fp32 only: after the boundary's all-reduce)."""
        flags = [torch.isfinite(p.grad).all() for p in engine.module.parameters() if p.grad is not None]
        local = torch.stack(flags).all() if flags else torch.tensor(True)
        return all_reduce(local.float().reshape(1).cpu()).item() == world_size

    save_due = False
    for step in range(start_step + 1, config.train.steps + 1):
        # -- one optimizer step: gas micro-batches, each forward / backward / engine.step() --
        # Non-finite guard, part 2: a micro-batch whose loss is inf/NaN on any rank is back-propagated as NaN
        # on every rank, so the step's gradients are non-finite everywhere and the optimizer's check (DeepSpeed's,
        # or ours below) skips the whole step: no weight, Adam moment or LR change. Every rank still runs every
        # backward and engine.step(), so collectives and DeepSpeed's micro-step counter stay in line.
        bad_loss = False
        for micro in range(gas):
            x, y = loader.next_batch()
            out = engine(x.to(device), y.to(device))
            loss = out.lm_loss + loss_coeff * out.moe_loss + z_coeff * out.z_loss
            finite = all_reduce(torch.tensor([float(torch.isfinite(loss).item())])).item() == world_size
            if not finite:
                bad_loss = True
                loss = loss * float("nan")
            engine.backward(loss)
            if own_grad_check and micro == gas - 1 and not grads_finite():
                # This one engine.step() runs a no-op in place of the optimizer's step and reads `overflow`: it
                # clears the gradients, leaves the LR scheduler alone and counts a skipped step, as it does for
                # DeepSpeed's own optimizers.
                engine.optimizer.step = lambda *args, **kwargs: None  # shadows the method on this instance
                engine.optimizer.overflow = True
                try:
                    engine.step()
                finally:
                    del engine.optimizer.step
                    engine.optimizer.overflow = False
            else:
                engine.step()
            if finite:
                running += torch.tensor([loss.item(), out.lm_loss.item(), out.moe_loss.item(), out.z_loss.item(), 1.0],
                                        dtype=torch.float64)
                if tally is not None:
                    tally.add(out.routing, out.moe_layer_losses)
        applied = all_reduce(torch.tensor([float(engine.was_step_applied())])).item()
        if 0 < applied < world_size:
            raise RuntimeError(f"step {step} was applied on {applied:.0f} of {world_size} ranks; the weights diverged")
        # fp16: the loss scaler skips its own overflow steps (and lowers the scale); only a non-finite loss counts.
        if bad_loss or (applied == 0 and ds.precision != "fp16"):
            bad_steps += 1
            log(f"warning: step {step} skipped (non-finite {'loss' if bad_loss else 'gradients'}), {bad_steps} in a "
                f"row; stopping after {config.train.max_bad_steps}")
            if bad_steps >= config.train.max_bad_steps:
                if progress is not None:
                    progress.close()
                metrics.close()
                if is_main:
                    newest = latest_tag(run_dir)
                    kept = (f"the newest complete checkpoint, {newest}, is untouched: fix the cause (lower the learning "
                            f"rate, check the data) and restart with --resume" if newest else
                            "no checkpoint was saved yet: fix the cause (lower the learning rate, check the data) and "
                            "start again")
                    print(f"error: {bad_steps} consecutive steps with non-finite loss or gradients (steps "
                          f"{step - bad_steps + 1}..{step}, all skipped); stopped without saving; {kept}",
                          file=sys.stderr, flush=True)
                return 3
        else:
            bad_steps = 0

        if progress is not None:
            progress.update(1)
        if step % config.train.log_every == 0 or step == config.train.steps:
            sums = all_reduce(running)
            n = sums[4].item() or float("nan")  # NaN losses when every micro-batch since the last log was skipped
            now = time.time()
            grad_norm = engine.get_global_grad_norm()
            record = {
                "step": step, "loss": sums[0].item() / n, "lm_loss": sums[1].item() / n, "moe_loss": sums[2].item() / n,
                "z_loss": sums[3].item() / n, "lr": scheduler.get_last_lr()[0] if scheduler else engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tokens_per_step * (step - last_log_step) / max(now - last_log_time, 1e-9),
                "elapsed_s": now - started, "skipped_steps": engine.skipped_steps,
            }
            if tally is not None:
                record["moe"] = tally.reduce_and_reset(all_reduce)
            metrics.write(record)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            else:
                log(f"step {step}/{config.train.steps} loss {record['loss']:.4f} lm {record['lm_loss']:.4f} "
                    f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s")
            running.zero_()
            last_log_time, last_log_step = now, step
        if step % config.train.eval_every == 0 or step == config.train.steps:
            val_loss = evaluate(step)
        # A save due during a run of skipped steps waits for the next good step (or the end of the run), so
        # a checkpoint never hides a streak that is about to stop training.
        save_due = save_due or step % config.train.save_every == 0
        if (save_due and bad_steps == 0) or step == config.train.steps:
            save(step)
            save_due = False

    if progress is not None:
        progress.close()
    wall = time.time() - started
    summary = {
        "steps": config.train.steps, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
        "tokens_seen": tokens_per_step * config.train.steps, "tokens_per_s": tokens_per_step * (
            config.train.steps - start_step) / max(wall, 1e-9),
        "total_params": counts["total"], "active_params": counts["active"], "wall_s": wall,
        "world_size": world_size, "ep_size": ds.ep_size, "zero_stage": ds.zero_stage, "precision": ds.precision,
        "param_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
    }
    metrics.close()
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(summary_table(summary))
    dist.barrier()
    if samples > 0 and is_main:
        from .generate import print_samples

        print_samples(run_dir, num_samples=samples)
    dist.barrier()
    return 0


def summary_table(summary: dict) -> str:
    rows = [
        ("val loss", f"{summary['val_loss']:.4f}"), ("perplexity", f"{summary['val_ppl']:.1f}"),
        ("tokens seen", f"{summary['tokens_seen']:,}"), ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("params (total)", f"{summary['total_params'] / 1e6:.2f}M"),
        ("params (active/token)", f"{summary['active_params'] / 1e6:.2f}M"), ("wall time", f"{summary['wall_s']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["-" * (width + 16)] + [f"{name:<{width}}  {value:>12}" for name, value in rows] + ["-" * (width + 16)])


if __name__ == "__main__":
    sys.exit(main())
