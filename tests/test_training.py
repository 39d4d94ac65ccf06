"""Training under the real deepspeed launcher (gloo on CPU): layout invariance, every ds_config, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, launch, read_metrics, train_layouts, write_config, write_ds_config

pytestmark = pytest.mark.multirank

DS_CONFIGS = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))


# Fine-grained routing as DeepSeek-V3 / Qwen3-MoE train it: 16 small experts, top-8, dropless, the all-choices
# loss and aux-loss-free bias balancing (a rate of the size of the tiny router's score differences, so that the
# bias changes routing within a few steps without flipping it wholesale every step).
FINE_GRAINED = dict(num_experts=16, moe_gate_k=8, moe_intermediate_size=16, moe_norm_topk_prob=True,
                    moe_balance_loss="switch", moe_bias_update_rate=0.002)
BIAS_KEY = "deepspeed_moe.gate.e_score_correction_bias"


def _final_biases(run_dir) -> dict:
    from recipe.checkpoint import checkpoint_root, consolidated_state_dict

    weights, _ = consolidated_state_dict(checkpoint_root(run_dir))
    return {key: value for key, value in weights.items() if key.endswith(BIAS_KEY)}


@pytest.mark.parametrize("routing", ["gshard_top2", "fine_grained_bias"])
def test_loss_and_grad_norm_do_not_depend_on_the_parallel_layout(tiny_data, tmp_path, routing):
    """Same global batch of 4 sequences, fp32, no token dropping: 1 rank (EP=1) vs 2 ranks (EP=2) vs
    4 ranks (EP=2 x expert-data-parallel 2) give the same per-step losses, gradient norms and expert loads,
    for the default top-2 routing and for top-8 of 16 with bias balancing (whose bias, updated from loads
    summed over ranks, must then be the same in every layout)."""
    model = dict(moe_drop_tokens=False, **(FINE_GRAINED if routing == "fine_grained_bias" else {}))
    config = write_config(tmp_path / "cfg.py", tiny_data, model=model, train=dict(steps=6),
                          loss=dict(moe_loss_coeff=0.1))
    layouts = {  # name: (ranks, micro batch, ep_size)
        "1rank_ep1": (1, 4, 1),
        "2rank_ep2": (2, 2, 2),
        "4rank_ep2": (4, 1, 2),
    }
    results = train_layouts(config, layouts, tmp_path)
    reference = results["1rank_ep1"]
    assert len(reference) == 6
    for name, records in results.items():
        for ref, rec in zip(reference, records, strict=True):
            assert rec["step"] == ref["step"]
            for key in ("loss", "lm_loss", "moe_loss", "grad_norm"):
                assert rec[key] == pytest.approx(ref[key], rel=1e-5), (name, rec["step"], key)
            for ref_layer, layer in zip(ref["moe"], rec["moe"]):
                assert layer["tokens_per_expert"] == ref_layer["tokens_per_expert"], (name, rec["step"])
    assert reference[-1]["lm_loss"] < reference[0]["lm_loss"]
    if routing == "fine_grained_bias":
        biases = {name: _final_biases(tmp_path / name) for name in layouts}
        assert len(biases["1rank_ep1"]) == 2 and all(b.abs().max() > 0 for b in biases["1rank_ep1"].values())
        for name, layer_biases in biases.items():
            for key, bias in layer_biases.items():
                torch.testing.assert_close(bias, biases["1rank_ep1"][key], rtol=0, atol=1e-6, msg=(name, key))


@pytest.mark.parametrize("ds_name", DS_CONFIGS)
def test_every_ds_config_trains(tiny_data, tmp_path, ds_name):
    from deepspeed.accelerator import get_accelerator

    raw = json.loads((ROOT / "ds_configs" / ds_name).read_text())
    ep_size = raw.get("moe_recipe", {}).get("ep_size", 1)
    tp_size = raw.get("tensor_parallel", {}).get("autotp_size", 1)
    config = write_config(tmp_path / "cfg.py", tiny_data)
    ds = write_ds_config(tmp_path / ds_name, base=ds_name)
    run_dir = tmp_path / "run"
    wants_fp16 = raw.get("fp16", {}).get("enabled", False)
    no_fp16 = wants_fp16 and not get_accelerator().is_fp16_supported()
    proc = launch(max(2, ep_size * tp_size), config, ds, run_dir, check=not no_fp16)
    if no_fp16:
        # No fp16 kernels on this accelerator: the recipe refuses up front, with the fix in the message.
        assert proc.returncode != 0
        assert "fp16 is not supported on this accelerator" in proc.stderr + proc.stdout
        assert not (run_dir / "metrics.jsonl").exists()
        return
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = "bfloat16" if raw.get("bf16", {}).get("enabled") else "float16" if wants_fp16 else "float32"
    assert summary["param_dtype"] == expected
    assert summary["ep_size"] == ep_size and summary["zero_stage"] == raw["zero_optimization"]["stage"]
    assert summary["tp_size"] == tp_size
    # The optimizer's fp32 masters are read back (export): they round to the weights. Not for bf16 without ZeRO:
    # with MoE layers the engine saves its optimizer as one expp_rank file, which recipe.reshard does not read.
    if expected == "bfloat16" and raw["zero_optimization"]["stage"] > 0:
        from recipe.checkpoint import checkpoint_root, consolidated_state_dict
        from recipe.reshard import master_state_dict

        weights, _ = consolidated_state_dict(checkpoint_root(run_dir))
        masters, _, from_master = master_state_dict(checkpoint_root(run_dir))
        assert from_master and masters.keys() == weights.keys()
        assert all(torch.equal(masters[k].to(weights[k].dtype), weights[k]) for k in weights)
        assert any(not torch.equal(masters[k], weights[k].float()) for k in weights)  # not just the weights upcast


def test_resume_is_exact_and_checkpoint_holds_one_file_per_expert(tiny_data, tmp_path):
    """3 steps, stop, resume, 3 more == 6 steps straight, bitwise in fp32 (2 ranks, EP=2, ZeRO-2)."""
    from recipe.checkpoint import consolidated_state_dict
    from recipe.generate import config_from_saved
    from recipe.model.transformer import TransformerLM

    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2},
                         scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 6, "warmup_num_steps": 2}})
    straight_cfg = write_config(tmp_path / "straight.py", tiny_data, train=dict(steps=6, save_every=3, eval_every=3))
    launch(2, straight_cfg, ds, tmp_path / "straight")
    first_cfg = write_config(tmp_path / "first.py", tiny_data, train=dict(steps=3, save_every=3, eval_every=3))
    launch(2, first_cfg, ds, tmp_path / "resumed")
    proc = launch(2, straight_cfg, ds, tmp_path / "resumed", "--resume")
    assert "resumed from step00000003" in proc.stdout

    straight, straight_eval = read_metrics(tmp_path / "straight")
    resumed, resumed_eval = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]
    assert [e["val_loss"] for e in straight_eval] == [e["val_loss"] for e in resumed_eval]

    # One file per expert per MoE layer, and identical final weights.
    tag_dir = tmp_path / "resumed" / "checkpoints" / "step00000006"
    expert_files = sorted(p.name for p in tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert expert_files == sorted(f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(4))
    state_a, client = consolidated_state_dict(tmp_path / "straight" / "checkpoints", "step00000006")
    state_b, _ = consolidated_state_dict(tmp_path / "resumed" / "checkpoints", "step00000006")
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    # The checkpoint of a 2-rank EP=2 run loads into a 1-process model and reproduces its eval loss.
    model = TransformerLM(config_from_saved(client["config"]), ep_size=1)
    model.load_state_dict(state_b)
    from recipe.data.loader import TokenDataset, eval_batches

    val = TokenDataset(tiny_data, "val")
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for rank in range(2):  # the run evaluated 2 batches per rank of micro batch 8
            for x, y in eval_batches(val, 16, 8, rank, 2, max_batches=2):
                out = model(x, y)
                total += out.lm_loss.item() * y.numel()
                count += y.numel()
    assert total / count == pytest.approx(resumed_eval[-1]["val_loss"], rel=1e-5)


def test_two_nodes_on_loopback(tiny_data, tmp_path):
    """Two launcher processes (2 nodes x 1 rank, no ssh) on 127.0.0.1 train together, EP=2."""
    import os
    import subprocess
    import sys
    import time

    from conftest import SAFETY_S, _free_port, _kill_group

    config = write_config(tmp_path / "cfg.py", tiny_data)
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2})
    port = str(_free_port())
    procs, logs = [], [tmp_path / f"node{node_rank}.log" for node_rank in range(2)]
    try:
        for node_rank, log in enumerate(logs):
            cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--nnodes", "2", "--node_rank", str(node_rank), "--nproc",
                   "1", "--master_addr", "127.0.0.1", "--master_port", port, "--config", str(config), "--ds_config",
                   str(ds), "--run_dir", str(tmp_path / "run"), "--python", sys.executable]
            # Output to files: a pipe read only after the other node's ends could fill up and stall both nodes.
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                              start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        deadline = time.monotonic() + SAFETY_S  # a safety net for a hang only: both launches' end is awaited
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the two launches were still running after {SAFETY_S} s (killed):\n"
                            + "\n".join(log.read_text()[-3000:] for log in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
    outputs = [log.read_text() for log in logs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    records, _ = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


def _reshard_and_continue(tmp_path, tiny_data, base: tuple, layouts: dict, steps=(3, 5),
                          model: dict | None = None) -> dict:
    """Train ``base`` = (ranks, micro, ep, ds file) for steps[0] steps, then copy the run into each of
    ``layouts`` (name -> the same tuple) and continue to steps[1] there (``--reshard`` unless the layout is
    the base's). ``model``: config changes. Returns name -> train records of the continuation."""
    import shutil

    model = dict(moe_drop_tokens=False, **(model or {}))
    config = write_config(tmp_path / "cfg.py", tiny_data, model=model, train=dict(steps=steps[0], save_every=steps[0]))
    longer = write_config(tmp_path / "longer.py", tiny_data, model=model,
                          train=dict(steps=steps[1], save_every=steps[1]))
    schedule = {"type": "WarmupCosineLR", "params": {"total_num_steps": steps[1], "warmup_num_steps": 1}}

    def ds_file(name, ranks, micro, ep, base_json):
        return write_ds_config(tmp_path / f"{name}.json", base=base_json, moe_recipe={"ep_size": ep},
                               train_micro_batch_size_per_gpu=micro, scheduler=schedule)

    launch(base[0], config, ds_file("base", *base), tmp_path / "base")
    continued = {}
    for name, layout in layouts.items():
        shutil.copytree(tmp_path / "base", tmp_path / name)
        extra = ["--resume"] + (["--reshard"] if layout[:3] != base[:3] else [])
        proc = launch(layout[0], longer, ds_file(name, *layout), tmp_path / name, *extra)
        if layout[:3] != base[:3]:
            assert "fp32 master weights, Adam moments" in proc.stdout, proc.stdout[-2000:]
        records, evals = read_metrics(tmp_path / name)
        continued[name] = [r for r in records if r["step"] > steps[0]]
        assert [r["step"] for r in continued[name]] == list(range(steps[0] + 1, steps[1] + 1))
        continued[name][-1]["val_loss"] = evals[-1]["val_loss"]  # the evaluation at the last step
    return continued


def test_reshard_carries_weights_and_optimizer_state_to_other_layouts(tiny_data, tmp_path):
    """A 2-rank EP=2 ZeRO-2 checkpoint resumed on 1 rank (EP=1), on 4 ranks (EP=4), and on 1 rank without
    ZeRO (plain torch optimizer) with --reshard: the next two steps equal those of resuming at the original
    layout. The second step's loss depends on the
    first update, i.e. on the carried fp32 master weights and Adam moments (restarted moments change it
    by far more than 1e-5)."""
    runs = _reshard_and_continue(tmp_path, tiny_data, (2, 4, 2, "zero2_fp32.json"), {
        "same": (2, 4, 2, "zero2_fp32.json"), "1rank_ep1": (1, 8, 1, "zero2_fp32.json"),
        "4rank_ep4": (4, 2, 4, "zero2_fp32.json"), "zero0_1rank": (1, 8, 1, "zero0_fp32.json")})
    for got, want in zip(runs["zero0_1rank"], runs["same"]):  # ZeRO partitions into a plain torch optimizer
        for key in ("loss", "lm_loss", "moe_loss"):  # which reports no global grad norm
            assert got[key] == pytest.approx(want[key], rel=1e-5), ("zero0_1rank", got["step"], key)
    for name in ("1rank_ep1", "4rank_ep4"):
        for got, want in zip(runs[name], runs["same"]):
            for key in ("loss", "lm_loss", "moe_loss", "grad_norm", "lr", "val_loss"):
                if key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-5), (name, got["step"], key)


