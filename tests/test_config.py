"""Config loading and every rejection the recipe promises, each with a message naming key and fix."""
from __future__ import annotations

import json
import typing

import pytest

from conftest import ROOT, write_config, write_ds_config
from recipe.config import SECTIONS, ConfigError, config_from_dict, load_config, parameter_counts, parse_override
from recipe.ds_config import read_ds_config, resolve_ds_config
from recipe.model.transformer import TransformerLM
from recipe.train import main as train_main


def test_ready_configs_load():
    for name in ("tiny_moe", "tiny_dense", "internevo_7b_moe"):
        config = load_config(ROOT / "recipe" / "configs" / f"{name}.py")
        assert config.source.endswith(f"{name}.py")


def test_dense_twin_has_the_same_active_parameters():
    moe = load_config(ROOT / "recipe/configs/tiny_moe.py")
    dense = load_config(ROOT / "recipe/configs/tiny_dense.py")
    router = moe.model.num_layers * moe.model.hidden_size * moe.model.num_experts
    assert parameter_counts(moe)["active"] == parameter_counts(dense)["active"] + router
    assert parameter_counts(moe)["total"] > 2 * parameter_counts(dense)["total"]


@pytest.mark.parametrize("overrides", [[], ["model.tie_word_embeddings=True", "model.moe_layer_freq=2",
                                            "model.moe_num_shared_experts=1"],
                                       ["model.num_key_value_heads=2"],  # GQA
                                       ["model.num_key_value_heads=1", "model.head_dim=48"],  # MQA, H·D != C
                                       ["model.qk_norm=head"], ["model.qk_norm=full", "model.num_key_value_heads=2"],
                                       ["model.qkv_bias=True"],
                                       ["model.moe_intermediate_size=96"],
                                       ["model.moe_num_shared_experts=2", "model.moe_shared_expert_intermediate_size=40",
                                        "model.moe_shared_expert_gate=True"],
                                       ["model.moe_dense_first_layers=2"],
                                       ["model.intermediate_size=200", "model.moe_intermediate_size=64",
                                        "model.moe_dense_first_layers=1", "model.moe_layer_freq=2"]])
def test_parameter_count_matches_an_instantiated_model(overrides):
    config = load_config(ROOT / "recipe/configs/tiny_moe.py", overrides)
    model = TransformerLM(config)
    assert parameter_counts(config)["total"] == sum(p.numel() for p in model.parameters())
    # Active: all but the (E - k) / E of each MoE layer's routed expert weights that a token skips.
    m = config.model
    routed = sum(p.numel() for name, p in model.named_parameters() if ".deepspeed_moe.experts." in name)
    skipped = routed * (m.num_experts - m.moe_gate_k) // m.num_experts
    assert parameter_counts(config)["active"] == sum(p.numel() for p in model.parameters()) - skipped


def test_7b_moe_config_parameter_count():
    config = load_config(ROOT / "recipe/configs/internevo_7b_moe.py")
    d, f, v, layers, experts = 4096, 11008, 103168, 32, 4
    assert config.model.ffn_size == f  # InternLM-7B's FFN width from mlp_ratio 8/3 rounded to 256
    per_layer_shared = 4 * d * d + 2 * d + d * experts
    total = 2 * v * d + d + layers * (per_layer_shared + experts * 3 * d * f)
    active = 2 * v * d + d + layers * (per_layer_shared + 2 * 3 * d * f)
    assert parameter_counts(config) == {"total": total, "active": active}
    assert 20.0e9 < total < 20.5e9 and 11.5e9 < active < 11.8e9


def test_set_overrides_and_literal_parsing():
    config = load_config(ROOT / "recipe/configs/tiny_moe.py",
                         ["model.num_experts=16", "loss.moe_loss_coeff=0.1", "train.run_dir=runs/x",
                          "model.moe_noisy_gate_policy=None"])
    assert config.model.num_experts == 16 and config.loss.moe_loss_coeff == 0.1
    assert config.train.run_dir == "runs/x" and config.model.moe_noisy_gate_policy is None
    assert parse_override("model.moe_noisy_gate_policy=RSample") == ("model", "moe_noisy_gate_policy", "RSample")


