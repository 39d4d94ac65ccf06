"""Checkpoints of a run: saved through the DeepSpeed engine, plus the recipe's own per-rank state.

Layout under ``<run_dir>/checkpoints/``::

    latest                                   tag of the newest complete checkpoint (replaced atomically)
    zero_to_fp32.py, zero_to_torch.py        DeepSpeed's converters (they cannot read per-expert files),
                                             replaced by ``commit`` with a script that names recipe.export
    step00000200/
        COMPLETE                             written by rank 0 once every file of every rank is in place:
                                             the tag, then one line per file: name and size in bytes
        mp_rank_00_model_states.pt           non-expert weights, LR schedule, client state (DeepSpeed)
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   one file per expert per MoE layer (DeepSpeed)
                                             with tensor parallelism (TP) both per TP rank: mp_rank_{T:02d},
                                             each holding that rank's slices (``recipe.model.tp_layout``)
        *_optim_states.pt                    ZeRO / optimizer shards (DeepSpeed)
        recipe_rank{R}.pt                    data position and RNG state of rank R (ours)

Under ZeRO-3 the engine writes ``zero_pp_rank_{R}_mp_rank_00_model_states.pt`` per rank (parameter placeholders,
schedule, client state) and the trainer writes the two model files above itself, from gathered weights, so the
readers below work the same for every stage (``recipe.training.checkpointing.write_gathered_weights``).

Crash safety: a save goes into its own tag folder; only after all ranks finished and rank 0 checked the
files does ``commit`` write ``COMPLETE`` and then replace ``latest`` (write-to-temp + rename), so a
crash at any moment leaves ``latest`` on a complete checkpoint. Older checkpoints are pruned only after
a newer one is committed.

``consolidated_state_dict`` reads a checkpoint without DeepSpeed or process groups and returns the
whole model's weights with global expert ids: what a 1-process model (ep_size=1) loads.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch


LATEST = "latest"
COMPLETE = "COMPLETE"
MODEL_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt")


def model_file_name(tp_rank: int = 0) -> str:
    """TP rank ``tp_rank``'s file of the non-expert weights (DeepSpeed's name for it)."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def expert_file_name(moe_layer: int, expert: int, tp_rank: int = 0) -> str:
    """The file of global expert ``expert`` of the ``moe_layer``-th MoE layer (DeepSpeed's name for it)."""
    return f"layer_{moe_layer}_expert_{expert}_mp_rank_{tp_rank:02d}_model_states.pt"


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


def complete_tags(run_dir: str | Path) -> list[str]:
    """Committed checkpoint tags, oldest first."""
    return _complete_in(checkpoint_root(run_dir))


def _complete_in(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob(f"step*/{COMPLETE}"))


def latest_tag(run_dir: str | Path) -> Optional[str]:
    """The newest committed checkpoint: ``latest`` if it names a complete one, else the newest complete tag."""
    return _latest_in(checkpoint_root(run_dir))


def _latest_in(root: Path) -> Optional[str]:
    tags = _complete_in(root)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if named in tags:
        return named
    if named is not None and tags:
        print(f"warning: {root / LATEST} names {named!r}, which is not a complete checkpoint; using {tags[-1]}",
              file=sys.stderr)
    return tags[-1] if tags else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def missing_files(folder: Path, world_size: int, moe_layers: int, num_experts: int, tp_size: int = 1) -> list[str]:
    """What a complete checkpoint of this layout must hold and ``folder`` lacks (or holds empty)."""
    expected = [model_file_name(t) for t in range(tp_size)] + [f"recipe_rank{r}.pt" for r in range(world_size)]
    expected += [expert_file_name(layer, e, t) for layer in range(moe_layers) for e in range(num_experts)
                 for t in range(tp_size)]
    missing = [name for name in expected if not (folder / name).is_file() or (folder / name).stat().st_size == 0]
    if not any(folder.glob("*optim_states.pt")):
        missing.append("*optim_states.pt")
    return missing


def begin(run_dir: str | Path, tag: str) -> Path:
    """Rank 0, before a save: whatever an earlier save left under this tag is removed, marker first."""
    folder = checkpoint_root(run_dir) / tag
    if folder.exists():
        (folder / COMPLETE).unlink(missing_ok=True)  # from here on the folder never passes for complete
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def commit(run_dir: str | Path, tag: str, world_size: int, moe_layers: int, num_experts: int,
           tp_size: int = 1) -> None:
    """Rank 0, after every rank saved: verify, mark complete, then point ``latest`` at it (atomically)."""
    folder = checkpoint_root(run_dir) / tag
    missing = missing_files(folder, world_size, moe_layers, num_experts, tp_size)
    if missing:
        raise RuntimeError(f"checkpoint {folder} is incomplete after saving (missing {missing[:5]}); "
                           f"`latest` still names the previous checkpoint")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != COMPLETE)
    listing = "".join(f"{p.name} {p.stat().st_size}\n" for p in files)
    header = "# every file of this checkpoint and its size in bytes, checked by --resume"
    _write_atomic(folder / COMPLETE, f"{tag}\n{header}\n{listing}")
    _write_atomic(checkpoint_root(run_dir) / LATEST, tag)
    write_converter_pointers(checkpoint_root(run_dir))


