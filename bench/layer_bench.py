"""MoE layer benchmark: ``recipe.model.moe.MoE`` against DeepSpeed's MoE, an experts-only floor and a dense FFN.

    .venv/bin/python -m bench.layer_bench            # default grid, about 6-8 minutes on 2 CPU cores
    .venv/bin/python -m bench.layer_bench --quick    # a subset, about 1 minute
    .venv/bin/python -m bench.layer_bench --only grid --no-memory --rounds 3

What one row compares (forward + backward, same weights, same inputs, one process):

* ``ours``: ``recipe.model.moe.MoE`` (GShard top-k, index dispatch, stacked SwiGLU experts).
* ``deepspeed``: ``deepspeed.moe.layer.MoE`` with a SwiGLU expert ``w2(silu(w1 x) * w3 x)`` (built as
  ``recipe.model.moe.DeepSpeedBaselineMoE``: DeepSpeed's module and forward, our output tuple), loaded with
  our layer's state dict (the keys are the same), so both route every token identically. Noise and
  random token selection are off on both (``noisy_gate_policy=None, use_rts=False,
  top2_2nd_expert_sampling=False``); same k, capacity factor, ``drop_tokens`` and ``min_capacity=4``.
  At k >= 3 DeepSpeed runs ``topkgating`` ('probs' drop policy, all-choices loss) and ours is built with
  the same semantics (``capacity_priority='probs', balance_loss='switch'``).
* ``experts_only``: the floor. Our same E experts run on k·S rows split evenly between them: no router,
  no gating, no gather/scatter, no capacity padding.
* ``dense``: one SwiGLU with k experts' worth of hidden units (k·F) on the S tokens: the same
  active FLOPs without any routing.

Fine-grained rows (group ``finegrained``, in the default grid and in ``--quick``): M=256, S=4096, k=8 with
(E=64, F=128) and (E=128, F=64), each at cf=1.25 and dropless (``drop_tokens=False``); targets ours <= 1.15x
the experts-only floor, and DeepSpeed/ours >= 1.5x at E=64 k=8 cf=1.25.

Every backward includes the balancing loss (weight 0.01) for the two MoE layers. Parameter
gradients are reset to None before each call (as ``zero_grad(set_to_none=True)`` does).

Timing: contenders are interleaved round-robin in one process (the order rotates each round), after a
warm-up; each round times ``reps`` calls per contender (enough for ~0.15 s), and a row runs at least
5 rounds and as many more as fit in ~10 s of timing (up to 40: short rows get many). Ratios are computed
per round and the table shows their median, which cancels slow drifts of the machine.

Peak memory: each (row, contender) runs in a fresh process forked from a server that has only imported
the libraries. The child builds the contender and its inputs, runs a tiny warm-up (lazy imports), resets
the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs one full forward+backward and reports
``VmHWM - VmRSS(before)``: the extra resident memory of the step (activations, temporaries, gradients).

bf16 on this CPU (AVX2, no AVX512-BF16) runs matmuls far slower than fp32, so only a small bf16 subset
is in the default grid (S=1024 and 2048 at k=2 cf=1.25, 3 rounds). Results go to ``bench_results/layer.json`` and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = ("ours", "deepspeed", "experts_only", "dense")
PATH_CONTENDERS = ("ours_grouped", "ours_loop")
THREADS = 2
MIN_CAPACITY = 4
AUX_WEIGHT = 0.01


@dataclass(frozen=True)
class Case:
    group: str  # grid | wide | experts | finegrained | bf16 | path
    hidden: int  # M
    ffn: int  # F, per expert
    experts: int  # E
    tokens: int  # S
    k: int
    cf: float
    dtype: str = "fp32"
    drop: bool = True  # False: dropless (drop_tokens=False; cf unused)

    @property
    def label(self) -> str:
        capacity = f"cf{self.cf:g}" if self.drop else "dropless"
        return f"M{self.hidden} F{self.ffn} E{self.experts} S{self.tokens} k{self.k} {capacity} {self.dtype}"


def finegrained_cases(tokens: int = 4096, dtype: str = "fp32") -> List[Case]:
    """Fine-grained experts (many narrow experts, k=8): (E=64, F=128) and (E=128, F=64), at cf 1.25 and dropless."""
    return [Case("finegrained", 256, ffn, experts, tokens, 8, 1.25, dtype, drop)
            for experts, ffn in ((64, 128), (128, 64)) for drop in (True, False)]


def default_cases(quick: bool) -> List[Case]:
    if quick:
        return [
            Case("grid", 256, 688, 8, 1024, 1, 1.0),
            Case("grid", 256, 688, 8, 4096, 2, 1.25),
            Case("experts", 256, 688, 64, 4096, 2, 1.25),
            Case("experts", 256, 688, 8, 4096, 2, 1.25),
            *finegrained_cases(),
            Case("bf16", 256, 688, 8, 512, 2, 1.25, "bf16"),
            Case("path", 256, 688, 8, 4096, 2, 1.25),
        ]
    cases = [Case("grid", 256, 688, 8, s, k, cf) for s in (1024, 4096, 16384) for k in (1, 2) for cf in (1.0, 1.25)]
    cases.append(Case("wide", 512, 1376, 16, 8192, 2, 1.25))
    # Fixed active compute: every token still runs k experts of width F; only the expert count grows.
    cases += [Case("experts", 256, 688, e, 8192, 2, 1.25) for e in (8, 16, 32, 64)]
    cases += finegrained_cases()
    cases += [Case("bf16", 256, 688, 8, s, 2, 1.25, "bf16") for s in (1024, 2048)]
    # torch._grouped_mm against the per-expert loop inside our layer.
    cases += [Case("path", 256, 688, 8, 4096, 2, 1.25), Case("path", 256, 688, 8, 512, 2, 1.25, "bf16")]
    return cases


# ----------------------------------------------------------------------------------------------- builders


def make_ours(hidden: int, ffn: int, experts: int, k: int, cf: float, dtype: torch.dtype, drop: bool = True):
    """Our layer; at k >= 3 with DeepSpeed's topkgating semantics ('probs' capacity queue, all-choices loss)."""
    from recipe.model.moe import MoE

    topk = dict(capacity_priority="probs", balance_loss="switch") if k >= 3 else {}
    layer = MoE(hidden, experts, k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=MIN_CAPACITY,
                drop_tokens=drop, intermediate_size=ffn, noisy_gate_policy=None, use_rts=False,
                second_expert_policy="argmax", balance_over_data_parallel=False, **topk)
    return layer.to(dtype)