REJECTED_CONFIGS = [
    ({"model": {"num_expert": 8}}, "unknown key `model.num_expert`; did you mean `model.num_experts`"),
    ({"model": {"num_experts": "8"}}, "`model.num_experts` must be int"),
    ({"model": {"moe_drop_tokens": 1}}, "`model.moe_drop_tokens` must be bool"),
    ({"model": {"num_experts": 2, "moe_gate_k": 2}, "model_type": "INTERNLM_MoE"}, None),  # fine: k == E
    ({"model": {"num_experts": 1, "moe_gate_k": 2}}, "exceeds `model.num_experts`"),
    ({"model": {"moe_gate_k": 0}}, "`model.moe_gate_k` must be >= 1"),
    ({"model": {"moe_gate_k": 8, "num_experts": 8}, "model_type": "INTERNLM_MoE"}, None),  # any k <= E
    ({"model": {"kv_lora_rank": 512}}, "MLA attention"),
    ({"model": {"num_key_value_heads": 3}}, "must divide `model.num_attention_heads`"),
    ({"model": {"moe_num_expert_groups": 3}}, "must divide `model.num_experts`"),
    ({"model": {"moe_use_rts": True, "moe_capacity_priority": "probs"}}, "nothing to decide"),
    ({"model": {"moe_capacity_priority": "prob"}}, "did you mean 'probs'"),
    ({"model": {"moe_capacity_factor": 0.0}}, "`model.moe_capacity_factor` must be > 0"),
    ({"model": {"moe_eval_capacity_factor": -1.0}}, "`model.moe_eval_capacity_factor` must be > 0"),
    ({"model": {"hidden_size": 100, "num_attention_heads": 3}}, "must be divisible by `model.num_attention_heads`"),
    ({"model": {"moe_noisy_gate_policy": "Gauss"}}, "`model.moe_noisy_gate_policy` must be"),
    ({"data": {"seq_len": 1024}}, "`data.seq_len` (1024) must be in 1..model.max_seq_len"),
    ({"train": {"steps": 0}}, "`train.steps` must be > 0"),
    ({"model_type": "GPT"}, "model_type must be one of"),
    ({"optim": {}}, None),  # handled at file level, see below
]


@pytest.mark.parametrize("raw,message", [c for c in REJECTED_CONFIGS if c[1]])
def test_bad_configs_rejected(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)


