"""Accelerator checks, run by `make gpu-check` (bench/gpu_check.py) and skipped where DeepSpeed's accelerator is
the CPU; plus, everywhere, the CPU side of that script: its no-GPU exit and its arithmetic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator

ROOT = Path(__file__).resolve().parents[1]
ACC = get_accelerator()
HAS_GPU = ACC.device_name() != "cpu" and ACC.is_available()
DEVICE = ACC.device_name(0) if HAS_GPU else "cpu"
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (DeepSpeed's accelerator is the CPU here)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def run_experts(grouped: bool, dtype: torch.dtype, weights, x, g, counts, index_N=None, weight_N=None):
    """Output and gradients (input, w1, w3, w2[, combine weight]) of SwiGLUExperts on one forced path."""
    from recipe.model.moe.experts import SwiGLUExperts, run_experts_indexed

    experts = SwiGLUExperts(counts.numel(), x.shape[1], weights[0].shape[1], use_grouped_mm=grouped).to(DEVICE)
    with torch.no_grad():
        for param, value in zip((experts.w1, experts.w3, experts.w2), weights):
            param.copy_(value)
    experts = experts.to(dtype)
    xi = x.detach().to(dtype, copy=True).requires_grad_(True)
    if index_N is None:
        y = experts(xi, counts)
        extra = []
    else:
        wi = weight_N.detach().to(dtype, copy=True).requires_grad_(True)
        y = run_experts_indexed(experts, xi, counts, index_N, wi)
        extra = [wi]
    y.backward(g.to(dtype))
    return [y, xi.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad] + [t.grad for t in extra]


@needs_gpu
@pytest.mark.parametrize("indexed", [False, True], ids=["blocks", "indexed"])
def test_grouped_gemm_matches_loop_in_bf16(indexed):
    """E=256 experts of width 64 (some without rows), bf16 on the GPU: torch._grouped_mm and the per-expert loop
    both stay within bf16 error of the fp32 loop on the same (bf16-rounded) weights and inputs, and of each other."""
    from recipe.model.moe.experts import grouped_mm_works

    experts_n, hidden, ffn, tokens, k = 256, 256, 64, 1024, 8
    if not grouped_mm_works(torch.device(DEVICE).type, torch.bfloat16, hidden, ffn):
        pytest.skip(f"torch._grouped_mm does not run in bf16 on {DEVICE} ({ACC.device_name()})")
    gen = torch.Generator().manual_seed(0)
    choice = torch.randint(0, experts_n, (tokens * k,), generator=gen)
    choice[choice % 7 == 3] = 0  # experts without rows
    counts = torch.bincount(choice, minlength=experts_n).to(DEVICE)

    def rounded(*shape):  # bf16-representable values, so every path starts from the same numbers
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).bfloat16().float().to(DEVICE)

    weights = [rounded(experts_n, ffn, hidden), rounded(experts_n, ffn, hidden), rounded(experts_n, hidden, ffn)]
    x, g = rounded(tokens if indexed else tokens * k, hidden), rounded(tokens if indexed else tokens * k, hidden)
    index_N = torch.randint(0, tokens, (tokens * k,), generator=gen).to(DEVICE) if indexed else None
    weight_N = torch.rand(tokens * k, generator=gen).bfloat16().float().to(DEVICE) if indexed else None
    reference = run_experts(False, torch.float32, weights, x, g, counts, index_N, weight_N)
    grouped = run_experts(True, torch.bfloat16, weights, x, g, counts, index_N, weight_N)
    loop = run_experts(False, torch.bfloat16, weights, x, g, counts, index_N, weight_N)
    for name, ref, a, b in zip(["output", "input", "w1", "w3", "w2", "weight"], reference, grouped, loop):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
        assert rel_err(a, ref) < 2e-2, (name, "grouped", rel_err(a, ref))
        assert rel_err(b, ref) < 2e-2, (name, "loop", rel_err(b, ref))
        assert rel_err(a, b) < 3e-2, (name, rel_err(a, b))
    empty = (counts == 0).nonzero().flatten()
    assert torch.count_nonzero(grouped[2][empty]) == 0  # experts without rows get zero weight gradients


@needs_gpu
def test_automatic_path_on_gpu_is_grouped_gemm_where_it_works():
    from recipe.model.moe.experts import grouped_mm_works, prefer_grouped_mm

    device_type = torch.device(DEVICE).type
    for dtype in (torch.bfloat16, torch.float32):
        assert prefer_grouped_mm(device_type, dtype, 256, 64) == grouped_mm_works(device_type, dtype, 256, 64)


@needs_gpu
@pytest.mark.parametrize("drop", [True, False], ids=["cf1.25", "dropless"])
def test_ours_matches_deepspeed_at_k8_on_gpu(drop):
    """k=8, E=64, fp32 on the GPU: ours ('probs', 'switch') and DeepSpeed's layer with the same weights agree."""
    from recipe.model.moe import DeepSpeedBaselineMoE, MoE

    torch.backends.cuda.matmul.allow_tf32 = False
    hidden, ffn, experts, k = 64, 32, 64, 8
    torch.manual_seed(0)
    ours = MoE(hidden, experts, k=k, capacity_factor=1.25, eval_capacity_factor=1.25, drop_tokens=drop,
               intermediate_size=ffn, capacity_priority="probs", balance_loss="switch",
               balance_over_data_parallel=False)
    theirs = DeepSpeedBaselineMoE(hidden, ffn, num_experts=experts, ep_size=1, k=k, capacity_factor=1.25,
                                  eval_capacity_factor=1.25, min_capacity=4, drop_tokens=drop, use_rts=False)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(512, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for layer in (ours.to(DEVICE), theirs.to(DEVICE)):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out.output.square().sum() + out.l_aux).backward()
        results.append((out.output, out.l_aux, xi.grad, layer.deepspeed_moe.gate.wg.weight.grad))
    for name, a, b in zip(["output", "l_aux", "input", "router"], *results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@needs_gpu
def test_finegrained_dropless_layer_in_bf16_on_gpu():
    """E=256, k=8, dropless, bf16 on the GPU (the automatic path): within bf16 error of the same layer in fp32."""
    from recipe.model.moe import MoE

    torch.manual_seed(0)
    layer = MoE(256, 256, k=8, drop_tokens=False, intermediate_size=64, balance_over_data_parallel=False).to(DEVICE)
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reference = layer(x).output
    out = layer.to(torch.bfloat16)(x.bfloat16())
    assert out.output.dtype == torch.bfloat16 and out.stats.num_pairs_kept == 2048 * 8
    assert rel_err(out.output, reference) < 3e-2
    out.output.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


# ---------------------------------------------------------------- bench/gpu_check.py on any machine


@pytest.mark.skipif(HAS_GPU, reason="checks the path taken without a GPU")
def test_gpu_check_without_gpu_says_so_and_exits_zero(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no GPU" in proc.stdout and not out.exists()


def test_peak_table_matches_device_names():
    from bench.gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Tesla T4") is None


def test_flop_counts():
    from bench.gpu_check import TRAIN_CONFIG, flops_per_token, useful_flops
    from bench.layer_bench import Case
    from recipe.config import load_config, parameter_counts

    config = load_config(ROOT / TRAIN_CONFIG)
    active = parameter_counts(config)["active"]
    assert 95e6 < active < 115e6  # "~100M active parameters"
    assert flops_per_token(config) == 6.0 * (active - 4096 * 1024) + 12.0 * 8 * 1024 * 1024
    case = Case("finegrained", 256, 128, 64, 4096, 8, 1.25)
    assert useful_flops(case, "experts_only") == 18.0 * 8 * 4096 * 256 * 128
    assert useful_flops(case, "ours") == useful_flops(case, "experts_only") + 6.0 * 4096 * 256 * 64


def test_training_speed_leaves_out_the_first_interval(tmp_path):
    from bench.gpu_check import measured_speed

    records = [{"step": 10, "loss": 9.0, "tokens_per_s": 100.0}, {"step": 20, "loss": 8.0, "tokens_per_s": 1000.0},
               {"step": 30, "loss": 7.0, "tokens_per_s": 3000.0}, {"step": 30, "val_loss": 7.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"tokens_seen": 30 * 600}))
    speed = measured_speed(tmp_path)
    # 6000 tokens at 1000/s and 6000 at 3000/s: 12000 tokens in 8 s
    assert speed["tokens_per_s"] == pytest.approx(1500.0) and speed["tokens_per_step"] == 600
    assert speed["first_loss"] == 9.0 and speed["final_loss"] == 7.0
