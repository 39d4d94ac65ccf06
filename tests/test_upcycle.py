"""Dense -> MoE upcycling (recipe/upcycle.py): the upcycled model starts as exactly its dense source.

Single process, no DeepSpeed engine. Equality is checked on eval logits (dropless), against negative controls
that break one rule of the scheme each, so the equality is not vacuous.
"""
import json
from pathlib import Path

import pytest
import torch

from recipe.checkpoint import COMPLETE, LATEST, MODEL_FILE, checkpoint_root, step_tag
from recipe.config import ConfigError, RecipeConfig, config_from_dict
from recipe.model.expert_keys import EXPERT_GROUP_PATH, expert_key, local_to_global
from recipe.model.transformer import TransformerLM
from recipe.upcycle import (DENSE_ARCHITECTURE_KEYS, check_upcycle, granularity, read_recipe_run,
                            source_model_dict, upcycle_model_dict, upcycled_state)

DENSE = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
             intermediate_size=64, max_seq_len=32)
SEQ = 16
SOURCE = "runs/dense-test"
TOKENS = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(0))
FINE = dict(num_experts=8, moe_intermediate_size=32, moe_gate_k=4)  # G=2: 4 copies, 2 per token


def dense_source(**changes) -> tuple[RecipeConfig, TransformerLM]:
    config = config_from_dict({"model_type": "INTERNLM", "model": {**DENSE, **changes}, "data": {"seq_len": SEQ}})
    model = TransformerLM(config)
    model.init_weights(seed=3)
    with torch.no_grad():  # norms and biases off their init values (1, 0), so that copying them is tested too
        gen = torch.Generator().manual_seed(11)
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return config, model.eval()


def moe_config(dense_config: RecipeConfig, **user) -> RecipeConfig:
    model = upcycle_model_dict(source_model_dict(dense_config.model), {"moe_drop_tokens": False, **user}, SOURCE)
    return config_from_dict({"model_type": "INTERNLM_MoE", "model": model, "data": {"seq_len": SEQ}})


def load(config: RecipeConfig, state: dict) -> TransformerLM:
    model = TransformerLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def upcycle(dense_config, dense, **user) -> tuple[RecipeConfig, dict]:
    config = moe_config(dense_config, **user)
    return config, upcycled_state(dense.state_dict(), config, 0, config.model.num_experts, seed=7)


