"""--resume at the same layout into a damaged checkpoint: one clear line, exit code 2, nothing touched.

The sizes ``COMPLETE`` records catch a truncated or missing file before any process group starts; a file
damaged in place where no sizes were recorded (a checkpoint of an older recipe) fails inside DeepSpeed's
loader, which the trainer turns into one line as well.
"""
from __future__ import annotations

import shutil

import pytest

from conftest import launch, write_config, write_ds_config
from recipe.checkpoint import COMPLETE, checkpoint_root, complete_tags

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def saved_run(tiny_data, tmp_path_factory):
    """A 2-rank EP=2 ZeRO-2 run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("damaged")
    config = write_config(root / "cfg.py", tiny_data, train=dict(steps=4, save_every=2))
    # Two more steps than saved: the "auto" schedule's new length is declined, the saved one kept.
    longer = write_config(root / "longer.py", tiny_data,
                          train=dict(steps=6, save_every=2, lr_schedule_on_resume="keep"))
    ds = write_ds_config(root / "ds.json", moe_recipe={"ep_size": 2})
    launch(2, config, ds, root / "run")
    assert complete_tags(root / "run") == ["step00000002", "step00000004"]
    return root / "run", longer, ds


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _optim_file(folder):
    return sorted(folder.glob("*optim_states.pt"))[0]


DAMAGE = {  # name: (how, the file the message must name)
    "truncated_expert": (lambda f: _truncate(f / "layer_1_expert_3_mp_rank_00_model_states.pt"),
                         "layer_1_expert_3_mp_rank_00_model_states.pt is"),
    "missing_expert": (lambda f: (f / "layer_0_expert_2_mp_rank_00_model_states.pt").unlink(),
                       "layer_0_expert_2_mp_rank_00_model_states.pt is missing"),
    "truncated_optimizer_shard": (lambda f: _truncate(_optim_file(f)), "optim_states.pt is"),
    "truncated_model_states": (lambda f: _truncate(f / "mp_rank_00_model_states.pt"),
                               "mp_rank_00_model_states.pt is"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_with_one_line(saved_run, tmp_path, case):
    base, config, ds = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    damage, names = DAMAGE[case]
    damage(checkpoint_root(run_dir) / "step00000004")
    before = _snapshot(run_dir)

    proc = launch(2, config, ds, run_dir, "--resume", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, output[-3000:]  # every rank says the same one line
    error = errors.pop()
    assert "checkpoint step00000004" in error and "damaged" in error and names in error, error
    assert "step00000002" in error and "--resume" in error, error  # the older intact one, and how to use it
    assert _snapshot(run_dir) == before  # nothing written, nothing skipped to silently


def test_damage_that_sizes_cannot_show_fails_in_the_loader_with_one_line(saved_run, tmp_path):
    """An older-style COMPLETE (the tag only: accepted, nothing to compare) over a truncated optimizer shard:
    DeepSpeed's loader fails inside the trainer, which ends every rank with one line and exit code 2."""
    base, config, ds = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    folder = checkpoint_root(run_dir) / "step00000004"
    (folder / COMPLETE).write_text("step00000004\n")
    _truncate(_optim_file(folder))
    before = _snapshot(run_dir)

    proc = launch(2, config, ds, run_dir, "--resume", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("cannot load checkpoint step00000004" in line for line in errors), output[-3000:]
    assert _snapshot(run_dir) == before
