"""Profile one forward+backward of ``recipe.model.moe.MoE`` on CPU and print the top ops by self time.

    .venv/bin/python -m bench.profile_layer                      # M=256 E=8 S=4096 k=2 cf=1.25 fp32
    .venv/bin/python -m bench.profile_layer --grouped-mm off     # force the per-expert loop
    .venv/bin/python -m bench.profile_layer --dtype bf16 --tokens 1024 --rows 30

The layer is warmed up first (two untimed calls), then one call runs under ``torch.profiler``.
``--trace FILE`` also writes a Chrome trace (open in chrome://tracing or Perfetto).
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.layer_bench import DTYPES, make_ours, set_grouped_mm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="M")
    parser.add_argument("--ffn", type=int, default=688, help="F, per-expert hidden width")
    parser.add_argument("--experts", type=int, default=8, help="E")
    parser.add_argument("--tokens", type=int, default=4096, help="S")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--cf", type=float, default=1.25)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--grouped-mm", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="ops to print")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    layer = make_ours(args.hidden, args.ffn, args.experts, args.k, args.cf, dtype)
    set_grouped_mm(layer, args.grouped_mm)
    x = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.hidden, dtype=dtype)

    def step() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        out = layer(x)
        torch.autograd.backward((out.output, out.l_aux), (grad, torch.tensor(0.01)))

    for _ in range(2):
        step()
    start = time.perf_counter()
    step()
    plain_ms = 1e3 * (time.perf_counter() - start)

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        step()
    print(
        f"MoE fwd+bwd  M={args.hidden} F={args.ffn} E={args.experts} S={args.tokens} k={args.k} cf={args.cf} "
        f"{args.dtype} grouped_mm={args.grouped_mm} threads={args.threads}: {plain_ms:.1f} ms unprofiled"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
