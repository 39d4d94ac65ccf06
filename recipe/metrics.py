"""Where a run's numbers go: metrics.jsonl, wandb (offline unless asked), DeepSpeed's monitor, heatmaps.

Only rank 0 writes. Values arrive already reduced over ranks (the trainer does the reductions).
DeepSpeed's monitor (the ds_config's ``tensorboard`` / ``csv_monitor`` / ``comet`` blocks) gets every scalar of
``flatten`` as ``moe_recipe/<name>`` at the optimizer step; without an ``output_path`` its files are in
``<run_dir>/tensorboard`` and ``<run_dir>/csv_monitor`` (recipe/ds_config.py fills it in). On --resume the csv files
keep the rows of steps after the checkpoint (metrics.jsonl drops them; tensorboard purges such orphaned events).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

WANDB_MODES = ("offline", "online", "disabled")


def flatten(record: dict) -> dict[str, float]:
    """Scalar view of a record for wandb / tensorboard / csv: per-layer MoE figures become moe/layer{L}/name."""
    flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    for layer in record.get("moe", []):
        prefix = f"moe/layer{layer['layer']}"
        for key in ("drop_fraction", "l_aux", "router_entropy", "max_over_mean_load"):
            flat[f"{prefix}/{key}"] = layer[key]
        for expert, load in enumerate(layer["tokens_per_expert"]):
            flat[f"{prefix}/tokens_expert{expert}"] = load
    return flat


class MetricsWriter:
    def __init__(self, run_dir: Path, is_main: bool, monitor=None, wandb_mode: str = "offline",
                 wandb_project: str = "moe-recipe", run_config: Optional[dict] = None,
                 resume_step: Optional[int] = None):
        """``resume_step``: continuing a run from that step; later records (from after the checkpoint) are dropped."""
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.wandb_run = None
        if not is_main:
            return
        self.path = self.run_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if wandb_mode != "disabled":
            import wandb  # deferred: seconds to import, and runs with wandb disabled never need it

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=wandb_project, dir=str(self.run_dir), mode=wandb_mode,
                                        name=self.run_dir.name, config=run_config or {}, resume="allow" if resume_step is not None else None,
                                        id=self.run_dir.name.replace("/", "_"))

    def write(self, record: dict) -> None:
        step = record["step"]
        if self.monitor is not None:  # every rank calls; DeepSpeed's monitor writes on rank 0
            self.monitor.write_events([(f"moe_recipe/{k}", v, step) for k, v in flatten(record).items()])
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(flatten(record), step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def expert_load_heatmap(loads: list[list[float]], path: Path, title: str) -> Path:
    """PNG of kept tokens per expert (rows: MoE layers, columns: experts), as a share of each layer's total."""
    # Deferred: matplotlib takes a second to import, and its backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(loads, dtype=float)
    share = grid / np.maximum(grid.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * grid.shape[1], 1.2 + 0.45 * grid.shape[0]))
    image = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of kept tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
