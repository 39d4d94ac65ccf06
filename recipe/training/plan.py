"""Every check that needs no process group, run before any rank starts: the configs, the data, the run folder
and, with ``--resume``, the checkpoint and whether it can be loaded at this launch's layout.

Each problem raises ``ConfigError`` with one line naming it and the fix; nothing has been written by then.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import checkpoint_root, complete_tags, latest_tag, load_recipe_state, resume_problem
from ..config import ConfigError, RecipeConfig, config_from_saved, load_config
from ..data.loader import TokenDataset
from ..data.tokenizer import tokenizer_file
from ..init_from import parse_init_from
from ..ds_config import DSConfig, read_ds_config, resolve_ds_config


@dataclass
class RunPlan:
    config: RecipeConfig
    ds: DSConfig
    run_dir: Path
    world_size: int
    resume_tag: Optional[str] = None  # the checkpoint to continue from (with --resume)
    # The checkpoint was saved at another rank count, ep_size, ZeRO stage or precision: weights, optimizer
    # state, data position and LR schedule are moved into this launch's layout (recipe/reshard.py).
    reshard: bool = False
    # --resume with another LR schedule than config.json's and train.lr_schedule_on_resume "stretch" or "keep":
    # the saved scheduler block ({} for none); with "keep" it is also the one in ds.deepspeed.
    saved_lr_schedule: Optional[dict] = None


def plan_run(args: argparse.Namespace) -> RunPlan:
    """The checked plan of this launch (``args`` from ``recipe.train.parse_args``). Raises ConfigError."""
    config = load_config(args.config, list(args.set) + _command_line_overrides(args))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds = resolve_ds_config(read_ds_config(args.ds_config), config, world_size, args.ds_config)
    train_data = _check_data(config, ds, world_size)
    run_dir = Path(config.train.run_dir)
    if not config.train.resume:
        _check_fresh_start(run_dir, args.reshard)
        if config.train.init_from is not None:
            _check_init_source(config, train_data)
        return RunPlan(config=config, ds=ds, run_dir=run_dir, world_size=world_size)
    tag = latest_tag(run_dir)
    if tag is None:
        if _interrupted_saves(run_dir):
            raise ConfigError(_only_interrupted(run_dir))
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoint_root(run_dir)}; "
                          f"train without --resume first")
    problem = resume_problem(run_dir, tag)  # files missing or changed size since the checkpoint was committed
    if problem:
        raise ConfigError(problem)
    _check_same_tokens_and_model(run_dir, config, train_data)
    saved_schedule = _check_lr_schedule(run_dir, config, ds)
    reshard = _needs_reshard(run_dir, tag, ds, world_size, args.reshard)
    return RunPlan(config=config, ds=ds, run_dir=run_dir, world_size=world_size, resume_tag=tag, reshard=reshard,
                   saved_lr_schedule=saved_schedule)


def _command_line_overrides(args: argparse.Namespace) -> list[str]:
    """``--run_dir`` and ``--resume`` win over the config file's train.run_dir / train.resume; as overrides they
    are known while the config resolves (a resumed ``train.init_from`` run reads its saved config, not its source)."""
    overrides = [f"train.run_dir={args.run_dir!r}"] if args.run_dir else []
    return overrides + (["train.resume=True"] if args.resume else [])


def _check_data(config: RecipeConfig, ds: DSConfig, world_size: int) -> TokenDataset:
    """The training split opens, fits the model's vocabulary, was made by the tokenizer beside it and holds at
    least one global micro-batch."""
    try:
        train_data = TokenDataset(Path(config.data.path), "train")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    # A published model's embedding may have more rows than its tokenizer has ids (padded for speed).
    have, want, imported = train_data.vocab_size, config.model.vocab_size, config.train.init_from is not None
    if have > want or (have != want and not imported):
        fix = ("prepare the data with the source model's own tokenizer (python -m recipe.data.prepare --tokenizer "
               "DIR)" if imported else f"set model.vocab_size={have} or prepare the data again")
        raise ConfigError(f"`model.vocab_size` ({want}) differs from the tokenizer of {config.data.path} ({have}); "
                          f"{fix}")
    tokenizer = train_data.tokenizer_path
    if tokenizer.is_file() and not train_data.made_by(tokenizer):
        raise ConfigError(f"{tokenizer} is not the tokenizer the token shards in {config.data.path} were made with "
                          f"(sha256 differs); prepare the data again (make data) or put that tokenizer back")
    samples, dp_size = (train_data.num_tokens - 1) // config.data.seq_len, ds.dp_size(world_size)
    if samples < ds.micro_batch_size * dp_size:
        raise ConfigError(
            f"{config.data.path} holds {samples} sequences of {config.data.seq_len} tokens, fewer than one global "
            f"micro-batch ({ds.micro_batch_size} x {dp_size} data-parallel ranks); lower data.seq_len or the "
            f"micro batch"
        )
    return train_data


def _check_init_source(config: RecipeConfig, train_data: TokenDataset) -> None:
    """``train.init_from``: every weight the model needs is in a Hugging Face source with its shape (file headers
    only), and the source's tokenizer (a run's: the one it was trained with) made the token shards."""
    from ..hf_import import check_hf_weights, dense_config, read_hf_model

    init = parse_init_from(config.train.init_from)
    if init.kind == "hf":  # the config was resolved from this folder: its class is known
        check_hf_weights(init.path, config, config.model.hf_architecture)
    elif not (init.path / "checkpoints").is_dir():  # a Hugging Face dense source (a recipe run is read when built)
        hf = read_hf_model(init.path)
        check_hf_weights(init.path, dense_config(hf), hf.arch)
    their_tokenizer = _tokenizer_in(init.path)
    if their_tokenizer is not None and not train_data.made_by(their_tokenizer):
        raise ConfigError(f"the token shards in {config.data.path} were not made by {their_tokenizer}, the tokenizer "
                          f"of the model in {init.path}; prepare them with `python -m recipe.data.prepare --source "
                          f"YOUR_TEXT --out DIR --tokenizer {their_tokenizer}` and set data.path=DIR")


def _tokenizer_in(folder: Path) -> Optional[Path]:
    """The tokenizer file of a Hugging Face model or run folder (tokenizer.json, else tokenizer.model), None when it
    has none (then the shards are not checked against it)."""
    try:
        return tokenizer_file(folder)
    except (FileNotFoundError, ValueError):
        return None


def _interrupted_saves(run_dir: Path) -> list[str]:
    """Checkpoint folders of saves that never completed, when the run has no complete checkpoint at all."""
    root = checkpoint_root(run_dir)
    if not root.is_dir() or complete_tags(run_dir):
        return []
    return sorted(p.name for p in root.glob("step*") if p.is_dir())


def _only_interrupted(run_dir: Path) -> str:
    # A run killed during its first save: neither --resume nor a fresh start may touch it without the user.
    return (f"{checkpoint_root(run_dir)} holds only interrupted saves ({', '.join(_interrupted_saves(run_dir))}) "
            f"and no complete checkpoint, so there is nothing to resume; delete {checkpoint_root(run_dir)} to train "
            f"anew in {run_dir}, or choose another --run_dir (nothing was overwritten)")


def _check_fresh_start(run_dir: Path, reshard: bool) -> None:
    root = checkpoint_root(run_dir)
    if _interrupted_saves(run_dir):
        raise ConfigError(_only_interrupted(run_dir))
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another "
                          f"--run_dir (nothing was overwritten)")
    if reshard:
        raise ConfigError("--reshard only makes sense with --resume")


def _check_same_tokens_and_model(run_dir: Path, config: RecipeConfig, train_data: TokenDataset) -> None:
    """The run was trained on tokens of this data's tokenizer, with this model config."""
    trained_with = _tokenizer_in(run_dir)
    if trained_with is not None and not train_data.made_by(trained_with):
        raise ConfigError(f"--resume into {run_dir}, trained on tokens of its {trained_with.name}, but the shards "
                          f"in {config.data.path} were made by another tokenizer; resume with the data it was "
                          f"trained on, or train anew in another --run_dir")
    saved = config_from_saved(json.loads((run_dir / "config.json").read_text())["config"]).to_dict()
    now = config.to_dict()
    if any(saved[key] != now[key] for key in ("model_type", "model")):
        diff = {k: (saved["model"][k], v) for k, v in now["model"].items() if saved["model"].get(k) != v}
        raise ConfigError(
            f"--resume into {run_dir}, which was trained with another model config "
            f"(saved vs now: {diff or saved['model_type']}); use the same config or a new --run_dir"
        )


