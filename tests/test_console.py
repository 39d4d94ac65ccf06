"""What a launch prints: one recipe line before the first step, progress lines with MoE health and an ETA, the
rate each step ran at, an error once (not once per rank), and a Ctrl-C that ends every rank in one line."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import (ROOT, SAFETY_S, _free_port, background_launch, launch, logged_steps, read_metrics, wait_until,
                      write_config, write_ds_config)
from recipe.training.telemetry import (Console, deepspeed_log_level, eta_seconds, format_duration,
                                       interrupt_message, is_global_rank_zero, moe_health, progress_line)

MOE_RECORD = {"step": 5, "loss": 5.12345, "lm_loss": 5.1, "lr": 3e-4, "tokens_per_s": 2190.4, "elapsed_s": 15.0,
              "moe": [{"drop_fraction": 0.031, "max_over_mean_load": 1.2},
                      {"drop_fraction": 0.004, "max_over_mean_load": 1.84}]}
DENSE_RECORD = {key: value for key, value in MOE_RECORD.items() if key != "moe"}


# ---- pure functions: no launch -------------------------------------------------------------------------------

def test_progress_line_of_an_moe_record_has_the_worst_layer_figures_and_the_eta():
    line = progress_line(MOE_RECORD, total_steps=20, start_step=0)
    # 15 s for 5 steps in this launch: 3 s/step, 15 steps to go.
    assert line == "step 5/20 | loss 5.1235 (lm 5.1000) | lr 3.00e-04 | 2,190 tok/s | drop 3.1% load 1.84x | eta 45s"
    assert moe_health(MOE_RECORD) == (0.031, 1.84)  # drop of one layer, load of the other


def test_progress_line_of_a_dense_record_has_no_moe_figure():
    line = progress_line(DENSE_RECORD, total_steps=20, start_step=0)
    assert moe_health(DENSE_RECORD) is None and "drop" not in line and "load" not in line
    assert line.startswith("step 5/20 | loss 5.1235") and line.endswith("| 2,190 tok/s | eta 45s")


def test_eta_counts_only_the_steps_of_this_launch():
    # Resumed at step 3: 2 steps in 15 s, 15 to go.
    assert eta_seconds(5, 20, 3, 15.0) == pytest.approx(112.5)
    assert progress_line(MOE_RECORD, total_steps=20, start_step=3).endswith("eta 1m52s")
    assert eta_seconds(3, 20, 3, 0.0) is None  # no step done yet in this launch
    assert [format_duration(s) for s in (0.4, 59, 185, 3725, None, float("nan"))] == \
        ["0s", "59s", "3m05s", "1h02m", "?", "?"]


def test_show_step_prints_the_plain_line_on_rank_0_only_without_a_terminal(capsys):
    Console(is_main=True).show_step(MOE_RECORD, 20, 0)
    Console(is_main=False).show_step(MOE_RECORD, 20, 0)
    assert capsys.readouterr().out == progress_line(MOE_RECORD, 20, 0) + "\n"


def test_in_a_terminal_the_bar_carries_the_figures_beside_its_own_step_count_and_eta():
    import io

    from tqdm import tqdm

    console, screen = Console(is_main=True), io.StringIO()
    console.progress = tqdm(total=20, initial=4, unit="step", file=screen)  # what start_progress makes on a tty
    console.advance()
    console.show_step(MOE_RECORD, 20, 0)
    console.close()
    shown = screen.getvalue().split("\r")[-1]
    assert " 5/20 " in shown and "<" in shown  # tqdm's step count and its elapsed<remaining
    assert "loss 5.1235 | 2,190 tok/s | drop 3.1% load 1.84x" in shown, shown


def test_interrupt_message_names_the_checkpoint_and_the_resume_flag():
    line = interrupt_message(8, "step00000006", resumed=False, saving=False)
    assert line.startswith("interrupted (Ctrl-C) during step 8: stopped without saving;")
    assert "newest complete checkpoint: step00000006" in line and "-- --resume" in line
    assert "(it has --resume)" in interrupt_message(8, "step00000006", resumed=True, saving=False)
    assert "that save is incomplete" in interrupt_message(6, "step00000004", resumed=False, saving=True)
    assert "no checkpoint was saved yet" in interrupt_message(2, None, resumed=False, saving=False)


def test_deepspeed_log_level_and_global_rank_zero_from_the_environment():
    import logging

    assert deepspeed_log_level({}) == logging.ERROR
    assert deepspeed_log_level({"MOE_RECIPE_DS_LOG": "info"}) == logging.INFO
    assert deepspeed_log_level({"MOE_RECIPE_DS_LOG": "nonsense"}) == logging.ERROR
    assert is_global_rank_zero({}) and is_global_rank_zero({"RANK": "0"}) and not is_global_rank_zero({"RANK": "1"})


def test_a_plan_error_is_printed_by_global_rank_0_only(tmp_path, monkeypatch, capsys):
    from recipe.train import main
    from recipe.training.exit_codes import ExitCode

    config = write_config(tmp_path / "cfg.py", tmp_path / "no_such_data")
    argv = ["--config", str(config), "--ds_config", str(ROOT / "ds_configs" / "zero2_fp32.json")]
    for rank, prints in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == ExitCode.BAD_INPUT
        err = capsys.readouterr().err
        assert (err.startswith("error: ") and err.count("\n") == 1) if prints else err == "", (rank, err)


def test_importing_the_trainer_logs_nothing_from_deepspeed():
    """DeepSpeed logs while it is imported (accelerator auto-detection falling back to the CPU); the trainer
    quiets its logger before that. Negative control: MOE_RECIPE_DS_LOG=warning shows the line where it exists."""
    from deepspeed.accelerator import get_accelerator

    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "MOE_RECIPE_DS_LOG")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-c", "import recipe.train"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=SAFETY_S)
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout + quiet.stderr
    if get_accelerator().device_name() == "cpu":  # detection only warns when it finds no device
        loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, "MOE_RECIPE_DS_LOG": "warning"},
                              cwd=ROOT, timeout=SAFETY_S)
        assert "Setting accelerator to CPU" in loud.stdout, loud.stdout + loud.stderr


# A process with the trainer's Ctrl-C handling whose main thread, once interrupted, blocks again: a rank stuck in
# a collective whose peer has left (NCCL waiting in a stream sync runs no Python signal handler at all).
STUCK_RANK = """
import threading
import recipe.train  # noqa: F401 - as a rank starts: DeepSpeed quiet before it is imported
from recipe.training.distributed import handle_interrupts
handle_interrupts(lambda: print("last words", flush=True))
print("ready", flush=True)
try:
    threading.Event().wait()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    threading.Event().wait()
