"""Per-rank memory of live DeepSpeed engines beside ``recipe.memory``'s estimate, ZeRO stages side by side.

    deepspeed --num_gpus 4 bench/memory_check.py --config recipe/configs/tiny_finegrained.py \\
        --ds_config ds_configs/zero2_fp32_ep2.json ds_configs/zero3_fp32_ep2.json [--out figures.json]

For each JSON, in one launch: the trainer's own job (model, engine, data loader) runs one optimizer step, then
one more forward and backward; before that step every rank measures what its engine holds
(``recipe.memory.measure_engine``: parameters, gradients, optimizer state) beside ``estimate(rank=r)``. Rank 0
prints one row per (JSON, rank) and, with ``--out``, writes them as JSON (tests/test_zero3.py and
tests/test_tensor_parallel.py read it). The JSONs of one launch share one tensor-parallel size (one mesh per process).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.training.telemetry import quiet_deepspeed  # noqa: E402  (first: before deepspeed logs)

quiet_deepspeed()

import torch.distributed as dist  # noqa: E402

from recipe.config import load_config  # noqa: E402
from recipe.ds_config import read_ds_config, resolve_ds_config  # noqa: E402
from recipe.memory import estimate, measure_engine  # noqa: E402
from recipe.training.build import build_job  # noqa: E402
from recipe.training.distributed import start_process_group  # noqa: E402
from recipe.training.plan import RunPlan  # noqa: E402
from recipe.training.step import optimizer_step, total_loss  # noqa: E402

FIELDS = ("dense_params", "expert_params", "grads", "optimizer")


def measure(config_path: str, ds_path: str, ranks, run_dir: Path) -> dict:
    """This rank's measured and estimated bytes for one JSON (one step taken, the next one's gradients held)."""
    config = load_config(config_path, [f"train.run_dir={run_dir}"])
    ds = resolve_ds_config(read_ds_config(ds_path), config, ranks.world_size, ds_path)
    plan = RunPlan(config=config, ds=ds, run_dir=run_dir, world_size=ranks.world_size)
    job = build_job(plan, ranks)
    optimizer_step(job, plan, ranks, 1, record=lambda loss, out: None)  # moments exist after a first step
    x, y = job.loader.next_batch()
    job.engine.backward(total_loss(job.engine(x.to(job.device), y.to(job.device)), config.loss))
    measured = measure_engine(job.engine)
    expected = estimate(config, ds, ranks.world_size, rank=ranks.rank, device_type=job.device.type)
    job.engine.destroy()
    return {"ds_config": ds_path, "zero_stage": ds.zero_stage, "ep_size": ds.ep_size, "tp_size": ds.tp_size,
            "rank": ranks.rank,
            "measured": {f: getattr(measured, f) for f in FIELDS},
            "estimated": {f: getattr(expected, f) for f in FIELDS}, "estimate_total": asdict(expected)}


def table(rows: list[dict]) -> str:
    lines = [f"{'ds_config':28} {'rank':>4} " + " ".join(f"{f + ' (MiB)':>24}" for f in FIELDS),
             f"{'':28} {'':>4} " + " ".join(f"{'measured / estimated':>24}" for _ in FIELDS)]
    for row in rows:
        cells = [f"{row['measured'][f] / 2**20:10.3f} / {row['estimated'][f] / 2**20:10.3f}" for f in FIELDS]
        lines.append(f"{Path(row['ds_config']).name:28} {row['rank']:>4} " + " ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ds_config", nargs="+", required=True)
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    config = load_config(args.config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp_sizes = {resolve_ds_config(read_ds_config(path), config, world_size, path).tp_size for path in args.ds_config}
    if len(tp_sizes) > 1:  # the tensor-parallel mesh is made once per process
        parser.error(f"the ds_configs have tensor-parallel sizes {sorted(tp_sizes)}; measure one TP size per launch")
    ranks = start_process_group(config.train.seed, tp_sizes.pop())
    rows = []
    with TemporaryDirectory() as scratch:  # the job's run folder: nothing is saved
        for ds_path in args.ds_config:
            mine = measure(args.config, ds_path, ranks, Path(scratch))
            everyone = [None] * ranks.world_size
            dist.all_gather_object(everyone, mine)
            rows += everyone
    if ranks.is_main:
        print(table(rows), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
