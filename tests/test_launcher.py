"""launch/train.sh and recipe/launcher.py: the --help text, DeepSpeed's launcher chatter hidden (MOE_RECIPE_DS_LOG=info
brings it back), and the one line of advice after a failed launch."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (ROOT, SAFETY_S, _free_port, background_launch, logged_steps, rank_pid, run_to_end, wait_until,
                      write_config, write_ds_config)
from recipe.launcher import (RunState, failure_advice, launcher_level, main as launcher_main, run_state,
                             trainer_args)

TRAIN_SH = ROOT / "launch" / "train.sh"
# What DeepSpeed's runner and launch.py log at INFO (and the accelerator warning on a CPU box): one pattern per line.
LAUNCHER_CHATTER = ("cmd = ", "WORLD INFO DICT", "nnodes=", "global_rank_mapping=", "dist_world_size=",
                    "Setting CUDA_VISIBLE_DEVICES", "spawned with command", "Setting accelerator to CPU",
                    "Unable to find hostfile", "exits successfully")
SHOWN_ON_ANY_BOX = ("cmd = ", "WORLD INFO DICT", "spawned with command")  # with a GPU as without


def test_help_prints_the_marked_usage_block_and_no_shell_code():
    proc = subprocess.run(["bash", str(TRAIN_SH), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = TRAIN_SH.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- help:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# ---- end of help"))
    assert proc.stdout.splitlines() == [re.sub(r"^# ?", "", line) for line in lines[start + 1:end]]
    for option in ("--nproc", "--config", "--ds_config", "--run_dir", "--hostfile", "--nnodes", "--node_rank",
                   "--master_addr", "--master_port", "--python", "MOE_RECIPE_DS_LOG"):
        assert option in proc.stdout, option
    for shell in ("set -euo", 'cd "$(dirname', "NPROC=${", "esac", "exec ", "$("):
        assert shell not in proc.stdout, shell


def test_launcher_level_follows_moe_recipe_ds_log():
    assert launcher_level({}) == "error"
    assert launcher_level({"MOE_RECIPE_DS_LOG": "INFO"}) == "info"
    assert launcher_level({"MOE_RECIPE_DS_LOG": "warn"}) == "warning"
    with pytest.raises(ValueError, match="MOE_RECIPE_DS_LOG='loud' is not a log level; use one of debug, info"):
        launcher_level({"MOE_RECIPE_DS_LOG": "loud"})


def test_a_bad_log_level_is_one_line_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setenv("MOE_RECIPE_DS_LOG", "loud")
    assert launcher_main(["runner", "--num_gpus", "1", "--module", "recipe.train"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_trainer_args_resolve_the_run_folder_as_the_trainer_does(tmp_path):
    config = write_config(tmp_path / "cfg.py", tmp_path / "data", train=dict(run_dir=str(tmp_path / "from_config")))
    assert trainer_args(["--config", str(config)]) == trainer_args(["--config", str(config), "--local_rank=0"])
    assert trainer_args(["--config", str(config)]).run_dir == tmp_path / "from_config"
    flags = trainer_args(["--config", str(config), "--run_dir", "a", "--set", "train.run_dir='b'", "--run_dir", "c"])
    assert flags.run_dir == Path("c") and not flags.resume
    assert trainer_args(["--config", str(config), "--set", "train.resume=True"]).resume
    broken = trainer_args(["--config", str(tmp_path / "missing.py"), "--run_dir", "d", "--resume"])
    assert broken.run_dir == Path("d") and broken.resume


def _commit_checkpoint(run_dir: Path, tag: str) -> None:
    (run_dir / "checkpoints" / tag).mkdir(parents=True)
    (run_dir / "checkpoints" / tag / "COMPLETE").write_text(f"{tag}\n")


def test_failure_advice_tells_apart_before_training_no_checkpoint_and_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    never = run_state(run_dir)
    assert never == RunState(metrics=None, newest_tag=None, interrupted_saves=())
    before_start = failure_advice(1, never, run_state(run_dir), resumed=False, run_dir=run_dir)
    assert before_start == "launch/train.sh: failed before training started (exit 1): see the error above"

    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    logged = run_state(run_dir)
    nothing_saved = failure_advice(247, never, logged, resumed=False, run_dir=run_dir)
    assert "training failed (exit 247) before its first checkpoint: nothing was saved" in nothing_saved
    assert "run the same command again" in nothing_saved and "--resume" not in nothing_saved

    (run_dir / "checkpoints" / "step00000002").mkdir(parents=True)  # killed while saving: no COMPLETE yet
    partial = failure_advice(247, never, run_state(run_dir), resumed=False, run_dir=run_dir)
    assert partial == (f"launch/train.sh: training failed (exit 247) during its first checkpoint save: nothing "
                       f"complete was saved; delete {run_dir / 'checkpoints'} (interrupted: step00000002) and run "
                       "the same command again to start over")

    (run_dir / "checkpoints" / "step00000002").rmdir()
    _commit_checkpoint(run_dir, "step00000002")
    saved = run_state(run_dir)
    assert saved.newest_tag == "step00000002"
    died = failure_advice(247, logged, saved, resumed=False, run_dir=run_dir)
    assert died == ("launch/train.sh: training failed (exit 247); newest complete checkpoint: step00000002; run the "
                    "same command with -- --resume to continue from it")
    # A resumed launch that died before training (the checkpoint it resumed from stays): nothing to resume anew.
    assert "failed before training started" in failure_advice(1, saved, run_state(run_dir), True, run_dir)
    # metrics.jsonl rewritten by a resumed launch (the lines up to the checkpoint kept, one step more): it trained.
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 3, "loss": 4.0}\n')
    again = failure_advice(247, saved, run_state(run_dir), resumed=True, run_dir=run_dir)
    assert "newest complete checkpoint: step00000002; run the same command again (it has --resume)" in again


def test_failure_advice_adds_nothing_to_success_ctrl_c_and_the_trainers_own_stops(tmp_path):
    state = run_state(tmp_path)
    assert [failure_advice(code, state, state, False, tmp_path) for code in (0, 3, 130)] == [None, None, None]
    assert failure_advice(2, state, state, False, tmp_path) == \
        "launch/train.sh: nothing was trained (exit 2): see the error above"
    assert failure_advice(1, None, None, False, None) == \
        "launch/train.sh: training failed (exit 1): see the error above"


def _advice_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("launch/train.sh:")]


def _chatter(output: str, patterns: tuple[str, ...]) -> list[str]:
    return [line for line in output.splitlines() if any(p in line for p in patterns)]


@pytest.mark.multirank
def test_a_launch_failing_before_its_first_step_says_so_without_launcher_chatter(tiny_data, tmp_path):
    """The master port is taken (another program listens there): rank 0 cannot start the process group, after
    the launch and before any training. Nothing of DeepSpeed's launcher processes is printed."""
    config = write_config(tmp_path / "cfg.py", tiny_data)
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = ["bash", str(TRAIN_SH), "--nproc", "2", "--config", str(config), "--ds_config", str(ds), "--run_dir",
               str(tmp_path / "run"), "--master_port", str(port), "--python", sys.executable]
        env = {k: v for k, v in os.environ.items() if k != "MOE_RECIPE_DS_LOG"}
        proc = run_to_end(cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 2), output[-3000:]
    assert "EADDRINUSE" in output or "address already in use" in output, output[-3000:]
    assert _advice_lines(output) == [f"launch/train.sh: failed before training started (exit {proc.returncode}): "
                                     "see the error above"]
    assert _chatter(output, LAUNCHER_CHATTER) == []