def _needs_reshard(run_dir: Path, tag: str, ds: DSConfig, world_size: int, reshard_asked: bool) -> bool:
    """Whether checkpoint ``tag`` must be resharded into this launch; refuses what cannot be loaded."""
    saved = load_recipe_state(run_dir, tag, 0)
    # DeepSpeed's own loader needs the ranks, expert-parallel size, ZeRO stage and precision the checkpoint
    # was written with (checkpoints from before the last two were recorded: assume unchanged).
    saved_shape = (saved.world_size, saved.ep_size, ds.zero_stage if saved.zero_stage is None else saved.zero_stage,
                   saved.precision or ds.precision, saved.tp_size)
    same_layout = saved_shape == (world_size, ds.ep_size, ds.zero_stage, ds.precision, ds.tp_size)
    if not same_layout and not reshard_asked:
        raise ConfigError(
            f"checkpoint {tag} was saved with {saved_shape[0]} ranks, ep_size {saved_shape[1]} and TP "
            f"{saved_shape[4]} (ZeRO-{saved_shape[2]} {saved_shape[3]}), this launch has {world_size} ranks, "
            f"ep_size {ds.ep_size} and TP {ds.tp_size} (ZeRO-{ds.zero_stage} {ds.precision}); resume with the "
            f"same layout, or add --reshard to move it into this one"
        )
    saved_batch = saved.loader["global_micro_batch"]
    if reshard_asked and saved_batch != ds.micro_batch_size * ds.dp_size(world_size):
        raise ConfigError(
            f"--reshard keeps the data order, so the global micro-batch must stay {saved_batch} sequences; "
            f"set train_micro_batch_size_per_gpu to {saved_batch} / data-parallel ranks (ranks / TP)"
        )
    return not same_layout