# DeepSpeed's save_checkpoint drops its converters into the checkpoints folder (rank 0, every save). They cannot
# read our checkpoints (each expert in its own file: "... is not a model state checkpoint"), so ``commit``
# replaces them with a script that says what to run instead: a DeepSpeed user's reflex meets one line, not a
# traceback. They sit beside the tag folders, outside what COMPLETE lists and what the readers open.
DEEPSPEED_CONVERTERS = ("zero_to_fp32.py", "zero_to_torch.py")
_CONVERTER_POINTER = '''#!/usr/bin/env python
"""Written by moe-recipe in place of DeepSpeed's converter, which cannot read these checkpoints."""
import shlex
import sys
from pathlib import Path

run_dir = Path(__file__).resolve().parent.parent
given = [a for a in sys.argv[1:] if not a.startswith("-")]
out = given[1] if len(given) > 1 else "model_fp32.pt"
print(f"{Path(__file__).name}: DeepSpeed's converter cannot read this run's checkpoints (one file per expert); "
      f"in the moe-recipe checkout run: python -m recipe.export --run_dir {shlex.quote(str(run_dir))} "
      f"--format torch --out {shlex.quote(out)}  (or --format hf --out DIR; --tag TAG for another checkpoint)",
      file=sys.stderr)
sys.exit(1)
'''


def write_converter_pointers(root: Path) -> None:
    """``zero_to_fp32.py`` / ``zero_to_torch.py`` in ``root`` that point to ``recipe.export`` and exit 1."""
    for name in DEEPSPEED_CONVERTERS:
        _write_atomic(root / name, _CONVERTER_POINTER)
        (root / name).chmod(0o755)


