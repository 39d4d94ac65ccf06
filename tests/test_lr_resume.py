"""--resume with an LR schedule other than the run's (a new train.steps re-fills "auto" lengths): refused by default
with one line; train.lr_schedule_on_resume "stretch" / "keep" continue deliberately, at the same rate whether the
checkpoint is resumed at its layout or resharded into another."""
import json
import shutil

import pytest
import torch

from conftest import ROOT, launch, read_metrics, write_config, write_ds_config
from recipe.config import ConfigError, config_from_dict
from recipe.ds_config import read_ds_config, resolve_ds_config
from recipe.training.checkpointing import put_schedule_rate
from recipe.training.plan import _check_lr_schedule

SHIPPED = ROOT / "ds_configs" / "zero2_fp32_ep2.json"


def _config(steps: int, option: str = "refuse"):
    return config_from_dict({"data": {"seq_len": 16}, "train": {"steps": steps, "lr_schedule_on_resume": option}})


def _saved_run(tmp_path, steps: int = 6, scheduler: dict | None = None):
    """A run folder whose config.json is what a fresh start with ``steps`` writes (checkpointing._write_run_config)."""
    raw = read_ds_config(SHIPPED)
    if scheduler is not None:
        raw["scheduler"] = scheduler
    ds = resolve_ds_config(raw, _config(steps), 2, "ds.json")
    (tmp_path / "config.json").write_text(json.dumps({"config": _config(steps).to_dict(), "ds_config": ds.deepspeed}))
    return raw


def _check(tmp_path, raw: dict, steps: int, option: str = "refuse"):
    config = _config(steps, option)
    ds = resolve_ds_config(raw, config, 2, "ds.json")
    return _check_lr_schedule(tmp_path, config, ds), ds


def test_a_new_train_steps_that_restretches_the_schedule_is_refused_with_one_line(tmp_path):
    raw = _saved_run(tmp_path)
    with pytest.raises(ConfigError) as info:
        _check(tmp_path, raw, 9)
    message = str(info.value)
    assert "\n" not in message
    assert f"--resume into {tmp_path}: the LR schedule differs from the one it was trained with (WarmupCosineLR " \
           f"total_num_steps 6 -> 9); resume with train.steps=6 as before, or set " \
           f"train.lr_schedule_on_resume='stretch'" in message, message
    assert "'keep' (continue the saved one, at its final rate past its end)" in message
    assert _check(tmp_path, raw, 6) == (None, _check(tmp_path, raw, 6)[1])  # the same schedule: nothing to say