def logits(model: TransformerLM) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CASES = {
    "plain E4 k2": dict(num_experts=4, moe_gate_k=2),
    "top1 normalised": dict(num_experts=4, moe_gate_k=1, moe_norm_topk_prob=True),
    "k3 G1 (top-k path)": dict(num_experts=6, moe_gate_k=3),
    "fine G2 E8 k4": FINE,
    "fine G2 E8 k6 (3 copies, top-k path)": dict(FINE, moe_gate_k=6),
    "fine G4 E8 k4": dict(num_experts=8, moe_intermediate_size=16, moe_gate_k=4),
    "fine G4 E16 k8": dict(num_experts=16, moe_intermediate_size=16, moe_gate_k=8),
    "shared expert + gate": dict(FINE, moe_num_shared_experts=2, moe_shared_expert_gate=True),
    "shared expert of its own width": dict(num_experts=4, moe_gate_k=2, moe_num_shared_experts=1,
                                           moe_shared_expert_intermediate_size=48),
    "dense first layer": dict(FINE, moe_dense_first_layers=1),
    "layer freq 2": dict(FINE, moe_layer_freq=2),
    "sigmoid normalised": dict(FINE, moe_score_function="sigmoid", moe_norm_topk_prob=True),
    "bias balancing, groups of whole copies": dict(FINE, moe_bias_update_rate=1e-3, moe_num_expert_groups=2,
                                                   moe_topk_groups=1),
}
SOURCES = {
    "gqa": {},
    "qk_norm head + qkv_bias": dict(qk_norm="head", qkv_bias=True),
    "qk_norm full + tied embeddings, mha": dict(qk_norm="full", tie_word_embeddings=True, num_key_value_heads=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upcycled_model_starts_equal_to_the_dense_model(case):
    dense_config, dense = dense_source()
    config, state = upcycle(dense_config, dense, **CASES[case])
    moe = load(config, state)
    assert max_diff(logits(moe), logits(dense)) < 1e-5
    G = granularity(config)
    with torch.no_grad():
        routing = moe(TOKENS).routing
    assert len(routing) == len(config.moe_layer_ids())
    for stats in routing:  # whole copies: a copy's G slices get the same tokens; several copies are used
        per_copy = stats.tokens_per_expert.view(-1, G)
        assert (per_copy == per_copy[:, :1]).all()
        assert (per_copy[:, 0] > 0).sum() >= 2


@pytest.mark.parametrize("source", list(SOURCES))
def test_attention_variants_of_the_source_are_copied(source):
    dense_config, dense = dense_source(**SOURCES[source])
    for user in (CASES["plain E4 k2"], CASES["shared expert + gate"]):
        config, state = upcycle(dense_config, dense, **user)
        assert max_diff(logits(load(config, state)), logits(dense)) < 1e-5


@pytest.mark.parametrize("user", [
    dict(FINE, moe_noisy_gate_policy="Jitter"),  # the same jitter on the input of every router row
    dict(num_experts=4, moe_gate_k=2, moe_noisy_gate_policy="RSample", moe_second_expert_policy="sampling"),  # G=1
])
def test_training_noise_that_check_upcycle_allows_keeps_the_dense_output(user):
    """In training mode (noise on; dropless, and the model has no dropout) the output is still the dense one."""
    dense_config, dense = dense_source()
    config, state = upcycle(dense_config, dense, **user)
    torch.manual_seed(0)
    assert max_diff(logits(load(config, state).train()), logits(dense)) < 1e-5


def test_state_keys_are_a_real_models_and_dense_tensors_are_copied():
    dense_config, dense = dense_source(qkv_bias=True)
    config, state = upcycle(dense_config, dense, **CASES["bias balancing, groups of whole copies"],
                            moe_num_shared_experts=1, moe_shared_expert_gate=True, moe_dense_first_layers=1)
    reference = TransformerLM(config).state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert state[key].shape == value.shape and state[key].dtype == value.dtype, key
    dense_state = dense.state_dict()
    for key, value in state.items():
        if not key.startswith(("blocks.1.ffn.", "blocks.2.ffn.")) and "shared_" not in key:
            assert torch.equal(value, dense_state[key]), key
    assert not state["blocks.2.ffn.deepspeed_moe.gate.e_score_correction_bias"].any()


def test_expert_slices_router_copies_and_shared_experts():
    dense_config, dense = dense_source()
    config, state = upcycle(dense_config, dense, **CASES["shared expert + gate"])
    w1, w3, w2 = (dense.state_dict()[f"blocks.0.ffn.{n}.weight"] for n in ("w1", "w3", "w2"))
    group = f"blocks.0.ffn.{EXPERT_GROUP_PATH}."
    for e in range(8):  # expert e = slice e % 2 of copy e // 2, its w2 columns times G
        rows = slice(e % 2 * 32, (e % 2 + 1) * 32)
        assert torch.equal(state[expert_key(group, e, "w1.weight")], w1[rows])
        assert torch.equal(state[expert_key(group, e, "w3.weight")], w3[rows])
        assert torch.equal(state[expert_key(group, e, "w2.weight")], 2 * w2[:, rows])
    router = state["blocks.0.ffn.deepspeed_moe.gate.wg.weight"]
    assert torch.equal(router[0::2], router[1::2]) and not torch.equal(router[0], router[2])
    assert not state["blocks.0.shared_mlp.w2.weight"].any() and state["blocks.0.shared_mlp.w1.weight"].std() > 0
    assert state["blocks.0.shared_gate.weight"].std() > 0


def test_random_draws_are_the_recipes_own_init():
    """At G=1 the router and the shared experts' w1, w3 and gate are what TransformerLM.init_weights draws."""
    dense_config, dense = dense_source()
    config, state = upcycle(dense_config, dense, num_experts=4, moe_gate_k=2, moe_num_shared_experts=1,
                            moe_shared_expert_gate=True)
    fresh = TransformerLM(config)
    fresh.init_weights(seed=7)
    for key, value in fresh.state_dict().items():
        if key.endswith(("gate.wg.weight", "shared_mlp.w1.weight", "shared_mlp.w3.weight", "shared_gate.weight")):
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_shards_reassemble_to_the_unsplit_state(ep_size):
    dense_config, dense = dense_source()
    user = dict(CASES["bias balancing, groups of whole copies"], moe_num_shared_experts=1, moe_shared_expert_gate=True)
    config = moe_config(dense_config, **user)
    dense_state = dense.state_dict()
    whole = upcycled_state(dense_state, config, 0, 8, seed=7)
    num_local = 8 // ep_size
    reassembled = {}
    for ep_rank in range(ep_size):
        shard = upcycled_state(dense_state, config, ep_rank, num_local, seed=7)
        TransformerLM(config, ep_size=ep_size).load_state_dict(shard, strict=True)
        for key, value in shard.items():
            reassembled.setdefault(local_to_global(key, ep_rank, num_local), []).append(value)
    assert reassembled.keys() == whole.keys()
    for key, values in reassembled.items():
        assert all(torch.equal(value, whole[key]) for value in values), key


def _unduplicated_router(config: RecipeConfig, state: dict) -> dict:
    gen = torch.Generator().manual_seed(5)
    return {key: (torch.randn(value.shape, generator=gen) * 0.02 if key.endswith("gate.wg.weight") else value)
            for key, value in state.items()}


def _unscaled_w2(config: RecipeConfig, state: dict) -> dict:
    G = granularity(config)
    return {key: (value / G if "deepspeed_experts" in key and key.endswith("w2.weight") else value)
            for key, value in state.items()}


@pytest.mark.parametrize("break_state", [_unduplicated_router, _unscaled_w2])
def test_negative_control_broken_state_is_not_the_dense_model(break_state):
    dense_config, dense = dense_source()
    config, state = upcycle(dense_config, dense, **FINE)
    assert max_diff(logits(load(config, break_state(config, state))), logits(dense)) > 1e-3


@pytest.mark.parametrize("user, broken", [
    (dict(num_experts=8, moe_intermediate_size=16, moe_gate_k=4), dict(moe_gate_k=2)),  # k not scaled with G=4
    (FINE, dict(moe_norm_topk_prob=False)),
    (FINE, dict(moe_route_scale=2.0)),
    (dict(num_experts=4, moe_gate_k=1, moe_norm_topk_prob=True), dict(moe_norm_topk_prob=None)),
    (FINE, dict(moe_noisy_gate_policy="RSample")),  # in training mode, below
    (FINE, dict(moe_second_expert_policy="sampling")),
])
def test_negative_control_refused_routing_is_not_the_dense_model(user, broken):
    """The state of an accepted config, run under a routing option that check_upcycle refuses (noise policies
    in training mode, where they act)."""
    dense_config, dense = dense_source()
    _, state = upcycle(dense_config, dense, **user)
    config = moe_config(dense_config, **{**user, **broken})
    with pytest.raises(ConfigError):
        check_upcycle(config)
    model = load(config, state).train(config.model.moe_noisy_gate_policy is not None
                                      or config.model.moe_second_expert_policy == "sampling")
    torch.manual_seed(0)
    assert max_diff(logits(model), logits(dense)) > 1e-3


def test_upcycled_model_trains():
    dense_config, dense = dense_source()
    config, state = upcycle(dense_config, dense, **CASES["shared expert + gate"])
    model = load(config, state).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 96, (4, SEQ + 1), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(6):
        out = model(batch[:, :-1], batch[:, 1:])
        loss = out.lm_loss + 0.01 * out.moe_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.3  # 4.54 -> 3.85 here
    router = model.blocks[0].ffn.deepspeed_moe.gate.wg.weight
    assert not torch.equal(router[0], router[1])  # the slices of a copy no longer tie: they can specialise
    assert model.blocks[0].shared_mlp.w2.weight.abs().sum() > 0


# ---- refused inputs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("user, message", [
    (dict(num_experts=8, moe_intermediate_size=48, moe_gate_k=2), r"moe_intermediate_size=48` does not divide"),
    (dict(num_experts=6, moe_intermediate_size=16, moe_gate_k=4), r"num_experts=6` is not a multiple of .*G=4"),
    (dict(FINE, moe_gate_k=3), r"moe_gate_k=3` is not a multiple of .*G=2.*set moe_gate_k=2"),
    (dict(FINE, moe_norm_topk_prob=False), r"moe_norm_topk_prob=False`.*set moe_norm_topk_prob=True"),
    (dict(FINE, moe_score_function="sigmoid", moe_norm_topk_prob=False), r"raw sigmoid scores"),
    (dict(num_experts=4, moe_gate_k=1), r"moe_norm_topk_prob=None` with moe_gate_k=1.*set moe_norm_topk_prob=True"),
    (dict(FINE, moe_route_scale=2.5), r"moe_route_scale=2.5`.*set moe_route_scale=1.0"),
    (dict(num_experts=12, moe_intermediate_size=32, moe_gate_k=4, moe_num_expert_groups=4, moe_topk_groups=2),
     r"moe_num_expert_groups=4` makes groups of 3 experts"),
    (dict(FINE, moe_noisy_gate_policy="RSample"), r"moe_noisy_gate_policy='RSample'` with granularity G=2"),
    (dict(FINE, moe_second_expert_policy="sampling"), r"moe_second_expert_policy='sampling'` with granularity G=2"),
    (dict(FINE, moe_expert="my_expert"), r"moe_expert='my_expert'`.*set moe_expert='swiglu'"),
    (dict(FINE, moe_gate="my_gate"), r"moe_gate='my_gate'`.*set moe_gate='gshard'"),
    (dict(num_experts=4, moe_gate_k=2, moe_impl="deepspeed", moe_balance_over_data_parallel=False),
     r"moe_impl='deepspeed'`.*set moe_impl='recipe'"),
])
def test_check_upcycle_refuses(user, message):
    dense_config, dense = dense_source()
    config = moe_config(dense_config, **user)
    with pytest.raises(ConfigError, match=message):
        check_upcycle(config)
    with pytest.raises(ConfigError, match=message):
        upcycled_state(dense.state_dict(), config, 0, config.model.num_experts, seed=0)