"""


def _start_stuck_rank() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STUCK_RANK], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_rank_stuck_after_ctrl_c_says_its_line_and_ends_and_ignores_the_launchers_sigterm():
    proc = _start_stuck_rank()
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "interrupted\n"
    proc.send_signal(signal.SIGTERM)  # what the deepspeed launcher sends after its own SIGINT
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C
    out, _ = proc.communicate(timeout=SAFETY_S)
    assert (proc.returncode, out) == (130, "last words\n")


def test_a_sigterm_without_ctrl_c_still_ends_a_rank_at_once():
    proc = _start_stuck_rank()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=SAFETY_S)
    assert (proc.returncode, out) == (128 + signal.SIGTERM, "")


# ---- one 2-rank launch, several checks --------------------------------------------------------------------------

STEPS = 8
# Linear warmup from a nonzero floor, then cosine: a different rate at every step.
SCHEDULE = {"type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 3,
                                                  "warmup_min_ratio": 0.05, "warmup_type": "linear",
                                                  "cos_min_ratio": 0.1}}
PROGRESS = re.compile(r"^step (\d+)/(\d+) \| loss \S+ \(lm \S+\) \| lr \S+ \| [\d,]+ tok/s \| "
                      r"drop \d+\.\d% load \d+\.\d\dx \| eta (\d+h\d\dm|\d+m\d\ds|\d+s)$")


@pytest.fixture(scope="module")
def console_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    config = write_config(tmp / "cfg.py", tiny_data, train=dict(steps=STEPS, log_every=1))
    ds = write_ds_config(tmp / "ds.json", moe_recipe={"ep_size": 2}, scheduler=SCHEDULE)
    proc = launch(2, config, ds, tmp / "run")
    return proc, tmp / "run", ds


@pytest.mark.multirank
def test_logged_lr_is_the_rate_deepspeeds_own_scheduler_gives_that_step(console_run):
    """Reference: DeepSpeed's WarmupCosineLR on a dummy optimizer, stepped as the engine steps it (the update
    of step s runs at the rate the groups hold, then the scheduler moves on)."""
    import json

    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    _, run_dir, ds = console_run
    base_lr = json.loads(ds.read_text())["optimizer"]["params"]["lr"]
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    schedule = WarmupCosineLR(dummy, **SCHEDULE["params"])
    expected = []
    for _ in range(STEPS):
        expected.append(dummy.param_groups[0]["lr"])
        dummy.step()
        schedule.step()
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert len(set(expected)) == STEPS  # every step's rate differs: an off-by-one cannot match
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.multirank
def test_one_recipe_line_before_the_first_step_then_progress_with_moe_health_and_eta(console_run):
    proc, run_dir, _ = console_run
    lines = proc.stdout.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1/"))
    assert len(lines[:first_step]) == 1, lines[:first_step]  # no DeepSpeed line from any rank, nor the launcher
    recipe_line = lines[0]
    for part in ("INTERNLM_MoE", "M params (", "M active)", "2 ranks, ep_size 2, ZeRO-2 fp32",
                 f"data {run_dir.parent.parent}", "256 tokens/step", f"steps 1..{STEPS}"):
        assert part in recipe_line, (part, recipe_line)
    progress = [PROGRESS.match(line) for line in lines if line.startswith("step ")]
    assert all(progress), [line for line in lines if line.startswith("step ")]
    assert [int(m.group(1)) for m in progress] == list(range(1, STEPS + 1))  # log_every=1
    assert progress[-1].group(3) == "0s"
    assert proc.stderr.strip() == "", proc.stderr[-3000:]


@pytest.mark.multirank
def test_a_bad_config_prints_its_error_once_for_two_ranks(tiny_data, tmp_path):
    config = write_config(tmp_path / "cfg.py", tiny_data, model=dict(num_experts=3))  # ep_size 2 cannot split 3
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2})
    proc = launch(2, config, ds, tmp_path / "run", check=False)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, output[-3000:]


# ---- Ctrl-C -------------------------------------------------------------------------------------------------------

@pytest.mark.multirank
def test_ctrl_c_ends_every_rank_in_one_line_and_the_named_checkpoint_resumes(tiny_data, tmp_path):
    from recipe.checkpoint import latest_tag

    # A step budget no machine runs through while the test waits; a fixed schedule, so that resuming with
    # another train.steps keeps it.
    schedule = {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 2}}
    # wandb offline, as by default: its service process gets the SIGINT too, and its teardown must not print.
    config = write_config(tmp_path / "cfg.py", tiny_data,
                          train=dict(steps=10**9, save_every=2, log_every=1, wandb="offline"))
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2}, scheduler=schedule)
    run_dir, log_path = tmp_path / "run", tmp_path / "launch.log"
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), "--nproc", "2", "--config", str(config), "--ds_config", str(ds),
           "--run_dir", str(run_dir), "--python", sys.executable]
    port = str(_free_port())
    with background_launch(cmd, port, log_path, env={"MASTER_PORT": port}) as proc:
        # A safety net for a hang only: the checkpoint is awaited.
        wait_until(proc, lambda: latest_tag(run_dir) is not None and logged_steps(run_dir) >= 3, "checkpoint",
                   log_path)
        before = len(log_path.read_text())
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        try:
            proc.wait(timeout=SAFETY_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {SAFETY_S} s after SIGINT:\n{log_path.read_text()[-3000:]}")
    after = log_path.read_text()[before:]
    tag = latest_tag(run_dir)
    notes = [line for line in after.splitlines() if line.startswith("interrupted (Ctrl-C)")]
    assert len(notes) == 1 and f"newest complete checkpoint: {tag};" in notes[0] and "-- --resume" in notes[0], after
    assert "Traceback" not in after and "frame #" not in after, after[-4000:]
    assert len(after.splitlines()) < 10, after
    # Every rank exits 130 (ExitCode.INTERRUPTED); the launcher then ends itself by SIGINT, as an uncaught Ctrl-C
    # would, so a calling script stops too: a shell reports either as 130.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, after[-3000:])

    step = int(tag.removeprefix("step"))
    resumed = launch(2, config, ds, run_dir, "--resume", "--set", f"train.steps={step + 1}")
    assert f"resumed from {tag}" in resumed.stdout
    records, _ = read_metrics(run_dir)
    assert records[-1]["step"] == step + 1
