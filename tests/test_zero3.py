"""ZeRO-3 with MoE and expert parallelism (``ShardedMoE``): 4 ranks, EP=2 (expert-data-parallel groups of 2),
fp32, gradient clipping firing at every step, equal to ZeRO-2 on the same ranks; a negative control without the
placement tags; a bitwise resume; the checkpoint in the recipe's per-expert layout (export and generate read it);
--reshard from and to ZeRO-3 continuing equal; recipe.memory's estimate against the live engines of both stages.

One module-scoped set of launches serves every assertion (each launch is 30-60 s on the 2-core machine)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clipped_ds_json, copy_at_step, launch, read_metrics, run_on_ranks, write_config

pytestmark = pytest.mark.multirank

STEPS = 4


def _launch_untagged(config, ds, run_dir):
    """The trainer with the placement tags left off (tests/zero3_untagged.py)."""
    run_on_ranks(4, "--module", "tests.zero3_untagged", "--config", str(config), "--ds_config", str(ds),
                    "--run_dir", str(run_dir))


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    # Width 30 over 3 heads: the norms' 30 values do not split evenly over 4 ranks (ZeRO-3 pads the last partition).
    # Dropless: the resharded runs route their tokens on 2 ranks as the source did on 4 (a capacity is per rank).
    config = write_config(tmp / "cfg.py", tiny_data, model=dict(hidden_size=30, num_attention_heads=3,
                                                                moe_drop_tokens=False),
                          train=dict(steps=STEPS, save_every=2, eval_every=STEPS))
    zero2 = clipped_ds_json(tmp / "zero2.json", "zero2_fp32_ep2.json")
    # Threshold 0: every parameter is partitioned (the tiny model's would all stay whole under the default 1e5).
    zero3 = clipped_ds_json(tmp / "zero3.json", "zero3_fp32_ep2.json", stage3_param_persistence_threshold=0)
    launch(4, config, zero2, tmp / "zero2")
    launch(4, config, zero3, tmp / "zero3")
    _launch_untagged(config, zero3, tmp / "untagged")
    # Resume the ZeRO-3 run from its step-2 checkpoint in a copy holding only that one.
    proc = launch(4, config, zero3, copy_at_step(tmp / "zero3", tmp / "resumed", 2, STEPS), "--resume")
    assert "resumed from step00000002" in proc.stdout
    # --reshard from step 2: ZeRO-3 on 4 ranks into ZeRO-2 on 2 (same global batch), and ZeRO-2 into ZeRO-3.
    zero2_on_2 = clipped_ds_json(tmp / "zero2_2ranks.json", "zero2_fp32_ep2.json", train_micro_batch_size_per_gpu=4)
    _reshard(tmp / "zero3", tmp / "to_zero2", config, zero2_on_2, nproc=2)
    _reshard(tmp / "zero2", tmp / "to_zero3", config, zero3, nproc=4)
    _memory_check(config, [zero2, zero3], tmp / "memory.json")
    return tmp


def _memory_check(config, ds_configs, out) -> None:
    """bench/memory_check.py: every rank's live engine measured beside recipe.memory's estimate, one launch."""
    run_on_ranks(4, str(ROOT / "bench" / "memory_check.py"), "--config", str(config), "--ds_config",
                    *map(str, ds_configs), "--out", str(out))


def _reshard(source, run_dir, config, ds, nproc: int) -> None:
    """``source`` resumed from its step-2 checkpoint with --reshard at another layout, in ``run_dir``."""
    proc = launch(nproc, config, ds, copy_at_step(source, run_dir, 2, STEPS), "--resume", "--reshard")
    assert "fp32 master weights, Adam moments" in proc.stdout, proc.stdout[-2000:]


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_zero3_equals_zero2_with_clipping(runs):
    zero2, _ = read_metrics(runs / "zero2")
    zero3, _ = read_metrics(runs / "zero3")
    assert [r["step"] for r in zero3] == list(range(1, STEPS + 1))
    for a, b in zip(zero3, zero2, strict=True):
        assert b["grad_norm"] > 0.05  # clipping scaled this step's update
        assert _relative(a["loss"], b["loss"]) < 1e-6, (a, b)
        assert _relative(a["grad_norm"], b["grad_norm"]) < 1e-6, (a, b)


def test_without_the_placement_tags_the_run_differs(runs):
    """The negative control: the same launch with the tags off trains something else (experts mixed across
    expert-parallel ranks), so the equality above is evidence."""
    zero2, _ = read_metrics(runs / "zero2")
    untagged, _ = read_metrics(runs / "untagged")
    gaps = [max(_relative(a["loss"], b["loss"]), _relative(a["grad_norm"], b["grad_norm"]))
            for a, b in zip(untagged, zero2, strict=True)]
    assert max(gaps) > 1e-5, gaps


def _zero3_optimizer_state(run_dir, rank: int) -> dict:
    path = run_dir / "checkpoints" / f"step{STEPS:08d}" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]


def test_experts_are_partitioned_over_their_expert_data_parallel_group(runs):
    """ZeRO-3's own record of each optimizer sub-group: experts over the 2 ranks holding the same experts
    (ranks 0 and 2 hold experts 0-1 of every layer, ranks 1 and 3 experts 2-3), dense weights over all 4."""
    for rank in range(4):
        table = _zero3_optimizer_state(runs / "zero3", rank)["ds_zero_partition_groups"]
        experts = [g for g in table if g["families"] == ["autoep_expert"]]
        dense = [g for g in table if g["families"] != ["autoep_expert"]]
        assert len(experts) == 1 and experts[0]["partition_ranks"] == [rank % 2, rank % 2 + 2], table
        assert dense and all(g["partition_ranks"] == [0, 1, 2, 3] for g in dense), table
    # The control: one placement for every parameter (no table), over all 4 ranks.
    untagged = _zero3_optimizer_state(runs / "untagged", 0)
    assert "ds_zero_partition_groups" not in untagged and untagged["partition_count"] == 4


def test_zero3_resume_is_bitwise(runs):
    straight, straight_eval = read_metrics(runs / "zero3")
    resumed, resumed_eval = read_metrics(runs / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    assert [e["val_loss"] for e in straight_eval] == [e["val_loss"] for e in resumed_eval]


def test_zero3_checkpoint_has_the_per_expert_layout_and_exports(runs):
    """The ZeRO-3 checkpoint holds the same files as ZeRO-2's (dense weights in mp_rank_00, one file per expert,
    written from gathered weights) with the same values, the resumed run's final weights are the straight
    run's bit for bit, and recipe.export reads it."""
    from recipe.checkpoint import consolidated_state_dict

    tag = f"step{STEPS:08d}"
    state2, _ = consolidated_state_dict(runs / "zero2" / "checkpoints", tag)
    state3, client = consolidated_state_dict(runs / "zero3" / "checkpoints", tag)
    resumed, _ = consolidated_state_dict(runs / "resumed" / "checkpoints", tag)
    assert state3.keys() == state2.keys() == resumed.keys()
    assert all(state3[k].shape == state2[k].shape for k in state2)
    assert max((state3[k] - state2[k]).abs().max().item() for k in state2) < 1e-6
    assert all(torch.equal(state3[k], resumed[k]) for k in state3)
    assert client["lr_scheduler"] is None and client["step"] == STEPS
    out = runs / "export.pt"
    proc = subprocess.run([sys.executable, "-m", "recipe.export", "--run_dir", str(runs / "zero3"), "--format",
                           "torch", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(out, weights_only=False)["model"]
    assert all(torch.equal(exported[k], state3[k]) for k in state3)
    proc = subprocess.run([sys.executable, "-m", "recipe.generate", "--run_dir", str(runs / "zero3"),
                           "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "sample" in proc.stdout, proc.stderr


@pytest.mark.parametrize("resharded,reference", [("to_zero2", "zero3"), ("to_zero3", "zero2")])
def test_reshard_between_zero3_and_zero2_continues_equal(runs, resharded, reference):
    """Weights, fp32 masters, Adam moments, data position and schedule carried: the resharded run's steps 3-4 are
    the source layout's (fp32; the reduction order differs between layouts)."""
    source, _ = read_metrics(runs / reference)
    moved, _ = read_metrics(runs / resharded)
    assert [r["step"] for r in moved] == list(range(1, STEPS + 1))
    for a, b in zip(moved[2:], source[2:], strict=True):
        assert _relative(a["loss"], b["loss"]) < 1e-5, (a, b)
        assert _relative(a["grad_norm"], b["grad_norm"]) < 1e-5, (a, b)


def test_memory_estimate_matches_the_engines_and_zero3_partitions_what_zero2_keeps_whole(runs):
    """recipe.memory's per-rank estimate against what each rank's engine holds (parameters, gradients, optimizer
    state), within 10%, at ZeRO-2 and ZeRO-3; and the measured ZeRO-3 parameters are ZeRO-2's split 4 ways (dense)
    and 2 ways (experts, over their expert-data-parallel group), so the estimate is compared where they differ."""
    rows = json.loads((runs / "memory.json").read_text())
    assert sorted((r["zero_stage"], r["rank"]) for r in rows) == [(s, r) for s in (2, 3) for r in range(4)]
    for row in rows:
        for field, measured in row["measured"].items():
            assert measured > 0 and abs(row["estimated"][field] - measured) <= 0.1 * measured, (row, field)
    by_stage = {(r["zero_stage"], r["rank"]): r["measured"] for r in rows}
    for rank in range(4):
        zero2, zero3 = by_stage[(2, rank)], by_stage[(3, rank)]
        assert zero3["dense_params"] <= zero2["dense_params"] / 4 * 1.01, rank  # + ZeRO-3's per-parameter padding
        assert zero3["expert_params"] == zero2["expert_params"] / 2, rank
