"""The MoEs vs their dense twin on the same tokens and budget (`make compare`).

Trains ``recipe/configs/tiny_moe.py`` (8 experts, top-2), ``recipe/configs/tiny_finegrained.py`` (32 small
experts, top-4, a shared expert, bias balancing) and ``recipe/configs/tiny_dense.py``, all with the same
active parameters per token, one after the other through launch/train.sh, on the same data, steps, batch
and seed, then prints the validation losses and writes ``<out>/moe_vs_dense.png`` (validation and training
loss curves) and ``<out>/compare.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = {  # name: (config, ds_config)
    "moe": ("recipe/configs/tiny_moe.py", "ds_configs/zero2_fp32_ep2.json"),
    "finegrained": ("recipe/configs/tiny_finegrained.py", "ds_configs/zero2_fp32_ep2.json"),
    "dense": ("recipe/configs/tiny_dense.py", "ds_configs/zero2_fp32.json"),
}


def read_curves(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "train": [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r],
        "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


def plot(curves: dict[str, dict], path: Path) -> Path:
    # Deferred: matplotlib takes a second to import, and its backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(10, 4))
    for name, data in curves.items():
        label = f"{name} ({data['summary']['active_params'] / 1e6:.2f}M active, " \
                f"{data['summary']['total_params'] / 1e6:.2f}M total)"
        ax_val.plot(*zip(*data["val"]), marker="o", label=label)
        ax_train.plot(*zip(*data["train"]), label=name, alpha=0.8)
    ax_val.set(title="validation loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax_train.set(title="training LM loss", xlabel="step")
    ax_val.legend(fontsize=8)
    ax_train.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recipe.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for both runs (default runs/compare-<time>)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra overrides given to every run")
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
                        help="train only these (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for name in args.only:
        config, ds_config = CONTENDERS[name]
        extra = [item for s in args.set for item in ("--set", s)]
        cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--nproc", str(args.nproc), "--config", config,
               "--ds_config", ds_config, "--run_dir", str(out / name), "--python", sys.executable, "--", *extra]
        print(f"== training {name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=dict(os.environ)).returncode != 0:
            print(f"error: the {name} run failed; see its output above", file=sys.stderr)
            return 1
        curves[name] = read_curves(out / name)
    result = {name: {"val_loss": c["summary"]["val_loss"], "tokens_seen": c["summary"]["tokens_seen"],
                     "active_params": c["summary"]["active_params"], "total_params": c["summary"]["total_params"],
                     "tokens_per_s": c["summary"]["tokens_per_s"], "wall_s": c["summary"]["wall_s"]}
              for name, c in curves.items()}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    png = plot(curves, out / "moe_vs_dense.png")
    print("\n| model | val loss | tokens seen | active params | total params | tokens/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['val_loss']:.4f} | {r['tokens_seen']:,} | {r['active_params'] / 1e6:.2f}M | "
              f"{r['total_params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |")
    for name in [n for n in result if n != "dense" and "dense" in result]:
        delta = result[name]["val_loss"] - result["dense"]["val_loss"]
        print(f"{name} minus dense validation loss: {delta:+.4f} nats "
              f"({name + ' better' if delta < 0 else 'dense better'})")
    print(f"curves in {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