def test_unknown_top_level_name_and_missing_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("model_type = 'INTERNLM_MoE'\nmodle = dict(num_experts=8)\nSEQ = 3\n")
    with pytest.raises(ConfigError, match="unknown top-level name `modle`.*did you mean `model`"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(num_experts=8\n")
    with pytest.raises(ConfigError, match="failed to run: SyntaxError"):
        load_config(broken)


@pytest.mark.parametrize("text,message", [
    ("model.num_experts", "expected section.key=value"),
    ("num_experts=8", "the key must be section.key"),
    ("optimizer.lr=3", "unknown section `optimizer`"),
])
def test_bad_set_syntax(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(text)


def _ds(**changes):
    raw = json.loads((ROOT / "ds_configs" / "zero2_fp32_ep2.json").read_text())
    raw.update(changes)
    return raw


MOE = config_from_dict({"model": {"num_experts": 8}})
REJECTED_DS = [
    (_ds(moe_recipe={"ep_size": 3}), 2, "does not divide the world size 2"),
    (_ds(moe_recipe={"ep_size": 4}), 4, None),  # fine: 8 experts over EP=4 on 4 ranks
    (_ds(moe_recipe={"ep_size": 2, "ep": 2}), 2, "`moe_recipe` must be an object with keys"),
    (_ds(train_batch_size=64), 2, "train_batch_size 64 != micro batch 8 x gradient accumulation 1"),
    (_ds(zero_optimization={"stage": 3, "zero_hpz_partition_size": 2}), 2, "zero_hpz_partition_size (hpZ"),
    (_ds(zero_optimization={"stage": 3, "zero_quantized_gradients": True}), 2, "quantized gradient reduce-scatter"),
    (_ds(zero_optimization={"stage": 3, "zero_quantized_weights": True}), 2, "quantized weight all-gathers"),
    (_ds(zero_optimization={"stage": 3, "mics_shard_size": 2}), 2, "MiCS sharding"),
    (_ds(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}}), 2, "offload_optimizer is not"),
    (_ds(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}), 2, "offload_param is not"),
    (_ds(pipeline={"stages": 2}), 2, "pipeline parallelism is not supported"),
    (_ds(tensor_parallel={"autotp_size": 2}), 2, "does not divide the data-parallel size 1 (2 ranks / TP 2)"),
    (_ds(tensor_parallel={"autotp_size": 3}), 4, "autotp_size 3 does not divide the 4 ranks"),
    (_ds(tensor_parallel={"autotp_size": 2, "partition_config": {}}), 4, "takes only autotp_size"),
    (_ds(tensor_parallel={"autotp_size": 2}, zero_optimization={"stage": 3}, moe_recipe={"ep_size": 1}), 4,
     "tensor parallelism with ZeRO stage 3 is not supported"),
    (_ds(sequence_parallel_size=2), 2, "sequence parallelism"),
    (_ds(zero_optimization={"stage": 3, "zero_hpz_partition_size": 1, "zero_quantized_weights": False},
         moe_recipe={"ep_size": 4}), 4, None),  # fine: ZeRO-3 with those left off
    (_ds(zero_optimization={"stage": 2, "contiguous_gradients": False}), 2, "needs contiguous_gradients"),
    (_ds(bf16={"enabled": True}, fp16={"enabled": True}), 2, "both enabled"),
    (_ds(train_micro_batch_size_per_gpu=0), 2, "must be a positive integer"),
    ({k: v for k, v in _ds().items() if k != "optimizer"}, 2, "declare the optimizer"),
]


@pytest.mark.parametrize("raw,world,message", REJECTED_DS)
def test_bad_ds_configs_rejected(raw, world, message):
    if message is None:
        assert resolve_ds_config(raw, MOE, world).ep_size == 4
        return
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(raw, MOE, world)
    assert message in str(info.value)


def test_tensor_parallel_json_gets_the_recipes_partition_config():
    """autotp_size 2 on 4 ranks: TP 2, data-parallel size 2 (the global batch counts it), AutoTP told which of
    the recipe's weights to cut; autotp_size 1 is no TP, the block removed."""
    ds = resolve_ds_config(_ds(tensor_parallel={"autotp_size": 2}), MOE, 4)
    assert (ds.tp_size, ds.dp_size(4), ds.global_batch_size(4)) == (2, 2, 16)
    specs = ds.deepspeed["tensor_parallel"]["partition_config"]["layer_specs"]
    assert [spec["partition_type"] for spec in specs] == ["column", "column", "row"]
    none = resolve_ds_config(_ds(tensor_parallel={"autotp_size": 1}), MOE, 2)
    assert none.tp_size == 1 and "tensor_parallel" not in none.deepspeed


@pytest.mark.parametrize("model,message", [
    ({"num_attention_heads": 3, "hidden_size": 48}, "model.num_attention_heads (3) is not divisible"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, "model.num_key_value_heads (1) is not divisible"),
    ({"moe_intermediate_size": 33}, "the expert size (33) is not divisible"),
    ({"qk_norm": "full"}, "does not support model.qk_norm='full'"),
    ({"moe_impl": "deepspeed", "moe_balance_over_data_parallel": False}, "does not support model.moe_impl='deepspeed'"),
])
def test_what_tensor_parallelism_cannot_split_is_refused(model, message):
    config = config_from_dict({"model": {"num_experts": 8, **model}})
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(_ds(tensor_parallel={"autotp_size": 2}, moe_recipe={"ep_size": 1}), config, 2)
    assert message in str(info.value)


