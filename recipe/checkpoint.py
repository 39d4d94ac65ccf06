"""Checkpoints of a run: saved through the DeepSpeed engine, plus the recipe's own per-rank state.

Layout under ``<run_dir>/checkpoints/``::

    latest                                   tag of the newest complete checkpoint (written last)
    step00000200/
        mp_rank_00_model_states.pt           non-expert weights, LR schedule, client state (DeepSpeed)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per expert per MoE layer (DeepSpeed)
        *_optim_states.pt                    ZeRO / optimizer shards (DeepSpeed)
        recipe_rank{R}.pt                    data position and RNG state of rank R (ours)

``consolidated_state_dict`` reads a checkpoint without DeepSpeed or process groups and returns the
whole model's weights with global expert ids: what a 1-process model (ep_size=1) loads.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

LATEST = "latest"
MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_tag(run_dir: str | Path) -> Optional[str]:
    """The tag in ``latest`` if that checkpoint is complete, else None."""
    root = checkpoint_root(run_dir)
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (root / tag / MODEL_FILE).is_file():
        raise FileNotFoundError(
            f"{latest} names checkpoint {tag!r} but {root / tag / MODEL_FILE} is missing; the checkpoint "
            f"folder was damaged. Point `latest` at an older complete tag or start a new run_dir"
        )
    return tag


def prune(run_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` step tags; never the one ``latest`` names."""
    root = checkpoint_root(run_dir)
    current = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    tags = sorted(p.name for p in root.glob("step*") if p.is_dir())
    doomed = [t for t in tags[:-keep_last] if t != current] if keep_last > 0 else []
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def save_recipe_state(run_dir: str | Path, tag: str, rank: int, state: dict) -> None:
    path = checkpoint_root(run_dir) / tag / f"recipe_rank{rank}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written file under the final name


def load_recipe_state(run_dir: str | Path, tag: str, rank: int) -> dict:
    path = checkpoint_root(run_dir) / tag / f"recipe_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: checkpoint {tag} was saved with fewer ranks or is incomplete; resume with the "
            f"number of ranks it was saved with"
        )
    return torch.load(path, weights_only=False)


def consolidated_state_dict(checkpoint_dir: str | Path, tag: Optional[str] = None) -> tuple[dict, dict]:
    """All weights of a saved model (every expert, global ids) and the client state, read from disk.

    Works for any expert-parallel size the checkpoint was saved with, on one process.
    """
    root = Path(checkpoint_dir)
    if tag is None:
        if not (root / LATEST).is_file():
            raise FileNotFoundError(f"no `latest` file in {root}; pass the checkpoint tag explicitly")
        tag = (root / LATEST).read_text().strip()
    folder = root / tag
    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: {folder} is not a complete checkpoint")
    try:
        saved = torch.load(model_file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{model_file} cannot be read ({exc}); the file is truncated or corrupt") from exc
    state = dict(saved["module"])
    expected = saved.get("num_experts") or []
    found: dict[int, set[int]] = {}
    for path in sorted(folder.iterdir()):
        match = EXPERT_FILE.fullmatch(path.name)
        if not match:
            continue
        layer, expert = int(match.group(1)), int(match.group(2))
        try:
            state.update(torch.load(path, map_location="cpu", weights_only=False))
        except Exception as exc:
            raise ValueError(f"{path} cannot be read ({exc}); the expert file is truncated or corrupt") from exc
        found.setdefault(layer, set()).add(expert)
    for layer, num_experts in enumerate(expected):
        missing = sorted(set(range(num_experts)) - found.get(layer, set()))
        if missing:
            raise FileNotFoundError(
                f"checkpoint {folder} lacks expert files for MoE layer {layer}, experts {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}; it is incomplete"
            )
    client_state = {k: v for k, v in saved.items() if k not in ("module", "optimizer", "lr_scheduler")}
    return state, client_state