@pytest.mark.multirank
def test_a_rank_killed_before_the_first_checkpoint_says_nothing_was_saved(tiny_data, tmp_path):
    """MOE_RECIPE_DS_LOG=info: the launcher's lines are back (the control for the test above). Rank 1 is killed
    after a logged step, long before the first checkpoint: the advice is to start again, not to --resume."""
    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=10**9, save_every=10**9))
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2})
    run_dir, port, log = tmp_path / "run", str(_free_port()), tmp_path / "launch.log"
    cmd = ["bash", str(TRAIN_SH), "--nproc", "2", "--config", str(config), "--ds_config", str(ds), "--run_dir",
           str(run_dir), "--master_port", port, "--python", sys.executable]
    with background_launch(cmd, port, log, env={"MOE_RECIPE_DS_LOG": "info"}) as proc:
        wait_until(proc, lambda: logged_steps(run_dir) >= 1, "logged step", log)
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        proc.wait(timeout=SAFETY_S)
    output = log.read_text()
    assert proc.returncode != 0
    assert _advice_lines(output) == [f"launch/train.sh: training failed (exit {proc.returncode}) before its first "
                                     f"checkpoint: nothing was saved in {run_dir}; run the same command again to "
                                     "start over"], output[-3000:]
    for pattern in SHOWN_ON_ANY_BOX:
        assert _chatter(output, (pattern,)), pattern