def test_experts_not_divisible_by_ep_and_dense_with_ep():
    with pytest.raises(ConfigError, match=r"`model.num_experts` \(5\) is not divisible"):
        resolve_ds_config(_ds(), config_from_dict({"model": {"num_experts": 5}}), 2)
    with pytest.raises(ConfigError, match="has no experts"):
        resolve_ds_config(_ds(), config_from_dict({"model_type": "INTERNLM"}), 2)


def test_ds_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 8,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(bad)


def test_auto_schedule_filled_from_train_steps():
    resolved = resolve_ds_config(_ds(), config_from_dict({"train": {"steps": 400}}), 2)
    assert resolved.deepspeed["scheduler"]["params"]["total_num_steps"] == 400
    assert "moe_recipe" not in resolved.deepspeed


def _run_main(tmp_path, tiny_data, capsys, *args, config_kwargs=None, ds=None):
    config = write_config(tmp_path / "cfg.py", tiny_data, **(config_kwargs or {}))
    ds = ds or write_ds_config(tmp_path / "ds.json", moe_recipe={"ep_size": 1})
    code = train_main(["--config", str(config), "--ds_config", str(ds), "--run_dir", str(tmp_path / "run"), *args])
    return code, capsys.readouterr().err


def test_trainer_rejects_before_starting(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = _run_main(tmp_path, tiny_data, capsys, config_kwargs=dict(model=dict(vocab_size=512)))
    assert code == 2 and "`model.vocab_size` (512) differs from the tokenizer" in err
    code, err = _run_main(tmp_path, tiny_data, capsys, "--set", "model.num_experts=3",
                          ds=write_ds_config(tmp_path / "ep2.json", moe_recipe={"ep_size": 2}))
    assert code == 2 and "not divisible by moe_recipe.ep_size 2" in err
    code, err = _run_main(tmp_path, tiny_data, capsys, "--set", "data.path='/nonexistent/data'")
    assert code == 2 and "make data" in err
    code, err = _run_main(tmp_path, tiny_data, capsys, "--set", "model.max_seq_len=4096",
                          "--set", "data.seq_len=4096")
    assert code == 2 and "fewer than one global micro-batch" in err
    code, err = _run_main(tmp_path, tiny_data, capsys, "--resume")
    assert code == 2 and "no complete checkpoint" in err
    interrupted = tmp_path / "run" / "checkpoints" / "step00000001"
    interrupted.mkdir(parents=True)  # a run killed in its first save: neither resumable nor to be overwritten
    for extra in ((), ("--resume",)):
        code, err = _run_main(tmp_path, tiny_data, capsys, *extra)
        assert code == 2 and "holds only interrupted saves (step00000001)" in err and "delete" in err, err
    (interrupted / "COMPLETE").write_text("step00000001\n")
    code, err = _run_main(tmp_path, tiny_data, capsys)
    assert code == 2 and "already holds checkpoints; pass --resume" in err
    assert interrupted.is_dir()  # nothing was overwritten


def test_unknown_cli_flag_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--num_experts", "8"])
    assert info.value.code == 2
    assert "unrecognized arguments: --num_experts" in capsys.readouterr().err


def test_resume_into_run_of_another_config(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000003").mkdir(parents=True)
    (run / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (run / "checkpoints" / "step00000003" / "COMPLETE").write_text("step00000003")
    (run / "checkpoints" / "latest").write_text("step00000003")
    saved = config_from_dict({"model": {"num_experts": 8}}).to_dict()
    (run / "config.json").write_text(json.dumps({"config": saved}))
    code, err = _run_main(tmp_path, tiny_data, capsys, "--resume")
    assert code == 2 and "trained with another model config" in err and "num_experts" in err


def test_shards_of_another_tokenizer_are_refused(tiny_data, tmp_path, capsys, monkeypatch):
    """The data folder's tokenizer is not the one its shards were made with; and --resume of a run trained on
    another tokenizer's tokens. Both refused before anything starts; the run dir's tokenizer is not replaced."""
    import shutil

    monkeypatch.setenv("WORLD_SIZE", "1")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "tokenizer.model").write_bytes((tiny_data / "tokenizer.model").read_bytes() + b"\0")
    code, err = _run_main(tmp_path, data, capsys)
    assert code == 2 and "is not the tokenizer the token shards" in err and "prepare the data again" in err

    run = tmp_path / "run"
    (run / "checkpoints" / "step00000003").mkdir(parents=True)
    (run / "checkpoints" / "step00000003" / "COMPLETE").write_text("step00000003")
    (run / "tokenizer.model").write_bytes(b"another tokenizer")
    config = write_config(tmp_path / "cfg.py", tiny_data)
    (run / "config.json").write_text(json.dumps({"config": load_config(config).to_dict()}))
    code, err = _run_main(tmp_path, tiny_data, capsys, "--resume")
    assert code == 2 and "made by another tokenizer" in err and "another --run_dir" in err
    assert (run / "tokenizer.model").read_bytes() == b"another tokenizer"


def test_a_config_saved_before_newer_keys_still_loads():
    """config.json / checkpoints written before a key existed (here moe_impl) load with its default, so such
    runs still resume (the trainer compares configs through this) and export."""
    from recipe.config import config_from_dict, config_from_saved

    current = config_from_dict({"model": {"num_experts": 4}}).to_dict()
    older = {**current, "model": {k: v for k, v in current["model"].items() if k != "moe_impl"}}
    assert config_from_saved(older).to_dict() == current


@pytest.mark.parametrize("raw,message", [
    ({"model": {"moe_noisy_gate_policy": "rsample"}},
     "`model.moe_noisy_gate_policy` must be None, 'Jitter' or 'RSample', got 'rsample'; did you mean 'RSample'?"),
    ({"model": {"moe_second_expert_policy": "sample"}},
     "`model.moe_second_expert_policy` must be 'argmax' or 'sampling', got 'sample'; did you mean 'sampling'?"),
    ({"model": {"moe_impl": "DeepSpeed"}}, "`model.moe_impl` must be 'recipe' or 'deepspeed', got 'DeepSpeed'"),
    ({"train": {"wandb": "Offline"}}, "`train.wandb` must be 'offline', 'online' or 'disabled', got 'Offline'"),
    ({"train": {"wandb": True}}, "`train.wandb` must be 'offline', 'online' or 'disabled', got True"),
    ({"model_type": "INTERNLM_MOE"}, "got 'INTERNLM_MOE'; did you mean 'INTERNLM_MoE'?"),
    # String options are checked whatever the model type, not only where they take effect.
    ({"model_type": "INTERNLM", "model": {"moe_second_expert_policy": "top2"}}, "must be 'argmax' or 'sampling'"),
])
def test_string_options_refused_with_their_allowed_values(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)


@pytest.mark.parametrize("section,key", [("model", "moe_noisy_gate_policy"), ("model", "moe_second_expert_policy"),
                                         ("model", "moe_impl"), ("train", "wandb")])
def test_every_value_of_a_string_options_literal_loads(section, key):
    """The Literal annotation is the one list of allowed values: each of them loads."""
    for value in typing.get_args(typing.get_type_hints(SECTIONS[section])[key]):
        raw = {"model": {"moe_balance_over_data_parallel": value != "deepspeed"}}  # DeepSpeed's layer: per rank
        raw.setdefault(section, {})[key] = value
        assert getattr(getattr(config_from_dict(raw), section), key) == value


def test_deepspeeds_moe_layer_is_refused_under_zero3():
    baseline = config_from_dict({"model": {"num_experts": 8, "moe_impl": "deepspeed",
                                           "moe_balance_over_data_parallel": False}})
    with pytest.raises(ConfigError, match="does not run under ZeRO stage 3"):
        resolve_ds_config(_ds(zero_optimization={"stage": 3}), baseline, 2)