def test_check_upcycle_refuses_a_dense_target_and_allows_noise_at_g1():
    dense_config, _ = dense_source()
    with pytest.raises(ConfigError, match=r"model_type='INTERNLM'`.*set model_type='INTERNLM_MoE'"):
        check_upcycle(dense_config)
    check_upcycle(moe_config(dense_config, num_experts=4, moe_gate_k=2, moe_noisy_gate_policy="RSample",
                             moe_second_expert_policy="sampling"))  # every expert is the whole dense FFN


@pytest.mark.parametrize("user, message", [
    (dict(hidden_size=64), r"^`model.hidden_size=64` differs from the upcycling source runs/dense-test "
                           r"\(hidden_size=32\); drop the key: the architecture comes from the source$"),
    (dict(num_key_value_heads=None), r"num_key_value_heads=None` differs .*num_key_value_heads=2"),
    (dict(head_dim=16), r"head_dim=16` differs .*head_dim=8"),
    (dict(qk_norm="head"), r"qk_norm='head'` differs .*qk_norm='none'"),
    (dict(tie_word_embeddings=True), r"tie_word_embeddings=True` differs"),
    (dict(rope_theta=5e5), r"rope_theta=500000.0` differs"),
    (dict(intermediate_size=128), r"intermediate_size=128` differs .*intermediate_size=64"),
    (dict(mlp_ratio=4.0), r"mlp_ratio=4.0` gives a dense FFN width of 128.*intermediate_size=64; drop the key"),
    (dict(max_seq_len=64), r"max_seq_len=64` exceeds the upcycling source .*max_seq_len=32.*lower it or drop"),
])
def test_upcycle_model_dict_refuses(user, message):
    dense_config, _ = dense_source()
    with pytest.raises(ConfigError, match=message):
        upcycle_model_dict(source_model_dict(dense_config.model), user, SOURCE)