def test_bias_balancing_survives_resume_and_reshard(tiny_data, tmp_path):
    """Bias balancing on: a 2-rank EP=2 run saved at step 3 and continued to step 5 by resuming (same layout)
    and by resharding onto 1 rank (EP=1) gives the steps 4-5 and the final bias of the same 5 steps run
    without a break. The bias moved (nonzero) and decides routing at top-8 of 16."""
    runs = _reshard_and_continue(tmp_path, tiny_data, (2, 4, 2, "zero2_fp32.json"), {
        "same": (2, 4, 2, "zero2_fp32.json"), "1rank_ep1": (1, 8, 1, "zero2_fp32.json")}, model=FINE_GRAINED)
    for got, want in zip(runs["1rank_ep1"], runs["same"], strict=True):
        for key in ("loss", "lm_loss", "moe_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), ("1rank_ep1", got["step"], key)
        for got_layer, want_layer in zip(got["moe"], want["moe"], strict=True):
            assert got_layer["tokens_per_expert"] == want_layer["tokens_per_expert"], got["step"]
    # Reference: the same 5 steps without a break (the helper left its config and JSON in tmp_path).
    launch(2, tmp_path / "longer.py", tmp_path / "same.json", tmp_path / "straight")
    straight_records, _ = read_metrics(tmp_path / "straight")
    for got, want in zip(runs["same"], straight_records[3:], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
    base, straight, same, resharded = (_final_biases(tmp_path / name)
                                       for name in ("base", "straight", "same", "1rank_ep1"))
    assert base and all(bias.abs().max() > 0 for bias in base.values())
    assert any(not torch.equal(bias, base[key]) for key, bias in straight.items())  # it kept moving after step 3
    for key, bias in straight.items():
        torch.testing.assert_close(same[key], bias, rtol=0, atol=1e-6)
        torch.testing.assert_close(resharded[key], bias, rtol=0, atol=1e-6)


def test_reshard_across_zero_stages_and_optimizer_formats(tiny_data, tmp_path):
    """Plain torch optimizer state (ZeRO-0, one file per expert-parallel rank) into ZeRO-1 partitions at
    another layout (the reverse direction is in the test above)."""
    runs = _reshard_and_continue(tmp_path, tiny_data, (4, 2, 2, "zero0_fp32.json"), {
        "same": (4, 2, 2, "zero0_fp32.json"), "zero1_2rank_ep1": (2, 4, 1, "zero1_fp32.json")})
    for got, want in zip(runs["zero1_2rank_ep1"], runs["same"]):
        for key in ("loss", "lm_loss", "moe_loss"):  # a plain torch optimizer reports no global grad norm
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)


def test_bf16_master_weights_travel_with_reshard_and_export(tiny_data, tmp_path):
    """bf16: the fp32 master weights, not the bf16 module copies, are what --reshard and export carry. They
    round to the checkpoint's bf16 weights, yet hold more precision than them."""
    from recipe.checkpoint import checkpoint_root, consolidated_state_dict
    from recipe.export import main as export_main

    # DeepSpeed's warmup schedules run the first two steps at lr 0: three steps, so the weights move.
    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=3, save_every=3))
    longer = write_config(tmp_path / "longer.py", tiny_data,  # 4 steps: the "auto" schedule stretches on purpose
                          train=dict(steps=4, save_every=4, lr_schedule_on_resume="stretch"))
    launch(2, config, write_ds_config(tmp_path / "ep2.json", base="zero1_bf16.json", moe_recipe={"ep_size": 2}),
           tmp_path / "run")
    bf16_weights, _ = consolidated_state_dict(checkpoint_root(tmp_path / "run"))
    assert export_main(["--run_dir", str(tmp_path / "run"), "--format", "torch", "--out", str(tmp_path / "m.pt")]) == 0
    exported = torch.load(tmp_path / "m.pt", weights_only=False)["model"]
    assert set(exported) == set(bf16_weights)
    trained = [k for k in exported if not k.endswith("norm.weight")]
    assert all(exported[k].dtype == torch.float32 for k in exported)
    assert all(torch.equal(exported[k].to(torch.bfloat16), bf16_weights[k]) for k in exported)
    assert sum(not torch.equal(exported[k], bf16_weights[k].float()) for k in trained) == len(trained)

    ds1 = write_ds_config(tmp_path / "ep1.json", base="zero1_bf16.json", moe_recipe={"ep_size": 1},
                          train_micro_batch_size_per_gpu=16)
    proc = launch(1, longer, ds1, tmp_path / "run", "--resume", "--reshard")
    assert "fp32 master weights, Adam moments" in proc.stdout
    records, _ = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 4 and math.isfinite(records[-1]["loss"])


