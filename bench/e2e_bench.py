"""End-to-end benchmark: training tokens/s of the default model with our MoE layer vs DeepSpeed's.

    .venv/bin/python -m bench.e2e_bench                    # `make bench-e2e`: 2 rounds x 2 runs of 40 steps, ~4 min
    .venv/bin/python -m bench.e2e_bench --quick            # 1 round of 15 steps, ~2 min
    .venv/bin/python -m bench.e2e_bench --rounds 3 --steps 60

Each run trains ``recipe/configs/tiny_moe.py`` with ``ds_configs/zero2_fp32_ep2.json`` (2 ranks, expert
parallel 2, ZeRO-2 fp32) on the default corpus (``make data``; prepared here if missing) through
``launch/train.sh``, in a fresh run folder under a temporary directory. The two contenders differ in one
setting only:

* ``ours``: the model as shipped (``model.moe_impl='recipe'``, ``recipe.model.moe.MoE``);
* ``deepspeed``: ``model.moe_impl='deepspeed'``: ``deepspeed.moe.layer.MoE`` with our SwiGLU expert and the
  same routing (k=2, capacity factor 1.25, eval 2.0, min capacity 4, tokens dropped, no noise, no RTS,
  argmax second expert), same weights at step 0, same data order and JSON. DeepSpeed computes the
  balancing loss per rank, so it runs with ``model.moe_balance_over_data_parallel=False``; ours keeps
  the shipped ``True`` (one extra all-reduce of E+1 numbers per layer) unless ``--match-balance``.

``--preset finegrained`` trains ``recipe/configs/tiny_finegrained.py`` instead (32 experts of width 88, top-4,
dropless, one shared expert, bias balancing) to ``bench_results/e2e_finegrained.json``, target ratio 1.3. Its
DeepSpeed variant (``deepspeed_routing``) differs from the shipped config in ``moe_impl='deepspeed'`` and:
``moe_capacity_priority='probs'`` (topkgating's queue; nothing is dropped, so no effect on the math),
``moe_norm_topk_prob=None`` (renormalise over survivors: dropless, the same as over the k chosen),
``moe_bias_update_rate=0`` (DeepSpeed has no aux-loss-free bias, so its routing drifts apart from ours) and
``moe_balance_over_data_parallel=False``; ``moe_balance_loss='switch'`` is already the config's. Ours runs as
shipped unless ``--match-routing`` gives it exactly the DeepSpeed variant's routing settings.

Runs alternate (ours, deepspeed, ours, deepspeed, ...) so slow drifts of the machine hit both. A run's
speed is the tokens/s over its logged intervals after the first ``--warmup-logs`` ones (start-up, lazy
initialisation, first-step allocation excluded; metrics.jsonl logs every ``--log-every`` steps): total
tokens / total time of those intervals. The report gives each contender's median over rounds, the
ratio of the medians and the median of per-round ratios (ours / deepspeed), writes
``bench_results/e2e.json`` and prints a markdown table. The issue's target is a ratio >= 1.2.

Use an idle machine: both ranks share the CPU cores with anything else running, and the JSON records
the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ours", "deepspeed")
# --preset: (model config, DeepSpeed JSON, target ours/deepspeed tokens/s ratio)
PRESETS = {
    "default": ("recipe/configs/tiny_moe.py", "ds_configs/zero2_fp32_ep2.json", 1.2),
    "finegrained": ("recipe/configs/tiny_finegrained.py", "ds_configs/zero2_fp32_ep2.json", 1.3),
}
# Routing settings DeepSpeed's layer has no option for; the DeepSpeed variant needs these values.
DEEPSPEED_FIXED = {"moe_score_function": "softmax", "moe_route_scale": 1.0, "moe_num_expert_groups": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_routing(model) -> dict:
    """What the DeepSpeed variant of ``model`` (a ``ModelConfig``) changes besides ``moe_impl``, {key: value}:
    DeepSpeed's per-rank balancing loss; at k >= 3 topkgating's 'probs' capacity queue and all-choices
    ('switch') loss; no aux-loss-free bias updates; combine weights renormalised over the surviving choices
    (``moe_norm_topk_prob=None``: the same as over the k chosen when nothing is dropped). ValueError for a
    setting DeepSpeed's gate cannot express at all."""
    for key, wanted in DEEPSPEED_FIXED.items():
        if getattr(model, key) != wanted:
            raise ValueError(f"model.{key}={getattr(model, key)!r}: DeepSpeed's layer has no such option")
    if model.moe_norm_topk_prob is not None and model.moe_drop_tokens:
        raise ValueError("model.moe_norm_topk_prob is set and tokens are dropped: DeepSpeed renormalises over "
                         "the surviving choices only, a different model; set moe_norm_topk_prob=None")
    wanted = {"moe_balance_over_data_parallel": False, "moe_bias_update_rate": 0.0, "moe_norm_topk_prob": None}
    if model.moe_gate_k >= 3:
        wanted.update(moe_capacity_priority="probs", moe_balance_loss="switch")
    return {key: value for key, value in wanted.items() if getattr(model, key) != value}