def test_upcycle_model_dict_merges():
    dense_config, _ = dense_source(qk_norm="head", rope_theta=5e5)
    source = source_model_dict(dense_config.model)
    user = dict(hidden_size=32, num_key_value_heads=2, head_dim=8, rope_theta=500000, mlp_ratio=2.0,
                multiple_of=32, max_seq_len=16, num_experts=8, moe_intermediate_size=32, moe_gate_k=4,
                init_std=0.01)
    merged = upcycle_model_dict(source, user, SOURCE)
    assert {key: merged[key] for key in DENSE_ARCHITECTURE_KEYS} == {key: source[key] for key in
                                                                     DENSE_ARCHITECTURE_KEYS}
    assert merged["max_seq_len"] == 16 and merged["init_std"] == 0.01 and merged["num_experts"] == 8
    assert upcycle_model_dict(source, {}, SOURCE)["max_seq_len"] == 32
    with pytest.raises(ConfigError, match=r"gives no model.qk_norm; its reader must resolve"):
        upcycle_model_dict({k: v for k, v in source.items() if k != "qk_norm"}, {}, SOURCE)
    unresolved = dict(source, num_key_value_heads=None, head_dim=None, intermediate_size=None, mlp_ratio=2.0,
                      num_attention_heads=4)  # a source with None values: resolved the config's way
    resolved = upcycle_model_dict(unresolved, {}, SOURCE)
    assert (resolved["num_key_value_heads"], resolved["head_dim"], resolved["intermediate_size"]) == (4, 8, 64)