def test_an_explicit_schedule_change_names_the_ds_config(tmp_path):
    raw = _saved_run(tmp_path, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2}})
    raw["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}
    with pytest.raises(ConfigError, match=r"\(WarmupLR warmup_num_steps 2 -> 3\); resume with the ds_config's old"):
        _check(tmp_path, raw, 6)


def test_keep_continues_the_saved_schedule_and_stretch_adopts_the_new_one(tmp_path):
    raw = _saved_run(tmp_path)
    saved, ds = _check(tmp_path, raw, 9, "keep")
    assert ds.deepspeed["scheduler"] == saved and saved["params"]["total_num_steps"] == 6
    saved, ds = _check(tmp_path, raw, 9, "stretch")
    assert saved["params"]["total_num_steps"] == 6 and ds.deepspeed["scheduler"]["params"]["total_num_steps"] == 9


def test_stretch_of_a_torch_scheduler_is_refused(tmp_path):
    raw = _saved_run(tmp_path, scheduler={"type": "StepLR", "params": {"step_size": 3}})
    raw["scheduler"] = {"type": "StepLR", "params": {"step_size": 4}}
    with pytest.raises(ConfigError, match="needs a scheduler of DeepSpeed's lr_schedules before and after; use 'keep'"):
        _check(tmp_path, raw, 6, "stretch")


def test_a_run_saved_without_its_ds_config_is_not_compared(tmp_path):
    raw = read_ds_config(SHIPPED)
    (tmp_path / "config.json").write_text(json.dumps({"config": _config(6).to_dict()}))
    assert _check(tmp_path, raw, 9)[0] is None


@pytest.mark.parametrize("value,message", [
    ("strech", "`train.lr_schedule_on_resume` must be 'refuse', 'stretch' or 'keep', got 'strech'; did you mean "
               "'stretch'?"),
])
def test_the_option_is_validated_with_did_you_mean(value, message):
    with pytest.raises(ConfigError) as info:
        _config(6, value)
    assert str(info.value) == message
    with pytest.raises(ConfigError, match="did you mean `train.lr_schedule_on_resume`"):
        config_from_dict({"train": {"lr_schedule_on_resum": "keep"}})


def test_put_schedule_rate_gives_a_loaded_optimizer_the_rate_of_the_new_schedule():
    """As on a same-layout resume: the optimizer holds the old schedule's rate, the scheduler the position only."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    def optimizer():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.003)

    old, new, fresh = optimizer(), optimizer(), optimizer()
    old_schedule = WarmupCosineLR(old, total_num_steps=6, warmup_num_steps=2)
    fresh_schedule = WarmupCosineLR(fresh, total_num_steps=9, warmup_num_steps=2)
    for _ in range(5):
        old_schedule.step()
        fresh_schedule.step()
    new_schedule = WarmupCosineLR(new, total_num_steps=9, warmup_num_steps=2)  # built, then the checkpoint loads:
    new.load_state_dict(old.state_dict())  # the saved param-group rate
    new_schedule.load_state_dict(old_schedule.state_dict())
    assert new.param_groups[0]["lr"] == old.param_groups[0]["lr"] != fresh.param_groups[0]["lr"]
    put_schedule_rate(new_schedule)
    assert new.param_groups[0]["lr"] == fresh.param_groups[0]["lr"]

    torch_schedule = torch.optim.lr_scheduler.StepLR(new, step_size=1, gamma=0.5)
    torch_schedule.step()
    new.param_groups[0]["lr"] = 1.0
    put_schedule_rate(torch_schedule)
    assert new.param_groups[0]["lr"] == torch_schedule.get_last_lr()[0]


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.multirank
def test_resume_with_more_steps_refuses_by_default_and_both_resume_paths_continue_at_one_rate(tiny_data, tmp_path):
    """6 steps on 2 ranks (EP=2, ZeRO-2, "auto" cosine schedule, dropless), then to 9: refused by default (one line, nothing
    written); with 'stretch', resumed at the same layout and resharded onto 1 rank (EP=1, same global batch), both
    run steps 7-9 at equal rates and losses; with 'keep' at the saved schedule's final rate (0.1 x 3e-3)."""
    # Dropless: which tokens an expert's capacity drops depends on the layout, and would change the losses.
    first = write_config(tmp_path / "first.py", tiny_data, model=dict(moe_drop_tokens=False),
                         train=dict(steps=6, save_every=6))
    ds2 = write_ds_config(tmp_path / "ep2.json", base="zero2_fp32_ep2.json", train_micro_batch_size_per_gpu=4)
    ds1 = write_ds_config(tmp_path / "ep1.json", base="zero2_fp32.json", train_micro_batch_size_per_gpu=8,
                          moe_recipe={"ep_size": 1})
    launch(2, first, ds2, tmp_path / "base")

    before = _snapshot(tmp_path / "base")
    proc = launch(2, first, ds2, tmp_path / "base", "--resume", "--set", "train.steps=9", check=False)
    errors = [line for line in proc.stderr.splitlines() if "the LR schedule differs" in line]
    assert proc.returncode == 2 and errors, proc.stderr[-3000:]
    assert "(WarmupCosineLR total_num_steps 6 -> 9); resume with train.steps=6" in errors[0]
    assert "Traceback" not in proc.stderr and _snapshot(tmp_path / "base") == before

    runs = {}
    for name, ranks, ds, option, extra in (("same", 2, ds2, "stretch", ()), ("resharded", 1, ds1, "stretch",
                                           ("--reshard",)), ("kept", 2, ds2, "keep", ())):
        shutil.copytree(tmp_path / "base", tmp_path / name)
        proc = launch(ranks, first, ds, tmp_path / name, "--resume", *extra, "--set", "train.steps=9",
                      "--set", f"train.lr_schedule_on_resume='{option}'")
        if option == "stretch":
            assert "train.lr_schedule_on_resume='stretch': LR schedule WarmupCosineLR total_num_steps 6 -> 9; the " \
                   "rate jumps from 0.0003 to" in proc.stdout, proc.stdout[-2000:]
        records, _ = read_metrics(tmp_path / name)
        runs[name] = [r for r in records if r["step"] > 6]
        assert [r["step"] for r in runs[name]] == [7, 8, 9]
    for same, resharded in zip(runs["same"], runs["resharded"], strict=True):
        assert same["lr"] == pytest.approx(resharded["lr"], rel=1e-12), same["step"]
        assert same["loss"] == pytest.approx(resharded["loss"], rel=1e-5), same["step"]
    assert len({r["lr"] for r in runs["same"]}) == 3  # the stretched cosine still decays
    assert [r["lr"] for r in runs["kept"]] == pytest.approx([0.003 * 0.1] * 3, rel=1e-12)
    saved = json.loads((tmp_path / "same" / "config.json").read_text())
    assert saved["ds_config"]["scheduler"]["params"]["total_num_steps"] == 9  # the next --resume compares to it
