"""kill -9 at random moments, saves included: resume always finds a complete checkpoint, none is lost.

Nothing here depends on how fast the machine is. The test watches each trainer (its metrics.jsonl records and
the ``COMPLETE`` markers of its checkpoints) and times every kill from what it saw: how long this machine,
right now, takes for a step and for a save. The step budget is out of reach (10**9 steps), and a trainer
that ends by itself before its kill, for whatever reason, only costs a retry of that round.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from conftest import SAFETY_S, _free_port, write_config, write_ds_config
from recipe.checkpoint import checkpoint_root, complete_tags, consolidated_state_dict, latest_tag, missing_files

pytestmark = pytest.mark.multirank

KILLS = 20
RETRIES = 5  # trainers that end by themselves before their kill, over the whole test
BUDGET = 10**9  # train.steps: no number of rounds on any machine runs through it
POLL_S = 0.002


def _train(config, ds, run_dir, resume, port, log, extra=()):
    with open(log, "w") as out:  # a fork server's children do not write where pytest captures
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from recipe.train import main

    args = ["--config", str(config), "--ds_config", str(ds), "--run_dir", str(run_dir), *extra]
    os._exit(main(args + (["--resume"] if resume else [])))


def _lines(run_dir: Path) -> list[str]:
    """metrics.jsonl's finished lines (the trainer may be writing, or rewriting the file, right now)."""
    try:
        return (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]
    except FileNotFoundError:
        return []


class Watch:
    """What one trainer did, as seen from here: when each of its steps was logged and each of its saves
    committed. Its save of step s runs from the record of step s to ``COMPLETE`` of step s (then an old
    checkpoint is pruned), its next step from there to the record of step s + 1."""

    def __init__(self, run_dir: Path, step_s: list, save_s: list):
        self.run_dir, self.step_s, self.save_s = run_dir, step_s, save_s
        # Records already there are the previous trainer's: the new one keeps those up to its checkpoint and
        # appends its own, which differ from every old line (elapsed_s, tokens_per_s).
        self.old = set(_lines(run_dir))
        self.version = None
        self.steps: list[int] = []  # this trainer's logged steps
        self.logged: dict[int, float] = {}
        self.committed: dict[int, float] = {}

    def poll(self) -> None:
        now = time.monotonic()
        try:
            stat = (self.run_dir / "metrics.jsonl").stat()
            version = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            version = None
        if version != self.version:
            self.version = version
            for line in _lines(self.run_dir):
                if line in self.old:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                step = record.get("step")
                if "loss" not in record or step in self.logged:
                    continue
                self.logged[step] = now
                self.steps.append(step)
                if step - 1 in self.committed:
                    self.step_s.append(now - self.committed[step - 1])
        if self.steps and self.steps[-1] not in self.committed:
            step = self.steps[-1]
            if (checkpoint_root(self.run_dir) / f"step{step:08d}" / "COMPLETE").is_file():
                self.committed[step] = now
                self.save_s.append(now - self.logged[step])


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.is_file() else "(no output)"