def test_upcycled_state_refuses_a_mismatched_dense_state_or_layout():
    dense_config, _ = dense_source()
    _, wider = dense_source(intermediate_size=128)
    config = moe_config(dense_config, **FINE)
    with pytest.raises(ValueError, match=r"blocks.0.ffn.w1.weight is \(128, 32\).*expects \(64, 32\)"):
        upcycled_state(wider.state_dict(), config, 0, 8, seed=0)
    _, dense = dense_source()
    with pytest.raises(ValueError, match=r"num_local_experts=3 must divide model.num_experts=8"):
        upcycled_state(dense.state_dict(), config, 0, 3, seed=0)
    with pytest.raises(ValueError, match=r"ep_rank=2 out of range for ep_size=2"):
        upcycled_state(dense.state_dict(), config, 2, 4, seed=0)


# ---- a dense recipe run as the source ------------------------------------------------------------------------

def _fake_run(run_dir: Path, config: RecipeConfig, state: dict) -> None:
    """The files consolidated_state_dict reads: one committed checkpoint (a dense model has no expert files)."""
    tag = step_tag(4)
    folder = checkpoint_root(run_dir) / tag
    folder.mkdir(parents=True)
    torch.save({"module": state, "config": config.to_dict(), "num_experts": []}, folder / MODEL_FILE)
    (folder / COMPLETE).write_text(f"{tag}\n")
    (checkpoint_root(run_dir) / LATEST).write_text(tag)


def test_read_recipe_run_upcycles_a_saved_dense_run(tmp_path):
    dense_config, dense = dense_source(intermediate_size=None, multiple_of=32)  # width from mlp_ratio: 96
    saved = {key: value.bfloat16() for key, value in dense.state_dict().items()}  # as a bf16 run saves it
    _fake_run(tmp_path / "run", dense_config, saved)
    source, state = read_recipe_run(tmp_path / "run")
    assert (source["intermediate_size"], source["num_key_value_heads"], source["head_dim"]) == (96, 2, 8)
    assert all(value.dtype == torch.float32 for value in state.values())
    dense.load_state_dict(state)  # the bf16-rounded dense model is the reference
    model = upcycle_model_dict(source, dict(num_experts=6, moe_intermediate_size=32, moe_gate_k=6,
                                            moe_drop_tokens=False), str(tmp_path / "run"))
    config = config_from_dict({"model_type": "INTERNLM_MoE", "model": model, "data": {"seq_len": SEQ}})
    assert granularity(config) == 3
    moe = load(config, upcycled_state(state, config, 0, 6, seed=0))
    assert max_diff(logits(moe), logits(dense)) < 1e-5


def test_read_recipe_run_refuses_moe_runs_and_folders_without_checkpoints(tmp_path):
    dense_config, _ = dense_source()
    moe_run = moe_config(dense_config, **FINE)
    _fake_run(tmp_path / "moe", moe_run, TransformerLM(moe_run).state_dict())
    with pytest.raises(ConfigError, match=r"is a model_type='INTERNLM_MoE' run; upcycling starts from a dense one"):
        read_recipe_run(tmp_path / "moe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no complete checkpoint in .*save one"):
        read_recipe_run(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"is not a folder"):
        read_recipe_run(tmp_path / "missing")


def test_init_from_upcycles_a_recipe_run_as_the_trainer_does(tmp_path):
    """``train.init_from = "upcycle:RUN"``: the config takes the run's architecture (from its config.json) and the
    trainer's weight loading gives the dense model's logits; a key that changes the architecture is refused."""
    from recipe.training.build import load_initial_weights

    dense_config, dense = dense_source()
    _fake_run(tmp_path / "run", dense_config, dense.state_dict())
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": dense_config.to_dict()}))
    raw = {"data": {"seq_len": SEQ}, "train": {"init_from": f"upcycle:{tmp_path / 'run'}"}}
    config = config_from_dict({**raw, "model": FINE})
    assert (config.model.hidden_size, config.model.intermediate_size, config.is_moe) == (32, 64, True)
    assert config.model.moe_drop_tokens is False  # upcycling defaults to dropless: a drop breaks the equality
    model = TransformerLM(config)
    model.init_weights(config.train.seed)
    load_initial_weights(model, config, ep_rank=0)
    assert max_diff(logits(model.eval()), logits(dense)) < 1e-5
    differs = r"`model.hidden_size=64` differs from the upcycling source .*/run \(hidden_size=32\); drop the key"
    with pytest.raises(ConfigError, match=differs):
        config_from_dict({**raw, "model": {**FINE, "hidden_size": 64}})
    with pytest.raises(ConfigError, match="moe_gate_k"):
        config_from_dict({**raw, "model": {**FINE, "moe_gate_k": 3}})  # not a multiple of the granularity 2
