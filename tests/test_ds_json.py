"""DeepSpeed JSON typos and bad blocks are refused before launch, with the file and a "did you mean"."""
import json

import pytest

from conftest import ROOT
from recipe.config import ConfigError, config_from_dict
from recipe.ds_config import read_ds_config, resolve_ds_config

MOE = config_from_dict({"data": {"seq_len": 16}})
DENSE = config_from_dict({"model_type": "INTERNLM", "data": {"seq_len": 16}})
SHIPPED = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json") if "fp16" not in p.name)  # no fp16 on CPU


def resolve(raw: dict, config=MOE, world_size: int = 2):
    return resolve_ds_config(raw, config, world_size, "my.json")


def shipped(name="zero2_fp32_ep2.json") -> dict:
    return read_ds_config(ROOT / "ds_configs" / name)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_json_passes(name):
    """The negative control of the key check: nothing DeepSpeed reads is refused."""
    raw = shipped(name)
    ranks = raw.get("moe_recipe", {}).get("ep_size", 1) * raw.get("tensor_parallel", {}).get("autotp_size", 1)
    resolve(raw, MOE if raw.get("moe_recipe") else DENSE, world_size=max(2, ranks))  # ep_size x TP divides them


def test_monitor_and_profiler_blocks_are_keys_deepspeed_reads():
    raw = shipped()
    raw.update(tensorboard={"enabled": False}, wandb={"enabled": False}, csv_monitor={"enabled": False},
               comet={"enabled": False}, flops_profiler={"enabled": False}, comms_logger={"enabled": False},
               wall_clock_breakdown=False, train_batch_size=16)
    resolve(raw)


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(gradient_acumulation_steps=4),
     "my.json: unknown key `gradient_acumulation_steps`: DeepSpeed never reads it; did you mean "
     "'gradient_accumulation_steps'?"),
    (lambda r: r["zero_optimization"].update(contiguous_gradient=True),
     "my.json: DeepSpeed's DeepSpeedZeroConfig refuses `contiguous_gradient` (Extra inputs are not permitted)"),
    (lambda r: r["optimizer"].update(type="AdamQ"),
     "my.json: optimizer.type 'AdamQ' is neither a DeepSpeed optimizer nor a torch.optim class; did you mean 'Adam'?"),
    (lambda r: r["scheduler"].update(type="WarmupCosineLRR"),
     "did you mean 'WarmupCosineLR'?"),
])
def test_typos_and_bad_blocks_are_refused_by_name(change, message):
    raw = shipped()
    change(raw)
    with pytest.raises(ConfigError) as info:
        resolve(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_json_array_is_refused_when_read(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([shipped()]))
    with pytest.raises(ConfigError, match=r"list.json holds a JSON list; a DeepSpeed config is one object"):
        read_ds_config(path)
