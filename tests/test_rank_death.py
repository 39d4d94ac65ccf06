"""One rank dies (SIGKILL) in a 2-rank launch: the whole launch ends with a non-zero exit and one line from
launch/train.sh naming the newest complete checkpoint, which then resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import (ROOT, SAFETY_S, _free_port, background_launch, launch, logged_steps, rank_pid, read_metrics,
                      wait_until, write_config, write_ds_config)
from recipe.checkpoint import checkpoint_root, consolidated_state_dict, latest_tag, resume_problem

pytestmark = pytest.mark.multirank


def test_a_killed_rank_ends_the_launch_and_the_newest_checkpoint_resumes(tiny_data, tmp_path):
    # A step budget no machine runs through while the test waits for its checkpoint (of the trainer, only the
    # LR schedule's "auto" length and a log line follow it).
    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=10**9, save_every=2, keep_last=2))
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2})
    run_dir = tmp_path / "run"
    port = str(_free_port())
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--nproc", "2", "--config", str(config), "--ds_config", str(ds),
           "--run_dir", str(run_dir), "--python", sys.executable]
    out_path, err_path = tmp_path / "launch.out", tmp_path / "launch.err"
    with background_launch(cmd, port, out_path, err_path, env={"MASTER_PORT": port}) as proc:
        # Wait for a committed checkpoint and a step after it (start-up time varies with the machine's load).
        wait_until(proc, lambda: latest_tag(run_dir) is not None and logged_steps(run_dir) >= 3,
                   "checkpoint and 3 logged steps", err_path)
        rank1 = rank_pid(proc.pid, 1)
        try:
            os.kill(rank1, signal.SIGKILL)
        except ProcessLookupError:  # with this budget a rank only ends by failing
            pytest.fail(f"rank 1 ended by itself before the kill:\n{err_path.read_text()[-3000:]}")
        try:
            proc.wait(timeout=SAFETY_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launch did not end within {SAFETY_S} s after one of its ranks was killed")
    err = err_path.read_text()
    assert proc.returncode != 0
    tag = latest_tag(run_dir)
    lines = [line for line in err.splitlines() if line.startswith("launch/train.sh: training failed")]
    assert len(lines) == 1 and f"newest complete checkpoint: {tag};" in lines[0] and "--resume" in lines[0], err[-3000:]

    # The newest complete checkpoint is whole and resumes for one more step.
    assert resume_problem(run_dir, tag) is None
    consolidated_state_dict(checkpoint_root(run_dir), tag)
    step = int(tag.removeprefix("step"))
    proc = launch(2, config, ds, run_dir, "--resume", "--set", f"train.steps={step + 1}",
                  "--set", "train.lr_schedule_on_resume=keep")
    assert f"resumed from {tag}" in proc.stdout
    records, _ = read_metrics(run_dir)
    assert records[-1]["step"] == step + 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 1
