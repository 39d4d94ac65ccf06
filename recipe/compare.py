"""The MoEs vs their dense twin on the same tokens and budget (`make compare`).

Trains ``recipe/configs/tiny_moe.py`` (8 experts, top-2), ``recipe/configs/tiny_finegrained.py`` (32 small
experts, top-4, a shared expert, bias balancing) and ``recipe/configs/tiny_dense.py``, all with the same
active parameters per token, one after the other through launch/train.sh, on the same data, steps, batch
and seed, then prints the validation losses and writes ``<out>/moe_vs_dense.png`` (validation and training
loss curves) and ``<out>/compare.json``. ``--configs A.py B.py ...`` (``make compare CONFIGS="A.py B.py"``)
trains those instead, each named by its file name; an MoE config gets ds_configs/zero2_fp32_ep2.json, a dense
one ds_configs/zero2_fp32.json, unless ``--ds_config`` names one for all. Every launch gets a free master port,
so a comparison runs beside another training.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {  # name: config, the three `make compare` trains
    "moe": "recipe/configs/tiny_moe.py",
    "finegrained": "recipe/configs/tiny_finegrained.py",
    "dense": "recipe/configs/tiny_dense.py",
}
MOE_DS_CONFIG = "ds_configs/zero2_fp32_ep2.json"
DENSE_DS_CONFIG = "ds_configs/zero2_fp32.json"


@dataclass(frozen=True)
class Contender:
    name: str  # its run folder under --out and its key in compare.json
    config: str
    ds_config: str
    is_moe: bool


def contenders(configs: list[str], overrides: list[str], ds_config: Optional[str] = None) -> list[Contender]:
    """One contender per config: the default three keep their names, others are named by their file name (made
    unique); ``ds_config`` (else by kind: EP=2 for an MoE, none for a dense model). Raises ConfigError."""
    from .config import load_config

    names_of = {path: name for name, path in DEFAULT_CONFIGS.items()}
    found: list[Contender] = []
    for config in configs:
        base = name = names_of.get(config) or Path(config).stem
        for copy in range(2, len(found) + 2):  # the same file name twice: a-2, a-3, ...
            if name not in {c.name for c in found}:
                break
            name = f"{base}-{copy}"
        config = _from_here(config)
        is_moe = load_config(config if Path(config).is_absolute() else ROOT / config, overrides).is_moe
        chosen = _from_here(ds_config) if ds_config else MOE_DS_CONFIG if is_moe else DENSE_DS_CONFIG
        found.append(Contender(name, config, chosen, is_moe))
    return found


def _from_here(path: str) -> str:
    """``path`` made absolute when it exists from the current folder: launch/train.sh runs from the repository
    root, where the default configs' relative paths hold but not necessarily the user's."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), for one launch's master port."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def launch_command(contender: Contender, run_dir: Path, nproc: int, port: int, overrides: list[str]) -> list[str]:
    """The launch/train.sh command that trains ``contender`` in ``run_dir`` with master port ``port``."""
    extra = [item for override in overrides for item in ("--set", override)]
    return ["bash", str(ROOT / "launch" / "train.sh"), "--nproc", str(nproc), "--config", contender.config,
            "--ds_config", contender.ds_config, "--run_dir", str(run_dir), "--master_port", str(port),
            "--python", sys.executable, "--", *extra]


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


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipe.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", metavar="CONFIG", default=list(DEFAULT_CONFIGS.values()),
                        help="configs to train, one run each (default: tiny_moe.py, tiny_finegrained.py, "
                             "tiny_dense.py, named moe, finegrained, dense)")
    parser.add_argument("--ds_config", help=f"DeepSpeed JSON for every run (default: {MOE_DS_CONFIG} for an MoE, "
                                            f"{DENSE_DS_CONFIG} for a dense config)")
    parser.add_argument("--out", default=None, help="folder for the runs (default runs/compare-<time>)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra overrides given to every run")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="train only these of the contenders (names: moe finegrained dense by default)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from .config import ConfigError

    args = parse_args(argv)
    try:
        runs = contenders(args.configs, args.set, args.ds_config)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.only or []) - {c.name for c in runs})
    if unknown:
        print(f"error: --only {' '.join(unknown)}: no such contender; choose from "
              f"{' '.join(c.name for c in runs)}", file=sys.stderr)
        return 2
    runs = [c for c in runs if args.only is None or c.name in args.only]
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for contender in runs:
        cmd = launch_command(contender, out / contender.name, args.nproc, free_port(), args.set)
        print(f"== training {contender.name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=dict(os.environ)).returncode != 0:
            print(f"error: the {contender.name} run failed; see its output above", file=sys.stderr)
            return 1
        curves[contender.name] = read_curves(out / contender.name)
    report(curves, out, dense=[c.name for c in runs if not c.is_moe])
    return 0


def report(curves: dict[str, dict], out: Path, dense: list[str]) -> None:
    """compare.json, the PNG, the table, and each MoE's loss minus the first dense run's."""
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
    if dense:
        for name in [n for n in result if n not in dense]:
            delta = result[name]["val_loss"] - result[dense[0]]["val_loss"]
            print(f"{name} minus {dense[0]} validation loss: {delta:+.4f} nats "
                  f"({name + ' better' if delta < 0 else dense[0] + ' better'})")
    print(f"curves in {png}")


if __name__ == "__main__":
    sys.exit(main())
