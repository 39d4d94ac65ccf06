"""Tensor parallelism (TP): TP2 x EP2 on 4 ranks equals TP1 x EP2 on 2 ranks, step by step, with gradient clipping
firing; the checkpoint is per TP rank (mp_rank_00 / 01, each half of every cut weight) and joins back to the
reference's weights (export, generate); a same-layout resume is bitwise; --reshard TP2 -> TP1 and TP1 -> TP2 continue
equal. The model covers what TP cuts: GQA attention with per-head q/k norm and q/k/v bias, a dense FFN block, an MoE
block with a shared expert. The expert-TP layer against the full layer and the group-order guard run in one 2-rank
script (tests/tp_layer_check.py).

One module-scoped set of launches serves every assertion."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clipped_ds_json, copy_at_step, launch, read_metrics, run_on_ranks, write_config

pytestmark = pytest.mark.multirank

STEPS = 4
MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, moe_layer_freq=2,
             moe_intermediate_size=24, moe_num_shared_experts=1, qk_norm="head", qkv_bias=True,
             moe_drop_tokens=False)  # dropless: a capacity is per rank, and TP peers route the same tokens


def _ds(path, tp_size: int):
    raw = json.loads(clipped_ds_json(path, "zero1_fp32_tp2_ep2.json").read_text())
    if tp_size == 1:
        del raw["tensor_parallel"]
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    config = write_config(tmp / "cfg.py", tiny_data, model=MODEL, train=dict(steps=STEPS, save_every=2,
                                                                             eval_every=STEPS))
    tp1, tp2 = _ds(tmp / "tp1.json", 1), _ds(tmp / "tp2.json", 2)  # EP 2 and a global batch of 4 in both
    launch(2, config, tp1, tmp / "tp1")
    proc = launch(4, config, tp2, tmp / "tp2")
    assert "4 ranks, ep_size 2, TP 2, ZeRO-1 fp32" in proc.stdout
    proc = launch(4, config, tp2, copy_at_step(tmp / "tp2", tmp / "resumed", 2, STEPS), "--resume")
    assert "resumed from step00000002" in proc.stdout
    for source, target, nproc, ds in (("tp2", "to_tp1", 2, tp1), ("tp1", "to_tp2", 4, tp2)):
        proc = launch(nproc, config, ds, copy_at_step(tmp / source, tmp / target, 2, STEPS), "--resume", "--reshard")
        assert "fp32 master weights, Adam moments" in proc.stdout, proc.stdout[-2000:]
    run_on_ranks(2, str(ROOT / "tests" / "tp_layer_check.py"), str(tmp / "layer"))
    run_on_ranks(4, str(ROOT / "bench" / "memory_check.py"), "--config", str(config), "--ds_config", str(tp2),
                 "--out", str(tmp / "memory.json"))
    return tmp


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _assert_same_steps(run, reference, first_step: int = 1) -> None:
    records = [r for r in read_metrics(run)[0] if r["step"] >= first_step]
    expected = [r for r in read_metrics(reference)[0] if r["step"] >= first_step]
    assert [r["step"] for r in records] == list(range(first_step, STEPS + 1))
    for a, b in zip(records, expected, strict=True):
        assert b["grad_norm"] > 0.05  # clipping scaled this step's update
        for key in ("loss", "lm_loss", "moe_loss", "grad_norm"):
            assert _relative(a[key], b[key]) < 1e-5, (a["step"], key, a[key], b[key])


def test_tp2_ep2_on_4_ranks_equals_tp1_ep2_on_2(runs):
    _assert_same_steps(runs / "tp2", runs / "tp1")


def test_the_checkpoint_is_per_tp_rank_and_joins_to_the_reference_weights(runs):
    """mp_rank_00 / 01 each hold half of every cut weight (the negative control of the equality above: TP was on),
    and the consolidated reader joins them into the weights the TP1 run trained."""
    from recipe.checkpoint import checkpoint_root, consolidated_state_dict

    folder = checkpoint_root(runs / "tp2") / f"step{STEPS:08d}"
    halves = [torch.load(folder / f"mp_rank_0{t}_model_states.pt", weights_only=False)["module"] for t in (0, 1)]
    assert halves[0]["blocks.0.attention.wqkv.weight"].shape == (32, 32)  # of (4 + 2 + 2) heads x 8 = 64 rows
    assert halves[0]["blocks.0.attention.wo.weight"].shape == (32, 16)
    expert = torch.load(folder / "layer_0_expert_3_mp_rank_01_model_states.pt", weights_only=False)
    assert {tuple(v.shape) for v in expert.values()} == {(12, 32), (32, 12)}  # F 24 over 2
    joined, _ = consolidated_state_dict(checkpoint_root(runs / "tp2"))
    reference, _ = consolidated_state_dict(checkpoint_root(runs / "tp1"))
    assert joined.keys() == reference.keys()
    for key, value in reference.items():  # 4 Adam steps from gradients equal to ~1e-7
        torch.testing.assert_close(joined[key], value, rtol=0, atol=1e-4, msg=key)


def test_export_and_generate_read_a_tp_run(runs, tmp_path):
    out = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-m", "recipe.export", "--run_dir", str(runs / "tp2"), "--format", "torch",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    exported = torch.load(out, weights_only=False)["model"]
    assert exported["blocks.0.attention.wqkv.weight"].shape == (64, 32)
    proc = subprocess.run([sys.executable, "-m", "recipe.generate", "--run_dir", str(runs / "tp2"), "--prompt",
                           "the nation", "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "sample" in proc.stdout, proc.stderr[-2000:]


def test_resume_at_the_same_tp_layout_is_bitwise(runs):
    resumed = {r["step"]: r for r in read_metrics(runs / "resumed")[0]}
    for record in read_metrics(runs / "tp2")[0]:
        assert (resumed[record["step"]]["loss"], resumed[record["step"]]["grad_norm"]) == \
            (record["loss"], record["grad_norm"])


def test_reshard_between_tp_sizes_continues_equal(runs):
    _assert_same_steps(runs / "to_tp1", runs / "tp2", first_step=3)
    _assert_same_steps(runs / "to_tp2", runs / "tp1", first_step=3)


def test_expert_tp_layer_equals_the_full_layer(runs):
    """Output and every gradient within 1e-6 on both TP ranks; without f on the combine weights the router's
    gradient misses the other rank's share (the negative control)."""
    for rank in (0, 1):
        result = json.loads((runs / f"layer.{rank}.json").read_text())
        assert result["dispatcher"] == "TensorParallelExperts"
        for key in ("output", "input_grad", "router_grad", "w1_grad", "w3_grad", "w2_grad"):
            assert result[key] < 1e-6, (rank, key, result[key])
        assert result["control"]["router_grad"] > 0.1 * result["router_grad_size"]


def test_expert_groups_made_before_the_tp_mesh_are_refused(runs):
    result = json.loads((runs / "layer.0.json").read_text())
    assert "were made before the tensor-parallel mesh" in result["mesh_after_expert_groups"]
    assert "were made before the TP 2 mesh" in result["engine_after_expert_groups"]


def test_memory_estimate_matches_the_tp_engines(runs):
    """recipe.memory's per-rank estimate at TP 2 against what each rank's live engine holds (parameters, gradients,
    optimizer state), within 10%; the experts are half as wide as without TP (F 24 over 2: 12)."""
    rows = json.loads((runs / "memory.json").read_text())
    assert sorted((r["tp_size"], r["rank"]) for r in rows) == [(2, r) for r in range(4)]
    for row in rows:
        for field, measured in row["measured"].items():
            assert measured > 0 and abs(row["estimated"][field] - measured) <= 0.1 * measured, (row, field)
        assert row["measured"]["expert_params"] == 2 * 3 * 32 * 12 * 4  # 2 local experts, w1 w3 w2, fp32
