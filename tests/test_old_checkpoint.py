"""A checkpoint written before the trainer rebuild (tests/fixtures/old_checkpoint, made by
tests/fixtures/make_old_checkpoint.py at commit e68e0e5) still resumes, and continues bit for bit.

The fixture holds a 4-step run (2 ranks, EP=2, ZeRO-2 fp32) saved at steps 2 and 4 and its metrics.
Step 4 is removed here; resuming from step 2 must reproduce the recorded steps 3 and 4 exactly (losses,
gradient norms) and end on the saved step-4 weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch, read_metrics, write_config, write_ds_config
from recipe.checkpoint import checkpoint_root, consolidated_state_dict, latest_tag

pytestmark = pytest.mark.multirank

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_checkpoint"
TRAIN = dict(steps=4, save_every=2, keep_last=2, log_every=1, eval_every=1000)  # as make_old_checkpoint.py
COMPARED = ("loss", "lm_loss", "moe_loss", "z_loss", "grad_norm", "skipped_steps")


def test_checkpoint_of_the_old_trainer_resumes_bit_exactly(tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(FIXTURE / "data", data)
    shutil.copytree(FIXTURE / "run", run_dir)
    recorded, _ = read_metrics(FIXTURE / "run")
    saved_final, _ = consolidated_state_dict(checkpoint_root(FIXTURE / "run"), "step00000004")
    shutil.rmtree(checkpoint_root(run_dir) / "step00000004")
    (checkpoint_root(run_dir) / "latest").write_text("step00000002")
    assert latest_tag(run_dir) == "step00000002"

    config = write_config(tmp_path / "cfg.py", data, train=TRAIN)
    ds = write_ds_config(tmp_path / "ds.json", base="zero2_fp32_ep2.json")
    proc = launch(2, config, ds, run_dir, "--resume")
    assert "resumed from step00000002 (step 2)" in proc.stdout

    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for new, old in zip(records[2:], recorded[2:]):
        assert {k: new[k] for k in COMPARED} == {k: old[k] for k in COMPARED}, new["step"]
    # The old trainer logged the rate the *next* step would use; the rates the resumed steps ran at are the ones
    # it logged a step earlier.
    assert [r["lr"] for r in records[2:]] == [r["lr"] for r in recorded[1:3]]
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == \
        json.loads((FIXTURE / "run" / "summary.json").read_text())["val_loss"]
    final, _ = consolidated_state_dict(checkpoint_root(run_dir), "step00000004")
    assert final.keys() == saved_final.keys()
    for key, value in saved_final.items():
        assert torch.equal(final[key], value), key
    # Negative control: the resumed run did move the weights (step 2 differs from step 4).
    start, _ = consolidated_state_dict(checkpoint_root(run_dir), "step00000002")
    assert any(not torch.equal(start[key], value) for key, value in saved_final.items())