def recorded_files(folder: Path) -> Optional[dict[str, int]]:
    """{file name: size in bytes} that ``COMPLETE`` lists; None for a marker without the list (older recipe)."""
    lines = (folder / COMPLETE).read_text().splitlines()[1:]
    entries = [line.rsplit(" ", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name: int(size) for name, size in entries} if entries else None


def damaged_files(folder: Path) -> list[str]:
    """The files of a complete checkpoint that are gone or changed size since it was committed, described."""
    recorded = recorded_files(folder)
    damaged = []
    for name, size in (recorded or {}).items():
        path = folder / name
        if not path.is_file():
            damaged.append(f"{name} is missing")
        elif path.stat().st_size != size:
            damaged.append(f"{name} is {path.stat().st_size} bytes, was {size} when saved")
    return damaged


def resume_problem(run_dir: str | Path, tag: str) -> Optional[str]:
    """Why checkpoint ``tag`` cannot be resumed (damaged files), with what to do instead; None if it is whole.
    Never switches to another checkpoint by itself: the user decides."""
    root = checkpoint_root(run_dir)
    damaged = damaged_files(root / tag)
    if not damaged:
        return None
    more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
    older = [t for t in reversed(complete_tags(run_dir)) if t < tag and not damaged_files(root / t)]
    if older:
        fix = (f"the newest intact older checkpoint is {older[0]}: to resume from it, move {root / tag} out of "
               f"{root} (or delete it) and run --resume again")
    else:
        fix = f"no older intact checkpoint is left in {root}: restore the files, or train anew in another --run_dir"
    return f"checkpoint {tag} in {root} is damaged: {damaged[0]}{more}; nothing was loaded or written; {fix}"


def prune(run_dir: str | Path, keep_last: int) -> list[str]:
    """Keep the newest ``keep_last`` committed checkpoints; drop older ones and interrupted saves among them."""
    root = checkpoint_root(run_dir)
    complete = complete_tags(run_dir)
    if not complete:
        return []
    oldest_kept = complete[-keep_last] if len(complete) >= keep_last else complete[0]
    doomed = sorted(p.name for p in root.glob("step*") if p.is_dir() and (
        p.name < oldest_kept or (p.name not in complete and p.name < complete[-1])))
    for tag in doomed:
        # Marker first (as in ``begin``): a kill part-way through the delete leaves an interrupted save,
        # which the next prune removes, never a folder that passes for complete with files missing.
        (root / tag / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


@dataclass
class RankState:
    """What one rank saves beside DeepSpeed's files, as ``recipe_rank{R}.pt`` (a plain dict of these fields).

    ``step``, ``loader`` and ``rng`` resume a run at the same layout; the layout fields let ``--reshard``
    and ``recipe/reshard.py`` read this rank's optimizer shard back at another one. Files written before a
    field existed load with its default (None: not recorded).
    """

    step: int
    loader: dict  # BatchLoader.state_dict(): the global data position
    rng: dict  # rng_state() of this rank
    world_size: int
    ep_size: int
    rank: Optional[int] = None
    ep_rank: Optional[int] = None  # None: saved before optimizer resharding existed
    expert_dp_rank: Optional[int] = None
    zero_stage: Optional[int] = None
    precision: Optional[str] = None
    tp_size: int = 1  # tensor parallelism (1 for checkpoints from before it)
    tp_rank: int = 0
    optimizer_param_names: Optional[list[list[str]]] = None  # plain torch optimizer: names behind its indices

    @property
    def dp_rank(self) -> Optional[int]:
        """Index among the data-parallel ranks (the rank without TP): the order ZeRO partitions dense state in."""
        return None if self.rank is None else self.rank // self.tp_size

    def to_dict(self) -> dict:
        state = asdict(self)
        if state["optimizer_param_names"] is None:  # written only for a plain torch optimizer, as before
            del state["optimizer_param_names"]
        return state

    @classmethod
    def from_dict(cls, state: dict) -> "RankState":
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file under the final name."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_recipe_state(run_dir: str | Path, tag: str, rank: int, state: RankState) -> None:
    save_atomic(state.to_dict(), checkpoint_root(run_dir) / tag / f"recipe_rank{rank}.pt")


def _read_rank_state(path: Path) -> RankState:
    return RankState.from_dict(torch.load(path, weights_only=False))


def saved_rank_states(folder: Path) -> list[RankState]:
    """The recipe state of every rank that saved the checkpoint in ``folder``, in rank order."""
    first = _read_rank_state(folder / "recipe_rank0.pt")
    return [first] + [_read_rank_state(folder / f"recipe_rank{r}.pt") for r in range(1, first.world_size)]


def load_recipe_state(run_dir: str | Path, tag: str, rank: int) -> RankState:
    path = checkpoint_root(run_dir) / tag / f"recipe_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: checkpoint {tag} was saved with fewer ranks or is incomplete; resume with the "
            f"number of ranks it was saved with"
        )
    return _read_rank_state(path)


def consolidated_state_dict(checkpoint_dir: str | Path, tag: Optional[str] = None) -> tuple[dict, dict]:
    """All weights of a saved model (every expert, global ids) and the client state, read from disk.

    Works for any expert-parallel size the checkpoint was saved with, on one process.
    """
    root = Path(checkpoint_dir)
    if tag is None:
        tag = _latest_in(root)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {root}; train first (or pass a tag)")
    folder = root / tag
    saved = _read_model_file(folder, 0)
    tp_size = saved.get("tp_size", 1)
    per_tp_rank = [_tp_rank_weights(folder, t, saved if t == 0 else _read_model_file(folder, t),
                                    saved.get("num_experts") or []) for t in range(tp_size)]
    state = per_tp_rank[0]
    if tp_size > 1:
        from .config import config_from_saved
        from .model.tp_layout import join_state_dicts, qkv_rows

        state = join_state_dicts(per_tp_rank, qkv_rows(config_from_saved(saved["config"])))
    client_state = {k: v for k, v in saved.items() if k not in ("module", "optimizer")}
    return state, client_state


def _read_model_file(folder: Path, tp_rank: int) -> dict:
    model_file = folder / model_file_name(tp_rank)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: {folder} is not a complete checkpoint")
    try:
        return torch.load(model_file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{model_file} cannot be read ({exc}); the file is truncated or corrupt") from exc


def _tp_rank_weights(folder: Path, tp_rank: int, saved: dict, expected: list[int]) -> dict:
    """TP rank ``tp_rank``'s weights: its non-expert file and every expert file of its slices."""
    state = dict(saved["module"])
    found: dict[int, set[int]] = {}
    for path in sorted(folder.iterdir()):
        match = EXPERT_FILE.fullmatch(path.name)
        if not match or int(match.group(3)) != tp_rank:
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
                f"{'...' if len(missing) > 8 else ''} (TP rank {tp_rank}); it is incomplete"
            )
    return state