def overrides(impl: str, args: argparse.Namespace) -> list[str]:
    """recipe.train --set arguments of one contender: short run, no evals or saves before the end."""
    sets = [f"train.steps={args.steps}", f"train.log_every={args.log_every}", f"train.eval_every={10 ** 9}",
            f"train.save_every={10 ** 9}", "train.wandb='disabled'"]
    routing = dict(args.deepspeed_routing)
    if impl == "deepspeed":
        sets.append("model.moe_impl='deepspeed'")
    elif args.match_routing:
        pass  # ours with exactly the DeepSpeed variant's routing
    elif args.match_balance:
        routing = {"moe_balance_over_data_parallel": False} if "moe_balance_over_data_parallel" in routing else {}
    else:
        routing = {}
    sets += [f"model.{key}={value!r}" for key, value in routing.items()]
    return [arg for s in sets for arg in ("--set", s)]


def run_once(impl: str, round_index: int, workdir: Path, args: argparse.Namespace) -> dict:
    """One training run through launch/train.sh; returns its measured speed and losses."""
    run_dir = workdir / f"{impl}_round{round_index}"
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--nproc", str(args.nproc), "--config", args.config,
           "--ds_config", args.ds_config, "--run_dir", str(run_dir), "--python", sys.executable, "--",
           *overrides(impl, args)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} round {round_index} failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    measured = train[args.warmup_logs:]
    if not measured:
        raise RuntimeError(f"{impl}: {len(train)} logged intervals, none left after --warmup-logs "
                           f"{args.warmup_logs}; raise --steps or lower --log-every")
    tokens_per_step = json.loads((run_dir / "summary.json").read_text())["tokens_seen"] / args.steps
    previous = [train[args.warmup_logs - 1]["step"] if args.warmup_logs else 0] + [r["step"] for r in measured[:-1]]
    tokens = [tokens_per_step * (r["step"] - p) for r, p in zip(measured, previous)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, measured)]
    return {
        "impl": impl, "round": round_index, "tokens_per_s": sum(tokens) / sum(seconds),
        "interval_tokens_per_s": [r["tokens_per_s"] for r in measured],
        "measured_steps": [previous[0] + 1, measured[-1]["step"]],
        "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"], "final_lm_loss": train[-1]["lm_loss"],
        "wall_s": wall,
    }


def ensure_data(config: str):
    """Prepare the default corpus (`make data`) when the config's data folder is missing; returns the config."""
    sys.path.insert(0, str(ROOT))
    from recipe.config import load_config

    loaded = load_config(ROOT / config)
    data = ROOT / loaded.data.path
    if not ((data / "train.bin").is_file() and (data / "val.bin").is_file()):
        print(f"{data} not prepared: running `make data`", flush=True)
        subprocess.run(["make", "data"], cwd=ROOT, check=True)
    return loaded


