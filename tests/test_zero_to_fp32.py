"""``checkpoints/zero_to_fp32.py``: DeepSpeed's converter cannot read per-expert checkpoints, so ``commit`` replaces
it (and zero_to_torch.py) with a script that names the export command and exits 1. CPU, no launch: the checkpoint
is tests/fixtures/old_checkpoint/run (2 ranks, EP=2, ZeRO-2), copied; DeepSpeed's scripts are put in place as its
save_checkpoint does before our commit."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest

from recipe.checkpoint import (COMPLETE, DEEPSPEED_CONVERTERS, checkpoint_root, commit, consolidated_state_dict,
                               latest_tag, recorded_files, resume_problem)

RUN = Path(__file__).resolve().parent / "fixtures" / "old_checkpoint" / "run"
TAG = "step00000004"
DEEPSPEED_UTILS = Path(deepspeed.__file__).parent / "utils"


@pytest.fixture
def saved_run(tmp_path) -> Path:
    """A copy of the fixture run, its checkpoint committed again after DeepSpeed dropped its scripts in."""
    run = shutil.copytree(RUN, tmp_path / "run")
    for name in DEEPSPEED_CONVERTERS:
        shutil.copyfile(DEEPSPEED_UTILS / name, checkpoint_root(run) / name)
    commit(run, TAG, world_size=2, moe_layers=2, num_experts=4)
    return run


def test_deepspeeds_own_converter_fails_on_our_checkpoints(tmp_path):
    """Why the script is replaced (negative control): DeepSpeed's converter stops with a traceback."""
    run = shutil.copytree(RUN, tmp_path / "run")
    script = shutil.copyfile(DEEPSPEED_UTILS / "zero_to_fp32.py", checkpoint_root(run) / "zero_to_fp32.py")
    proc = subprocess.run([sys.executable, str(script), "checkpoints", str(tmp_path / "out")], cwd=run,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "is not a model state checkpoint" in proc.stderr


def test_the_users_reflex_meets_one_line_naming_the_export(saved_run, tmp_path):
    for name in DEEPSPEED_CONVERTERS:
        script = checkpoint_root(saved_run) / name
        assert "recipe.export" in script.read_text() and script.stat().st_mode & 0o111  # still executable
        proc = subprocess.run([sys.executable, f"checkpoints/{name}", "checkpoints", "out.pt"], cwd=saved_run,
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stdout == ""
        (line,) = proc.stderr.splitlines()
        assert f"python -m recipe.export --run_dir {saved_run} --format torch --out out.pt" in line
    command = line.split("run: ", 1)[1].split("  (")[0]  # what the line tells the user to run, run as told
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "recipe.export"]
    proc = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.pt").is_file()


def test_the_pointer_scripts_stay_out_of_what_resume_and_the_readers_check(saved_run):
    assert latest_tag(saved_run) == TAG
    listed = recorded_files(checkpoint_root(saved_run) / TAG)
    assert listed and not set(listed) & set(DEEPSPEED_CONVERTERS) and COMPLETE not in listed
    assert resume_problem(saved_run, TAG) is None
    state, _ = consolidated_state_dict(checkpoint_root(saved_run))
    assert any("experts" in key for key in state)