def set_grouped_mm(layer, mode: str) -> None:
    """``auto`` (the layer decides), ``on`` (torch._grouped_mm) or ``off`` (per-expert loop)."""
    layer.deepspeed_moe.experts.use_grouped_mm = {"auto": None, "on": True, "off": False}[mode]


def make_deepspeed(ours, hidden: int, ffn: int, experts: int, k: int, cf: float, dtype: torch.dtype,
                   drop: bool = True):
    """``deepspeed.moe.layer.MoE`` (as ``DeepSpeedBaselineMoE``: DeepSpeed's module and forward, our output
    tuple) loaded with ``ours``' state dict: same router and experts, so both route every token alike."""
    from recipe.model.moe import DeepSpeedBaselineMoE

    with contextlib.redirect_stdout(io.StringIO()):
        layer = DeepSpeedBaselineMoE(hidden, ffn, num_experts=experts, ep_size=1, k=k, capacity_factor=cf,
                                     eval_capacity_factor=cf, min_capacity=MIN_CAPACITY, noisy_gate_policy=None,
                                     drop_tokens=drop, use_rts=False, top2_2nd_expert_sampling=False)
    layer.load_state_dict(ours.state_dict())  # same keys: identical router and experts
    return layer.to(dtype)


def even_split(rows: int, parts: int) -> torch.Tensor:
    counts = torch.full((parts,), rows // parts, dtype=torch.long)
    counts[: rows % parts] += 1
    return counts


class Runner:
    """One contender with its inputs; ``step()`` is one forward+backward."""

    def __init__(self, params: List[torch.nn.Parameter], leaf: torch.Tensor, fn: Callable[[], None]):
        self.params, self.leaf, self.fn = params, leaf, fn

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        self.leaf.grad = None
        self.fn()


def _layer_runner(layer, x_SM: torch.Tensor, g_SM: torch.Tensor, aux_grad: torch.Tensor) -> Runner:
    """Forward+backward of an MoE layer returning ``MoEOutput`` (ours or the DeepSpeed baseline)."""

    def fn() -> None:
        out = layer(x_SM)
        torch.autograd.backward((out.output, out.l_aux), (g_SM, aux_grad))

    return Runner(list(layer.parameters()), x_SM, fn)


def build_runner(name: str, case: Case, device: str = "cpu") -> Runner:
    """Build contender ``name`` for ``case`` on ``device``, with its inputs and output gradient."""
    torch.manual_seed(0)
    dtype = DTYPES[case.dtype]
    S = case.tokens
    M, F, E, k = case.hidden, case.ffn, case.experts, case.k
    ours = make_ours(M, F, E, k, case.cf, torch.float32, case.drop)
    x_SM = torch.randn(S, M, dtype=dtype, device=device, requires_grad=True)
    g_SM = torch.randn(S, M, dtype=dtype, device=device)
    aux_grad = torch.tensor(AUX_WEIGHT, device=device)

    if name in ("ours", "ours_grouped", "ours_loop"):
        layer = ours.to(device=device, dtype=dtype)
        set_grouped_mm(layer, {"ours": "auto", "ours_grouped": "on", "ours_loop": "off"}[name])
        return _layer_runner(layer, x_SM, g_SM, aux_grad)
    if name == "deepspeed":
        layer = make_deepspeed(ours, M, F, E, k, case.cf, dtype, case.drop).to(device)
        return _layer_runner(layer, x_SM, g_SM, aux_grad)
    if name == "experts_only":
        experts = ours.deepspeed_moe.experts.to(device=device, dtype=dtype)
        rows = k * S
        x_NM = torch.randn(rows, M, dtype=dtype, device=device, requires_grad=True)
        g_NM = torch.randn(rows, M, dtype=dtype, device=device)
        counts = even_split(rows, E).to(device)

        def fn() -> None:
            experts(x_NM, counts).backward(g_NM)

        return Runner(list(experts.parameters()), x_NM, fn)
    if name == "dense":
        from recipe.model.moe import SwiGLU

        ffn = SwiGLU(M, k * F).to(device=device, dtype=dtype)

        def fn() -> None:
            ffn(x_SM).backward(g_SM)

        return Runner(list(ffn.parameters()), x_SM, fn)
    raise ValueError(f"unknown contender {name!r}")


# ----------------------------------------------------------------------------------------------- timing


def time_case(case: Case, names: tuple, min_rounds: int, target_s: float = 0.15,
              row_budget_s: float = 10.0) -> Dict[str, List[float]]:
    """Seconds per forward+backward for each contender, one entry per round (round-robin, rotating order).

    Each round times ``reps`` calls per contender (~``target_s``); short rows get more rounds, up to
    ``row_budget_s`` of timing (at most 40 rounds), because on this VM single calls vary by 10-20% and
    a median over 5 rounds of a 90 ms call still moved by that much between runs.
    """
    runners = {name: build_runner(name, case) for name in names}
    reps, once = {}, {}
    for name, runner in runners.items():
        runner.step()  # warm-up (lazy init, allocator); the next call also sizes the repetitions
        start = time.perf_counter()
        runner.step()
        once[name] = max(time.perf_counter() - start, 1e-6)
        reps[name] = max(1, min(20, math.ceil(target_s / once[name])))
    round_s = sum(reps[name] * once[name] for name in names)
    rounds = max(min_rounds, min(40, math.floor(row_budget_s / round_s)))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            runner = runners[name]
            start = time.perf_counter()
            for _ in range(reps[name]):
                runner.step()
            times[name].append((time.perf_counter() - start) / reps[name])
    return times


def median_ratio(num: List[float], den: List[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------------------------- memory


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so it cannot hide allocations of the next step."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _memory_child(case: Case, name: str) -> float:
    """Runs in a fresh forked process: extra peak RSS (MiB) of one forward+backward."""
    import gc

    torch.set_num_threads(THREADS)
    # Lazy imports and one-time code paths on a tiny copy of the case, so that the allocator holds no
    # freed full-size blocks that the measured step could reuse without raising the RSS.
    build_runner(name, replace(case, hidden=32, ffn=64, experts=min(case.experts, max(4, case.k)),
                               tokens=64)).step()
    gc.collect()
    _malloc_trim()
    runner = build_runner(name, case)
    gc.collect()
    _malloc_trim()  # building may have freed fp32 copies (weights are cast after loading)
    before = _read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    runner.step()
    peak = _read_status_kib("VmHWM")
    return (peak - before) / 1024.0


class MemoryMeter:
    def __init__(self):
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "deepspeed.moe.layer", "recipe.model.moe"])

    def measure(self, case: Case, name: str) -> float:
        with self.ctx.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(_memory_child, (case, name))


def clear_refs_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- report


def fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: List[dict]) -> str:
    head = ("| config | ours ms | DS ms | experts-only ms | ours tok/s | ours/experts-only | DS/ours (speedup) | "
            "ours/dense | mem ours MiB | mem DS MiB | mem ours/DS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if row["case"]["group"] == "path":
            continue
        t, r, m = row["median_ms"], row["ratios"], row.get("memory_mib", {})
        mem_ratio = (m["ours"] / m["deepspeed"]) if m.get("ours") and m.get("deepspeed") else None
        lines.append(
            f"| {row['label']} | {t['ours']:.1f} | {t['deepspeed']:.1f} | {t['experts_only']:.1f} | "
            f"{row['tokens_per_s']['ours']:,.0f} | "
            f"{fmt(r['ours/experts_only'])} | {fmt(r['deepspeed/ours'])} | {fmt(r['ours/dense'])} | "
            f"{fmt(m.get('ours'), '.0f')} | {fmt(m.get('deepspeed'), '.0f')} | {fmt(mem_ratio)} |"
        )
    return "\n".join(lines)


def path_table(rows: List[dict]) -> str:
    lines = ["| config | grouped_mm ms | loop ms | grouped/loop | auto picks |", "|---|---|---|---|---|"]
    for row in rows:
        if row["case"]["group"] != "path":
            continue
        t = row["median_ms"]
        lines.append(f"| {row['label']} | {t['ours_grouped']:.1f} | {t['ours_loop']:.1f} | "
                     f"{row['ratios']['grouped/loop']:.2f} | {row['auto_path']} |")
    return "\n".join(lines)


def auto_path(case: Case) -> str:
    from recipe.model.moe.experts import SwiGLUExperts

    experts = SwiGLUExperts(2, case.hidden, case.ffn).to(DTYPES[case.dtype])
    return "grouped_mm" if experts._grouped(torch.empty(1, case.hidden, dtype=DTYPES[case.dtype])) else "loop"


def summary(rows: List[dict]) -> List[str]:
    main = [r for r in rows if r["case"]["group"] != "path"]
    lines = []
    floor = [r["ratios"]["ours/experts_only"] for r in main if r["case"]["group"] != "finegrained"]
    if floor:
        lines.append(f"ours/experts-only: max {max(floor):.3f} (target <= 1.10)")
    lines += finegrained_summary([r for r in main if r["case"]["group"] == "finegrained"])
    k2 = [r["ratios"]["deepspeed/ours"] for r in main if r["case"]["k"] == 2 and r["case"]["cf"] == 1.25]
    if k2:
        lines.append(f"DS/ours at k=2 cf=1.25: min {min(k2):.2f}x (target >= 1.3x)")
    lines.append(f"DS/ours everywhere: min {min(r['ratios']['deepspeed/ours'] for r in main):.2f}x (target >= 1.0x)")
    mem = [r["memory_mib"]["ours"] / r["memory_mib"]["deepspeed"] for r in main if r.get("memory_mib")]
    if mem:
        lines.append(f"peak memory ours/DS: max {max(mem):.2f} (target <= 0.8)")
    sweep = {r["case"]["experts"]: r["median_ms"]["ours"] for r in main if r["case"]["group"] == "experts"}
    if 8 in sweep and max(sweep) > 8:
        e_max = max(sweep)
        lines.append(f"E 8->{e_max} at fixed active compute: ours time x{sweep[e_max] / sweep[8]:.3f} "
                     f"(target <= 1.15)")
    return lines


def finegrained_summary(rows: List[dict]) -> List[str]:
    """The fine-grained rows' targets: near the experts-only floor, well ahead of DeepSpeed at E=64 k=8 cf=1.25."""
    if not rows:
        return []
    lines = [f"fine-grained ours/experts-only: max {max(r['ratios']['ours/experts_only'] for r in rows):.3f} "
             f"(target <= 1.15)"]
    e64 = [r["ratios"]["deepspeed/ours"] for r in rows
           if (r["case"]["experts"], r["case"]["k"], r["case"]["drop"], r["case"]["cf"]) == (64, 8, True, 1.25)]
    if e64:
        lines.append(f"DS/ours at E=64 k=8 cf=1.25: {min(e64):.2f}x (target >= 1.5x)")
    lines.append("fine-grained DS/ours: " + ", ".join(f"{r['label']} {r['ratios']['deepspeed/ours']:.2f}x"
                                                     for r in rows))
    return lines


def environment() -> dict:
    import deepspeed

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1 minute subset")
    parser.add_argument("--rounds", type=int, default=None,
                        help="minimum timed rounds per row (default 5, quick 3); short rows run more, up to ~10 s")
    parser.add_argument("--only", default=None, help="comma-separated groups: grid,wide,experts,finegrained,bf16,path")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default="bench_results/layer.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    rounds = args.rounds or (3 if args.quick else 5)
    cases = default_cases(args.quick)
    if args.only:
        groups = set(args.only.split(","))
        cases = [c for c in cases if c.group in groups]
    measure_memory = not args.no_memory and clear_refs_supported()
    if not args.no_memory and not measure_memory:
        print("note: /proc/self/clear_refs is not writable here; skipping peak memory", file=sys.stderr)
    meter = MemoryMeter() if measure_memory else None

    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.1f} before starting: other processes share the CPUs and "
              f"will perturb the timings (ratios are per round, which helps, but run on an idle machine)",
              file=sys.stderr)
    started = time.perf_counter()
    rows = []
    for case in cases:
        names = PATH_CONTENDERS if case.group == "path" else CONTENDERS
        t0 = time.perf_counter()
        case_rounds = min(rounds, 3) if case.dtype != "fp32" else rounds  # bf16 is slow here; see docstring
        times = time_case(case, names, case_rounds, row_budget_s=3.0 if args.quick else 10.0)
        row = {"case": asdict(case), "label": case.label, "rounds": len(times[names[0]]),
               "median_ms": {n: 1e3 * statistics.median(v) for n, v in times.items()},
               "times_ms": {n: [1e3 * t for t in v] for n, v in times.items()}}
        if case.group == "path":
            row["ratios"] = {"grouped/loop": median_ratio(times["ours_grouped"], times["ours_loop"])}
            row["auto_path"] = auto_path(case)
        else:
            row["ratios"] = {
                "ours/experts_only": median_ratio(times["ours"], times["experts_only"]),
                "deepspeed/ours": median_ratio(times["deepspeed"], times["ours"]),
                "ours/dense": median_ratio(times["ours"], times["dense"]),
            }
            row["tokens_per_s"] = {n: case.tokens / statistics.median(v) for n, v in times.items()}
            if meter is not None:
                row["memory_mib"] = {n: meter.measure(case, n) for n in ("ours", "deepspeed")}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        ratio_text = ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
        print(f"[{time.perf_counter() - started:6.1f}s] {case.label}: {ratio_text}", flush=True)

    env = environment()
    env["loadavg_1min_before"], env["loadavg_1min_after"] = load_before, os.getloadavg()[0]
    env["glibc_malloc"] = {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")}
    report = {"environment": env, "rounds": rounds, "quick": args.quick, "rows": rows,
              "summary": summary(rows) if any(r["case"]["group"] != "path" for r in rows) else [],
              "wall_s": time.perf_counter() - started}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print()
    print(markdown_table(rows))
    if any(r["case"]["group"] == "path" for r in rows):
        print()
        print(path_table(rows))
    print()
    for line in report["summary"]:
        print("- " + line)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