def markdown(report: dict) -> str:
    runs = report["runs"]
    lines = ["| layer | tokens/s per run | median tokens/s | loss at last step |", "|---|---|---|---|"]
    for impl in IMPLS:
        mine = [r for r in runs if r["impl"] == impl]
        per_run = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in mine)
        losses = ", ".join(f"{r['final_loss']:.3f}" for r in mine)
        lines.append(f"| {impl} | {per_run} | {report['median_tokens_per_s'][impl]:,.0f} | {losses} |")
    lines.append("")
    lines.append(f"ours / deepspeed: {report['ratio_of_medians']:.3f}x (median of per-round ratios "
                 f"{report['median_round_ratio']:.3f}x; target >= {report['target_ratio']}x)")
    changes = ", ".join(f"{k}={v!r}" for k, v in report["setup"]["deepspeed_routing"].items()) or "nothing"
    lines.append(f"the DeepSpeed variant differs in moe_impl and {changes}"
                 f"{' (ours matched to it)' if report['setup']['match_routing'] else ''}")
    return "\n".join(lines)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="runs per contender, alternating (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 40)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per logged interval (default 5)")
    parser.add_argument("--warmup-logs", type=int, default=1,
                        help="logged intervals left out at the start of each run (default 1)")
    parser.add_argument("--quick", action="store_true", help="1 round of 15 steps")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: tiny_moe.py (k=2); finegrained: tiny_finegrained.py (32 experts top-4, dropless)")
    parser.add_argument("--match-balance", action="store_true",
                        help="run ours with moe_balance_over_data_parallel=False too (DeepSpeed's per-rank loss)")
    parser.add_argument("--match-routing", action="store_true",
                        help="run ours with every routing change the DeepSpeed variant needs (implies --match-balance)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default=None, help="model config (default: the preset's)")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (default: the preset's)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    parser.add_argument("--out", default=None, help="default bench_results/e2e.json (e2e_<preset>.json for others)")
    args = parser.parse_args(argv)
    config, ds_config, args.target_ratio = PRESETS[args.preset]
    args.config, args.ds_config = args.config or config, args.ds_config or ds_config
    args.out = args.out or ("bench_results/e2e.json" if args.preset == "default" else f"bench_results/e2e_{args.preset}.json")
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.steps = args.steps or (15 if args.quick else 40)
    if args.steps < (args.warmup_logs + 1) * args.log_every:
        parser.error(f"--steps {args.steps} leaves no measured interval after {args.warmup_logs} warm-up "
                     f"interval(s) of {args.log_every} steps")
    return args


def run_rounds(args: argparse.Namespace) -> list[dict]:
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="moe_e2e_") as tmp:
        for round_index in range(args.rounds):
            for impl in IMPLS:
                run = run_once(impl, round_index, Path(tmp), args)
                runs.append(run)
                print(f"[{time.perf_counter() - started:6.1f}s] round {round_index + 1}/{args.rounds} {impl}: "
                      f"{run['tokens_per_s']:,.0f} tokens/s (steps {run['measured_steps'][0]}-"
                      f"{run['measured_steps'][1]}), loss {run['first_loss']:.3f} -> {run['final_loss']:.3f}, "
                      f"{run['wall_s']:.0f} s", flush=True)
    return runs


def main(argv=None) -> int:
    args = parse_arguments(argv)
    args.deepspeed_routing = deepspeed_routing(ensure_data(args.config).model)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.1f} before starting: other processes share the CPUs and "
              f"will perturb the timings (runs alternate, which helps, but use an idle machine)", file=sys.stderr)
    started = time.perf_counter()
    runs = run_rounds(args)

    from importlib.metadata import version

    speed = {impl: [r["tokens_per_s"] for r in runs if r["impl"] == impl] for impl in IMPLS}
    medians = {impl: statistics.median(v) for impl, v in speed.items()}
    report = {
        "environment": {"torch": version("torch"), "deepspeed": version("deepspeed"), "cpus": os.cpu_count(),
                        "python": sys.version.split()[0], "loadavg_1min_before": load_before,
                        "loadavg_1min_after": os.getloadavg()[0]},
        "setup": {"preset": args.preset, "config": args.config, "ds_config": args.ds_config, "nproc": args.nproc,
                  "steps": args.steps, "log_every": args.log_every, "warmup_logs": args.warmup_logs,
                  "rounds": args.rounds, "match_balance": args.match_balance, "match_routing": args.match_routing,
                  "deepspeed_routing": args.deepspeed_routing,
                  "overrides": {impl: overrides(impl, args)[1::2] for impl in IMPLS}},
        "runs": runs,
        "median_tokens_per_s": medians,
        "ratio_of_medians": medians["ours"] / medians["deepspeed"],
        "median_round_ratio": statistics.median(a / b for a, b in zip(speed["ours"], speed["deepspeed"])),
        "target_ratio": args.target_ratio,
        "wall_s": time.perf_counter() - started,
    }
    out = ROOT / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print()
    print(markdown(report))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