def test_kill_at_random_moments_never_loses_a_checkpoint(tiny_data, tmp_path):
    from deepspeed.comm.torch import build_shm_op

    # DeepSpeed JIT-builds its CPU shared-memory comm op on first use in a new environment (~100 s). A
    # trainer killed mid-build leaves torch's build lock behind and every later build waits on it forever,
    # so build it here, uninterrupted, before any trainer is started and killed.
    build_shm_op()

    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=BUDGET, save_every=1, keep_last=2,
                                                                     log_every=1))
    ds = write_ds_config(tmp_path / "ds.json", base="zero1_fp32.json")
    run_dir = tmp_path / "run"
    # Trainers start from a fork server that has only imported the libraries: forking this pytest process
    # itself could copy a live OpenMP thread pool from earlier tests, which hangs the child.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["deepspeed", "recipe.train"])
    rng = random.Random(1234)
    step_s, save_s = [], []  # every step and save duration observed, all trainers
    history, interrupted_saves, newest, ended, attempt = [], 0, None, [], 0
    kill = 0
    while kill < KILLS:
        resume = latest_tag(run_dir) is not None
        attempt += 1
        log = tmp_path / f"trainer{attempt}.log"
        watch = Watch(run_dir, step_s, save_s)
        proc = ctx.Process(target=_train, args=(config, ds, run_dir, resume, _free_port(), str(log)))
        proc.start()
        # Kill windows, from this machine's step and save times as observed so far (medians: the other
        # processes on the machine make single steps stall now and then):
        #   even kills: anywhere in the next two steps and saves, which alternate (save_every=1);
        #   odd kills:  inside the save that starts now.
        # Both start at this trainer's first logged step, where its save of that step begins. The first kill
        # also waits for a complete checkpoint and one observed step and save (a run killed in its very
        # first save can neither resume nor start again in the same run dir).
        deadline = time.monotonic() + SAFETY_S
        while proc.is_alive() and (not watch.steps or not step_s or not save_s) and time.monotonic() < deadline:
            watch.poll()
            time.sleep(POLL_S)
        if proc.is_alive() and time.monotonic() >= deadline:
            proc.kill()
            proc.join()
            pytest.fail(f"trainer {attempt} logged no step within {SAFETY_S} s (kill {kill}):\n{_tail(log)}")
        if proc.is_alive():
            step, save = statistics.median(step_s), statistics.median(save_s)
            time.sleep(rng.uniform(0.0, 2 * (step + save) if kill % 2 == 0 else save))
        if proc.is_alive():  # polls: a trainer that ended is never signalled (its pid may be another's by now)
            proc.kill()
        proc.join(SAFETY_S)
        assert proc.exitcode is not None, f"trainer {attempt} did not end within {SAFETY_S} s of SIGKILL"
        tags = complete_tags(run_dir)
        latest = latest_tag(run_dir)
        folders = [p.name for p in checkpoint_root(run_dir).glob("step*")] if checkpoint_root(run_dir).is_dir() else []
        assert newest is None or latest is not None, f"the complete checkpoints are gone (had {newest}), {folders}"
        if latest is not None:
            # Every checkpoint that claims completeness is complete and readable.
            for tag in tags:
                assert not missing_files(checkpoint_root(run_dir) / tag, 1, 2, 4), tag
            consolidated_state_dict(checkpoint_root(run_dir), latest)
            # The newest complete checkpoint never moves backwards.
            assert newest is None or latest >= newest, (history, newest, latest)
            newest = latest
        if proc.exitcode != -signal.SIGKILL:  # ended by itself (whatever the reason): this round again
            ended.append(f"trainer {attempt} (kill {kill}) exited with {proc.exitcode}:\n{_tail(log)}")
            assert len(ended) <= RETRIES, "trainers ended by themselves before their kill:\n" + "\n".join(ended)
            continue
        interrupted_saves += any(name not in tags for name in folders)
        history.append(latest)
        kill += 1
    assert sum(t is not None for t in history) >= KILLS // 2, history  # most kills came after a first save
    assert interrupted_saves >= 1, "no kill landed inside a save; the test proved nothing about saves"

    # Finally let it finish two more steps: it resumes and completes the run.
    last = int(latest_tag(run_dir).removeprefix("step"))
    log = tmp_path / "final.log"
    proc = ctx.Process(target=_train, args=(config, ds, run_dir, True, _free_port(), str(log),
                                            ("--set", f"train.steps={last + 2}", "--set",
                                             "train.lr_schedule_on_resume=keep")))
    proc.start()
    proc.join(SAFETY_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == 0, _tail(log)
    assert complete_tags(run_dir) == [f"step{last + 1:08d}", f"step{last + 2:08d}"]  # keep_last=2
    assert latest_tag(run_dir) == f"step{last + 2:08d}"
    print(f"{attempt} trainers; median step {statistics.median(step_s):.3f} s, save {statistics.median(save_s):.3f} s; "
          f"{interrupted_saves} kills inside a save; newest checkpoints {history}")