def test_resume_at_another_layout_without_reshard_is_refused(tiny_data, tmp_path):
    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=2))
    launch(2, config, write_ds_config(tmp_path / "ep2.json", moe_recipe={"ep_size": 2}), tmp_path / "run")
    ds1 = write_ds_config(tmp_path / "ep1.json", moe_recipe={"ep_size": 1})
    proc = launch(1, config, ds1, tmp_path / "run", "--resume", check=False)
    assert proc.returncode != 0
    said = proc.stderr + proc.stdout
    assert "saved with 2 ranks, ep_size 2 and TP 1" in said and "--reshard" in said
    proc = launch(1, config, ds1, tmp_path / "run", "--resume", "--reshard", check=False)
    assert proc.returncode != 0 and "global micro-batch must stay 16" in proc.stderr + proc.stdout
    # Same ranks and ep_size, another ZeRO stage: DeepSpeed's loader cannot read the other stage's shards.
    zero1 = write_ds_config(tmp_path / "zero1.json", base="zero1_fp32.json", moe_recipe={"ep_size": 2})
    proc = launch(2, config, zero1, tmp_path / "run", "--resume", check=False)
    assert proc.returncode != 0
    assert "(ZeRO-2 fp32), this launch has 2 ranks, ep_size 2 and TP 1 (ZeRO-1 fp32)" in proc.stderr
