"""Guards while training: non-finite loss or gradients skip the whole step on every rank; a run of them stops
training with exit code 3 and the newest complete checkpoint untouched.

NaNs are injected without hooks in the recipe: each rank is started here (2 ranks, from a fork server) with
``TransformerLM.forward`` patched to spoil the loss (or, through a tensor hook, the gradients) of chosen
training steps on chosen ranks only.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time

import pytest
import torch

from conftest import SAFETY_S, _free_port, read_metrics, write_config, write_ds_config
from recipe.checkpoint import checkpoint_root, complete_tags, consolidated_state_dict, latest_tag

pytestmark = pytest.mark.multirank

SCHEDULE = {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 3}}  # LR moves every step


def _rank(rank: int, world: int, port: int, argv: list[str], nan: dict, skip_batches: tuple, log: str) -> None:
    """One trainer rank. ``nan``: {training forward call (1-based) or "always": "loss" | "grad"} spoiled on this rank;
    ``skip_batches``: batches of this rank's stream (1-based) thrown away (the reference run never sees them).
    stdout and stderr go to ``log`` (a fork server's children do not write where pytest captures)."""
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from recipe.data.loader import BatchLoader
    from recipe.model.transformer import TransformerLM
    from recipe.train import main

    forward, next_batch = TransformerLM.forward, BatchLoader.next_batch
    calls = {"forward": 0, "batch": 0}

    def spoiled_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["forward"] += 1
            kind = nan.get(calls["forward"], nan.get("always"))
            if kind == "loss":
                out.lm_loss = out.lm_loss * float("nan")
            elif kind == "grad":  # the loss stays finite, every gradient through it becomes NaN
                out.lm_loss.register_hook(lambda grad: grad * float("nan"))
        return out

    def thinned_next_batch(self):
        calls["batch"] += 1
        while calls["batch"] in skip_batches:
            next_batch(self)
            calls["batch"] += 1
        return next_batch(self)

    TransformerLM.forward, BatchLoader.next_batch = spoiled_forward, thinned_next_batch
    os._exit(main(argv))


def _run(tmp_path, name, config, ds, *extra, nan=None, skip_batches=()):
    """Train on 2 ranks; returns the run dir, both exit codes and both ranks' output."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["deepspeed", "recipe.train"])
    run_dir = tmp_path / name
    argv = ["--config", str(config), "--ds_config", str(ds), "--run_dir", str(run_dir), *extra]
    port = _free_port()
    logs = [tmp_path / f"{name}_rank{rank}_{port}.log" for rank in range(2)]
    procs = [ctx.Process(target=_rank, args=(rank, 2, port, argv, (nan or {}).get(rank, {}), skip_batches,
                                             str(logs[rank]))) for rank in range(2)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + SAFETY_S  # a safety net for a hang only: the ranks' end is what is awaited
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0))
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    outputs = [log.read_text() if log.is_file() else "" for log in logs]
    if None in codes:
        pytest.fail(f"{name}: ranks still running after {SAFETY_S} s (killed), exit codes {codes}:\n"
                    + "\n".join(out[-3000:] for out in outputs))
    return run_dir, codes, outputs


def _final_weights(run_dir):
    state, _ = consolidated_state_dict(checkpoint_root(run_dir), latest_tag(run_dir))
    return state


@pytest.mark.parametrize("ds_name", ["zero0_fp32.json", "zero2_fp32_ep2.json", "zero0_bf16.json",
                                     "zero1_bf16_ep2.json"])
def test_bad_steps_are_skipped_as_if_their_batches_never_came(tiny_data, tmp_path, ds_name):
    """Step 2: NaN loss on rank 1 only; step 3: NaN gradients (finite loss) on rank 0 only. Both steps are
    skipped on both ranks: after 5 steps the weights equal, bit for bit, those of a 3-step run that never saw
    batches 2 and 3, with the same LR (the schedule did not advance on the skipped steps)."""
    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=5, save_every=100))
    reference_cfg = write_config(tmp_path / "ref.py", tiny_data, train=dict(steps=3, save_every=100))
    ds = write_ds_config(tmp_path / "ds.json", base=ds_name, scheduler=SCHEDULE)

    spoiled, codes, _ = _run(tmp_path, "spoiled", config, ds, nan={1: {2: "loss"}, 0: {3: "grad"}})
    assert codes == [0, 0]
    reference, codes, _ = _run(tmp_path, "reference", reference_cfg, ds, skip_batches=(2, 3))
    assert codes == [0, 0]

    records, _ = read_metrics(spoiled)
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2, 2]
    assert [r["lr"] for r in records][1:3] == [records[0]["lr"]] * 2  # the LR stood still on skipped steps
    ref_records, _ = read_metrics(reference)
    assert records[-1]["lr"] == ref_records[-1]["lr"]
    assert records[-1]["loss"] == ref_records[-1]["loss"]
    ours, theirs = _final_weights(spoiled), _final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.isfinite(v).all() for v in ours.values())
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def _snapshot(run_dir) -> dict:
    root = checkpoint_root(run_dir)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_consecutive_bad_steps_stop_with_exit_code_3_and_the_checkpoint_untouched(tiny_data, tmp_path):
    """2 good steps and a checkpoint; then, resumed, rank 1 alone produces NaN losses on every step: steps 3, 4
    and 5 are skipped, training stops after max_bad_steps=3 with exit code 3 on both ranks and one message,
    and the checkpoint folder is exactly as it was (the save due at step 4 was not written)."""
    first = write_config(tmp_path / "first.py", tiny_data, train=dict(steps=2, save_every=2))
    longer = write_config(tmp_path / "longer.py", tiny_data, train=dict(steps=10, save_every=2, max_bad_steps=3,
                                                                      lr_schedule_on_resume="keep"))
    ds = write_ds_config(tmp_path / "ds.json", base="zero2_fp32_ep2.json")
    run_dir, codes, _ = _run(tmp_path, "run", first, ds)
    assert codes == [0, 0] and latest_tag(run_dir) == "step00000002"
    before = _snapshot(run_dir)

    _, codes, outputs = _run(tmp_path, "run", longer, ds, "--resume", nan={1: {"always": "loss"}})
    err = "\n".join(outputs)
    assert codes == [3, 3], err[-3000:]
    messages = [line for line in err.splitlines() if "consecutive steps with non-finite" in line]
    assert len(messages) == 1 and "steps 3..5" in messages[0] and "step00000002" in messages[0], err[-3000:]
    assert "Traceback" not in err
    assert _snapshot(run_dir) == before
    assert complete_tags(run_dir) == ["step00000002"]
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["skipped_steps"] == 2
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
