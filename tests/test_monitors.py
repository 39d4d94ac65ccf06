"""DeepSpeed's monitor blocks: each enabled one works (its output inside the run folder, holding the recipe's
scalars) or is refused before launch with one line naming the block and the fix."""
import csv
import importlib.util
import json

import pytest

from conftest import ROOT, launch, read_metrics, write_config, write_ds_config
from recipe.config import ConfigError, config_from_dict
from recipe.ds_config import read_ds_config, resolve_ds_config

MOE = config_from_dict({"data": {"seq_len": 16}, "train": {"run_dir": "runs/mine"}})


def resolve(**blocks) -> dict:
    raw = read_ds_config(ROOT / "ds_configs" / "zero2_fp32_ep2.json")
    raw.update(blocks)
    return resolve_ds_config(raw, MOE, 2, "my.json").deepspeed


def refusal(**blocks) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(**blocks)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("block,module,command", [("tensorboard", "tensorboard", "pip install tensorboard==2.21.0"),
                                                  ("comet", "comet_ml", "pip install comet_ml==3.58.8")])
def test_an_enabled_monitor_whose_package_is_missing_is_refused_with_the_install_command(monkeypatch, block, module,
                                                                                           command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    message = refusal(**{block: {"enabled": True}})
    assert f"the `{block}` monitor block is enabled" in message and f"`{command}`" in message, message
    resolve(**{block: {"enabled": False}})  # a disabled block needs nothing


def test_a_deepspeed_wandb_block_is_refused_in_favour_of_train_wandb():
    message = refusal(wandb={"enabled": True, "project": "p"})
    assert "`wandb` monitor block" in message and "train.wandb=online" in message, message


def test_a_typo_in_an_enabled_monitor_block_is_refused():
    message = refusal(tensorboard={"enabled": True, "ouput_path": "tb"})
    assert "refuses `tensorboard.ouput_path` (Extra inputs are not permitted)" in message, message
    message = refusal(csv_monitor={"enabled": True, "job_nmae": "x"})
    assert "refuses `csv_monitor.job_nmae`" in message, message


def test_monitor_output_goes_into_the_run_folder_unless_a_path_is_given():
    ds = resolve(tensorboard={"enabled": True}, csv_monitor={"enabled": True, "output_path": "auto", "job_name": "c"})
    assert ds["tensorboard"] == {"enabled": True, "output_path": "runs/mine", "job_name": "tensorboard"}
    assert ds["csv_monitor"] == {"enabled": True, "output_path": "runs/mine", "job_name": "c"}
    ds = resolve(tensorboard={"enabled": True, "output_path": "/elsewhere"}, csv_monitor={"enabled": False})
    assert ds["tensorboard"] == {"enabled": True, "output_path": "/elsewhere"}  # DeepSpeed's job_name default
    assert ds["csv_monitor"] == {"enabled": False}


@pytest.mark.multirank
def test_every_working_monitor_at_once_writes_the_recipes_scalars_into_the_run_folder(tiny_data, tmp_path):
    """tensorboard and csv_monitor together (wandb and, without comet_ml, comet are refused: tests above), 2 ranks:
    each one's files in the run folder hold the loss of every step, as metrics.jsonl has it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path / "cfg.py", tiny_data, train=dict(steps=3))
    ds = write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 2}, tensorboard={"enabled": True},
                         csv_monitor={"enabled": True}, wandb={"enabled": False}, comet={"enabled": False})
    stray = ROOT / "DeepSpeedJobName"
    existed = stray.exists()
    launch(2, config, ds, tmp_path / "run")
    records, _ = read_metrics(tmp_path / "run")
    losses = {r["step"]: r["loss"] for r in records}
    assert sorted(losses) == [1, 2, 3]

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"moe_recipe/loss", "moe_recipe/lr", "moe_recipe/moe/layer0/drop_fraction"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("moe_recipe/loss")}
    assert logged == pytest.approx(losses, rel=1e-6)  # tensorboard stores float32

    with open(tmp_path / "run" / "csv_monitor" / "moe_recipe_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    assert {int(step): float(value) for step, value in rows[1:]} == losses
    assert (tmp_path / "run" / "csv_monitor" / "moe_recipe_moe_layer1_tokens_expert3.csv").is_file()
    assert stray.exists() == existed  # nothing written into the launch directory
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["ds_config"]
    assert saved["tensorboard"]["output_path"] == str(tmp_path / "run")