def schedule_change(saved: dict, now: dict) -> str:
    """``"WarmupCosineLR total_num_steps 6 -> 9"``: what differs between two scheduler blocks ({} for none)."""
    if saved.get("type") != now.get("type"):
        return f"scheduler {saved.get('type', 'none')} -> {now.get('type', 'none')}"
    before, after = saved.get("params", {}), now.get("params", {})
    changed = [f"{key} {before.get(key)} -> {after.get(key)}" for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key)]
    return f"{now['type']} {', '.join(changed)}"


def _check_lr_schedule(run_dir: Path, config: RecipeConfig, ds: DSConfig) -> Optional[dict]:
    """--resume: the resolved scheduler must be the one config.json saved (a new train.steps re-fills "auto"
    lengths, which would silently re-stretch the schedule), unless train.lr_schedule_on_resume says otherwise.
    Returns the saved block when it differs and the option allows it ("keep" puts it into ``ds``)."""
    saved_run = json.loads((run_dir / "config.json").read_text())
    if "ds_config" not in saved_run:  # written before the ds_config was recorded: nothing to compare
        return None
    saved, now = saved_run["ds_config"].get("scheduler", {}), ds.deepspeed.get("scheduler", {})
    if saved == now:
        return None
    option, change = config.train.lr_schedule_on_resume, schedule_change(saved, now)
    if option == "refuse":
        saved_steps = saved_run["config"]["train"]["steps"]
        old = (f"resume with train.steps={saved_steps} as before" if saved_steps != config.train.steps
               else "resume with the ds_config's old scheduler")
        raise ConfigError(f"--resume into {run_dir}: the LR schedule differs from the one it was trained with "
                          f"({change}); {old}, or set train.lr_schedule_on_resume='stretch' (adopt the new one: the "
                          f"rate jumps at the resumed step) or 'keep' (continue the saved one, at its final rate "
                          f"past its end)")
    if option == "keep":
        if saved:
            ds.deepspeed["scheduler"] = saved
        else:
            ds.deepspeed.pop("scheduler", None)
    elif not (_deepspeed_schedule(saved) and _deepspeed_schedule(now)):
        # torch.optim.lr_scheduler classes restore their lengths from the checkpoint: a new one would not apply.
        raise ConfigError(f"train.lr_schedule_on_resume='stretch' ({change}) needs a scheduler of DeepSpeed's "
                          f"lr_schedules before and after; use 'keep', or resume with the old scheduler")
    return saved


def _deepspeed_schedule(block: dict) -> bool:
    from deepspeed.runtime import lr_schedules

    return bool(block) and hasattr(lr_schedules, str(block.get("type")))
