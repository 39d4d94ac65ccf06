"""recipe.memory: the per-rank estimate against what real DeepSpeed engines hold, the activation estimate against
the tensors autograd saves, the ZeRO arithmetic, and the command line.

Engines run on one rank, in a process of their own (a gloo process group; the test process stays without one).
Each case builds the trainer's engine (``build_job``), runs forward/backward/step once (the optimizer's moments
exist from then on), then a second forward/backward, measuring at the backward's peak (entering the gradient
all-reduce and ZeRO's reduction epilogue), after it, and inside the optimizer's step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, TINY_MODEL, _free_port, write_config, write_ds_config
from recipe.config import config_from_dict, load_config, parameter_counts
from recipe.ds_config import DSConfig
from recipe.memory import RankMemory, activation_bytes, estimate, main, parameter_shapes
from recipe.model.expert_keys import is_expert_parameter

SCHEDULE = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}}
SMALL_BUCKET = {"reduce_bucket_size": 20_000}  # elements: fewer than the tiny model's 96,672 gradients
# Engine cases: (ds_config base, zero_optimization changes). 1/2 in fp32 with a bucket smaller than the model,
# so that the backward-peak comparison is not the default 5e8-element bucket alone; ZeRO-3 (ShardedMoE) needs
# a ds_config check that accepts stage 3 with MoE.
ENGINE_CASES = {
    "zero0_fp32": ("zero0_fp32.json", {}), "zero0_bf16": ("zero0_bf16.json", {}),
    "zero1_fp32": ("zero1_fp32.json", SMALL_BUCKET), "zero1_bf16": ("zero1_bf16.json", {}),
    "zero2_fp32": ("zero2_fp32.json", SMALL_BUCKET), "zero2_bf16": ("zero2_bf16.json", {}),
    "zero3_fp32": ("zero2_fp32.json", {"stage": 3}), "zero3_bf16": ("zero2_bf16.json", {"stage": 3}),
}


def _measure_case(argv: list[str]) -> dict:
    """One engine: RankMemory after a backward, the largest at the backward's peak and inside the optimizer step,
    and the largest flat copy the ZeRO-0 all-reduce made."""
    from recipe.memory import measure_engine
    from recipe.train import parse_args
    from recipe.training.build import build_job
    from recipe.training.distributed import Ranks
    from recipe.training.plan import plan_run

    plan = plan_run(parse_args(argv))
    engine = build_job(plan, Ranks(rank=0, world_size=1)).engine
    peaks: dict[str, RankMemory] = {}

    def measured_before(owner, method: str, label: str) -> None:
        original = getattr(owner, method)

        def wrapper(*args, **kwargs):
            now = measure_engine(engine)
            if label not in peaks or now.grads + now.buffers > peaks[label].grads + peaks[label].buffers:
                peaks[label] = now
            return original(*args, **kwargs)
        setattr(owner, method, wrapper)

    measured_before(engine, "allreduce_gradients", "backward")
    if hasattr(engine.optimizer, "independent_gradient_partition_epilogue"):
        measured_before(engine.optimizer, "independent_gradient_partition_epilogue", "backward")
    measured_before(engine.basic_optimizer, "step", "step")
    flat_copies = []  # bytes of each flat copy the ZeRO-0 all-reduce makes of a bucket of gradients
    allreduce_bucket = engine.allreduce_bucket

    def recorded_allreduce_bucket(bucket, *args, **kwargs):
        flat_copies.append(sum(t.numel() * t.element_size() for t in bucket))
        return allreduce_bucket(bucket, *args, **kwargs)
    engine.allreduce_bucket = recorded_allreduce_bucket
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (plan.ds.micro_batch_size, plan.config.data.seq_len),
                           generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second backward and step see the moments the first step created
        peaks.clear()
        flat_copies.clear()
        engine.backward(engine(tokens, tokens).lm_loss)
        after = measure_engine(engine)
        engine.step()
    return {"estimate": dataclasses.asdict(estimate(plan.config, plan.ds, 1, device_type="cpu")),
            "after": dataclasses.asdict(after), "peaks": {k: dataclasses.asdict(v) for k, v in peaks.items()},
            "flat_copy": max(flat_copies, default=0)}


def _worker(rank: int, port: int, cases: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_SIZE="1")
    import deepspeed

    from recipe.config import ConfigError

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for name, argv in cases.items():
        try:
            results[name] = _measure_case(argv)
        except ConfigError as exc:  # e.g. a tree whose ds_config still refuses ZeRO-3 with MoE
            results[name] = {"error": str(exc)}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def engines(tiny_data, tmp_path_factory) -> dict:
    """{case: figures} of ENGINE_CASES on the tiny MoE (ep_size 1, micro-batch 2 x 16 tokens), one process."""
    tmp = tmp_path_factory.mktemp("memory")
    config = write_config(tmp / "cfg.py", tiny_data)
    cases = {}
    for name, (base, zero) in ENGINE_CASES.items():
        zero_optimization = {**json.loads((ROOT / "ds_configs" / base).read_text())["zero_optimization"], **zero}
        ds = write_ds_config(tmp / f"{name}.json", base=base, scheduler=SCHEDULE, train_micro_batch_size_per_gpu=2,
                             moe_recipe={"ep_size": 1}, zero_optimization=zero_optimization)
        cases[name] = ["--config", str(config), "--ds_config", str(ds), "--run_dir", str(tmp / f"run_{name}")]
    out_path = tmp / "results.pt"
    mp.spawn(_worker, args=(_free_port(), cases, str(out_path)), nprocs=1, join=True)
    return torch.load(out_path, weights_only=False)


def _close(estimated: int, measured: int, rel: float = 0.10) -> bool:
    return abs(estimated - measured) <= rel * max(measured, 1)


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_estimate_matches_what_the_engine_holds(engines, name):
    result = engines[name]
    assert "error" not in result, result.get("error")
    est, after, peaks = result["estimate"], result["after"], result["peaks"]
    for field in ("dense_params", "expert_params", "grads", "optimizer"):
        assert _close(est[field], after[field]), (name, field, est[field], after[field])
    # The backward's peak: gradients plus the reduce bucket (ZeRO 1-3) and ZeRO-1's not yet reduced gradients;
    # the ZeRO-0 all-reduce's flat copy is made inside one call, so its size is recorded there.
    backward = peaks["backward"]["grads"] + peaks["backward"]["buffers"]
    if name.startswith("zero0"):
        assert _close(est["buffers"], result["flat_copy"]), (name, est["buffers"], result["flat_copy"])
    else:  # (ZeRO-3 gathers nothing on one rank: each partition is its whole parameter)
        assert _close(est["grads"] + est["buffers"], backward), (name, est, peaks["backward"])
    # Inside the step: fp32 gradient copies (all of them for ZeRO-0 bf16; one group's, at most, for ZeRO-1/2).
    step_extra = peaks["step"]["grads"] - after["grads"]
    assert step_extra <= est["step_buffers"] * 1.1 + 64, (name, step_extra, est["step_buffers"])
    if name in ("zero0_bf16", "zero3_fp32", "zero3_bf16"):
        assert _close(est["step_buffers"], step_extra), (name, step_extra, est["step_buffers"])


@pytest.mark.multirank
def test_a_misattributed_estimate_is_caught(engines, monkeypatch):
    """Negative control: with every parameter counted as dense, the same comparison fails by far."""
    import recipe.memory

    monkeypatch.setattr(recipe.memory, "is_expert_parameter", lambda name: False)
    config = config_from_dict({"model_type": "INTERNLM_MoE", "model": TINY_MODEL, "data": {"seq_len": 16}})
    measured = engines["zero0_fp32"]["after"]
    wrong = estimate(config, _ds(0, "fp32", ep_size=1, micro_batch=2), 1)
    assert not _close(wrong.dense_params, measured["dense_params"])
    assert not _close(wrong.expert_params, measured["expert_params"])


def _ds(stage: int, precision: str, ep_size: int, micro_batch: int = 1, **zero) -> DSConfig:
    """A resolved ds_config written out directly (no world-size checks): what the arithmetic tests need."""
    deepspeed = {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": stage, **zero}}
    if precision != "fp32":
        deepspeed[precision] = {"enabled": True}
    return DSConfig(path="<test>", deepspeed=deepspeed, ep_size=ep_size, precision=precision, zero_stage=stage,
                    micro_batch_size=micro_batch, grad_accum_steps=1)


def test_zero_stages_divide_what_they_should():
    """ZeRO-2 at 4 ranks holds a quarter of ZeRO-0's gradients plus the parameters crossing its partition's edges,
    kept whole (here the 0.5M-element embedding or head: 0.33), and 3/8 of its optimizer bytes (master + 2 moments
    over 4 ranks, against 2 moments whole); parameters stay whole."""
    config = load_config(ROOT / "recipe" / "configs" / "tiny_finegrained.py")
    zero0, zero2 = estimate(config, _ds(0, "fp32", 1), 4), estimate(config, _ds(2, "fp32", 1), 4)
    assert zero2.params == pytest.approx(zero0.params, rel=1e-3)
    assert 0.25 <= zero2.grads / zero0.grads <= 0.35
    assert zero2.optimizer / zero0.optimizer == pytest.approx(3 / 8, rel=1e-3)
    assert zero0.buffers < zero0.grads and zero2.buffers == 500_000_000 * 4  # flat copy; the default bucket


def test_expert_bytes_at_zero3_and_zero1():
    """World 4, ep 2: ZeRO-3 partitions each rank's experts over its 2-rank expert-data-parallel group (total / 4
    per rank); ZeRO-1 keeps them whole (total / 2)."""
    config = load_config(ROOT / "recipe" / "configs" / "tiny_moe.py")
    total_expert_bytes = 2 * sum(torch.Size(shape).numel() for name, shape in parameter_shapes(config, ep_size=1)
                                 if is_expert_parameter(name))
    zero3 = estimate(config, _ds(3, "bf16", 2, stage3_param_persistence_threshold=0), 4)
    zero1 = estimate(config, _ds(1, "bf16", 2), 4)
    assert zero3.expert_params == total_expert_bytes // 4
    assert zero1.expert_params == pytest.approx(total_expert_bytes / 2, abs=2 * 2 * 2)  # flat padded to 2·dp


def test_a_gradient_view_holds_its_whole_storage():
    """ZeRO-1/2 after backward: the step's partition slices (``averaged_gradients``) are the only references to the
    buffer of whole gradients crossing the partition; the buffer counts whole, as gradients, while what another
    category claims of a storage that a gradient views stays that category's."""
    from types import SimpleNamespace

    from recipe.memory import measure_engine

    module = torch.nn.Linear(4, 2, bias=False)
    grads_in_partition = torch.zeros(10)
    optimizer = {"averaged_gradients": {0: [grads_in_partition[2:6], torch.zeros(3)]}}
    measured = measure_engine(SimpleNamespace(module=module, optimizer=optimizer))
    assert measured.grads == (10 + 3) * 4 and measured.dense_params == 8 * 4
    state = torch.zeros(10)  # optimizer state that a gradient views stays optimizer state
    optimizer = {"state": {0: {"exp_avg": state}}, "averaged_gradients": {0: [state[2:6]]}}
    measured = measure_engine(SimpleNamespace(module=module, optimizer=optimizer))
    assert measured.grads == 0 and measured.optimizer == 10 * 4


def test_zero2_rank_holds_whole_crossing_gradients_and_zero_padding():
    """Params of 5 and 2 elements over 4 ranks: flat 8 (padded to 2·dp), partitions of 2. Rank 0 holds the first
    param whole; rank 2 both (each crosses it); rank 3 the second whole plus 1 zero for the padding it covers."""
    from recipe.memory import _flat_group, _grads_in_partition, _ShapeParam

    group = [_ShapeParam("a.weight", (5,), False), _ShapeParam("b.weight", (2,), False)]
    starts, flat = _flat_group(group, 4, 1)
    assert (starts, flat) == ([0, 5], 8)
    assert [_grads_in_partition(group, starts, 2, r) for r in range(4)] == [(5, 0), (5, 0), (7, 0), (2, 1)]


SHAPE_CONFIGS = {
    "tiny_moe, ep 2": ("tiny_moe.py", [], 2),
    "tiny_finegrained": ("tiny_finegrained.py", [], 1),
    "tiny_dense": ("tiny_dense.py", [], 1),
    "qk norm, GQA, qkv bias, tied, shared gate, dense first": (
        "tiny_moe.py", ["model.qk_norm='head'", "model.num_key_value_heads=2", "model.qkv_bias=True",
                        "model.tie_word_embeddings=True", "model.moe_num_shared_experts=1",
                        "model.moe_shared_expert_gate=True", "model.moe_dense_first_layers=1"], 1),
    "full qk norm, head_dim, every 2nd layer": (
        "tiny_moe.py", ["model.qk_norm='full'", "model.head_dim=16", "model.moe_layer_freq=2"], 2),
    "DeepSpeed's layer": ("tiny_moe.py", ["model.moe_impl='deepspeed'", "model.moe_balance_over_data_parallel=False"],
                          2),
}


@pytest.mark.parametrize("name", list(SHAPE_CONFIGS))
def test_parameter_shapes_are_the_models(name):
    from recipe.model.transformer import TransformerLM

    file, overrides, ep_size = SHAPE_CONFIGS[name]
    config = load_config(ROOT / "recipe" / "configs" / file, overrides)
    model = TransformerLM(config, ep_size=ep_size)
    assert parameter_shapes(config, ep_size) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    total = sum(torch.Size(shape).numel() for _, shape in parameter_shapes(config, ep_size=1))
    assert total == parameter_counts(config)["total"]


def _saved_bytes(config, micro_batch: int, dtype: torch.dtype) -> int:
    """Bytes of the unique storages autograd saves in one training forward (parameters excluded), plus the logits."""
    from recipe.model.transformer import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(config).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, config.model.vocab_size, (micro_batch, config.data.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(tokens, tokens)
    saved[out.logits.untyped_storage().data_ptr()] = out.logits.untyped_storage().nbytes()
    return sum(saved.values())


ACTIVATION_CASES = {
    "tiny MoE fp32": (None, [], torch.float32),
    "tiny MoE bf16": (None, [], torch.bfloat16),
    "tiny MoE, checkpointing": (None, ["model.checkpoint=True"], torch.float32),
    "fine-grained, shared expert, k=4": ("tiny_finegrained.py", [], torch.float32),
    "dense": ("tiny_dense.py", [], torch.bfloat16),
    "qk norm, GQA, shared gate": ("tiny_moe.py", ["model.qk_norm='head'", "model.num_key_value_heads=2",
                                                  "model.moe_num_shared_experts=1", "model.moe_shared_expert_gate=True",
                                                  "data.seq_len=64"], torch.bfloat16),
}


@pytest.mark.parametrize("name", list(ACTIVATION_CASES))
def test_activation_estimate_is_what_autograd_saves(name):
    file, overrides, dtype = ACTIVATION_CASES[name]
    if file is None:
        raw = {"model_type": "INTERNLM_MoE", "model": TINY_MODEL, "data": {"seq_len": 16}}
        config = config_from_dict(raw, overrides)
    else:
        config = load_config(ROOT / "recipe" / "configs" / file, overrides)
    estimated = activation_bytes(config, 2, 4 if dtype == torch.float32 else 2, device_type="cpu")
    assert estimated.saved == pytest.approx(_saved_bytes(config, 2, dtype), rel=0.15)
    assert estimated.peak > estimated.saved


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(ROOT / "recipe" / "configs" / "qwen3_moe_30b_a3b.py"), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("nproc, ep_size, ds_config", [(8, 8, "zero1_bf16_ep2.json"), (64, 8, "zero2_bf16.json")])
def test_the_command_plans_the_30b_model(capsys, nproc, ep_size, ds_config):
    code, out, err = _plan(capsys, "--ds_config", str(ROOT / "ds_configs" / ds_config), "--nproc", str(nproc),
                           "--ep_size", str(ep_size))
    assert code == 0, err
    header, *rows = out.splitlines()
    total_params = float(header.split(" params")[0].split()[-1].rstrip("M")) * 1e6
    assert total_params / 1e9 == pytest.approx(30.5, rel=0.01)  # the config's documented ~30.5B
    assert f"{nproc} ranks, ep_size {ep_size}" in header
    labels = [row.split("  ")[1].strip() for row in rows[1:]]
    assert labels == ["parameters, dense", "parameters, experts", "gradients", "optimizer state",
                      "communication buffers", "activations", "optimizer step", "total"]
    assert f"{128 // ep_size} of 128 per MoE layer" in out


@pytest.mark.parametrize("args, problem", [
    (["--ds_config", "ds_configs/nope.json", "--nproc", "8"], "ds_configs/nope.json not found"),
    (["--ds_config", str(ROOT / "ds_configs" / "zero1_bf16_ep2.json"), "--nproc", "8", "--ep_size", "3"],
     "does not divide"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, problem):
    code, out, err = _plan(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and problem in err and err.startswith("error: ")


# ---- tensor parallelism -----------------------------------------------------------------------------------------

# Small enough to count by hand: M 32, 4 heads of 8 (q 32 rows), 2 kv heads (k, v 16 rows each), a dense block 0
# (F 48) and an MoE block 1 (4 experts of F 16, one shared expert of 24, its gate), qkv bias, per-head q/k norms.
TP_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                qk_norm="head", qkv_bias=True, vocab_size=64, max_seq_len=16, intermediate_size=48,
                moe_dense_first_layers=1, num_experts=4, moe_gate_k=2, moe_intermediate_size=16,
                moe_num_shared_experts=1, moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True)
# Elements on one TP rank. Whole on every TP rank: embedding and lm_head (64 x 32 each), final norm, the two
# norms of each block, q_norm/k_norm (8 each), the router (4 x 32), shared_gate (32).
TP_REPLICATED = 2 * 64 * 32 + 32 + 2 * 2 * 32 + 2 * 2 * 8 + 4 * 32 + 32
# Split over TP: per block wqkv (64 x 32, bias 64) and wo (32 x 32); block 0's FFN 3 x 48 x 32; the shared expert
# 3 x 24 x 32.
TP_SHARDED = 2 * (64 * 32 + 64 + 32 * 32) + 3 * 48 * 32 + 3 * 24 * 32


def _tp_config(**model):
    return config_from_dict({"model_type": "INTERNLM_MoE", "model": {**TP_MODEL, **model}, "data": {"seq_len": 16}})


def test_tp_shapes_halve_attention_ffn_and_experts_not_the_rest():
    config = _tp_config()
    whole, half = dict(parameter_shapes(config, 2)), dict(parameter_shapes(config, 2, tp_size=2))
    assert half["blocks.0.attention.wqkv.weight"] == (32, 32)  # (16 q + 8 k + 8 v rows) of 64
    assert half["blocks.0.attention.wqkv.bias"] == (32,)
    assert half["blocks.1.attention.wo.weight"] == (32, 16)
    assert half["blocks.0.ffn.w1.weight"] == half["blocks.0.ffn.w3.weight"] == (24, 32)
    assert half["blocks.0.ffn.w2.weight"] == (32, 24)
    assert half["blocks.1.shared_mlp.w1.weight"] == (12, 32) and half["blocks.1.shared_mlp.w2.weight"] == (32, 12)
    experts = "blocks.1.ffn.deepspeed_moe.experts."
    assert half[f"{experts}w1"] == half[f"{experts}w3"] == (2, 8, 32) and half[f"{experts}w2"] == (2, 32, 8)
    replicated = ["embedding.weight", "lm_head.weight", "norm.weight", "blocks.0.attention_norm.weight",
                  "blocks.1.ffn_norm.weight", "blocks.0.attention.q_norm.weight", "blocks.1.attention.k_norm.weight",
                  "blocks.1.ffn.deepspeed_moe.gate.wg.weight", "blocks.1.shared_gate.weight"]
    assert all(half[name] == whole[name] for name in replicated)
    assert list(half) == list(whole)  # the same parameters, in the model's order
    dense = sum(math.prod(shape) for name, shape in half.items() if not is_expert_parameter(name))
    assert dense == TP_REPLICATED + TP_SHARDED // 2


def test_tp_bytes_by_hand_at_zero0_and_zero2():
    """8 ranks, tp 2, ep 2: dp 4, expert-data-parallel 2; this rank's experts are (E/ep)·3·M·F/tp = 2·3·32·8.
    ZeRO-0 holds it all, moments whole; ZeRO-2 partitions the fp32 master and both moments over dp (dense) and 2
    (experts). Every size here is a multiple of 2·dp, so no flat group is padded."""
    config = _tp_config()
    dense, expert = TP_REPLICATED + TP_SHARDED // 2, (4 // 2) * 3 * 32 * (16 // 2)
    zero0 = estimate(config, dataclasses.replace(_ds(0, "fp32", 2), tp_size=2), 8)
    assert (zero0.dense_params, zero0.expert_params) == (dense * 4, expert * 4)
    assert zero0.grads == (dense + expert) * 4 and zero0.optimizer == (dense + expert) * 4 * 2
    zero2 = estimate(config, dataclasses.replace(_ds(2, "fp32", 2), tp_size=2), 8)
    assert (zero2.dense_params, zero2.expert_params) == (dense * 4, expert * 4)
    assert zero2.optimizer == (dense // 4 + expert // 2) * 4 * 3


def test_tp2_against_tp1_at_the_same_data_parallel_size():
    """tp 2 on 8 ranks against tp 1 on 4 ranks (dp 4, ep 2 both): the split half of the dense parameters and half
    of the experts go, with their gradients and optimizer state; the residual stream, router and logits stay, so
    activations shrink by less than half, by exactly twice as much as from tp 2 to tp 4 (with 4 kv heads)."""
    config = _tp_config()
    ds = _ds(1, "bf16", 2, micro_batch=2)
    tp1, tp2 = estimate(config, ds, 4), estimate(config, dataclasses.replace(ds, tp_size=2), 8)
    assert tp1.dense_params - tp2.dense_params == TP_SHARDED // 2 * 2
    assert tp2.expert_params * 2 == tp1.expert_params
    assert tp2.optimizer < tp1.optimizer and tp2.grads < tp1.grads
    four_kv_heads = _tp_config(num_key_value_heads=4)
    activations = [activation_bytes(four_kv_heads, 2, 2, 2, "cpu", tp_size=tp).peak for tp in (1, 2, 4)]
    assert activations[0] / 2 < activations[1] < activations[0]
    assert activations[0] - activations[1] == 2 * (activations[1] - activations[2])
    assert tp2.activations == activation_bytes(config, 2, 2, 2, "cuda", tp_size=2).peak
    with pytest.raises(ValueError, match=r"tp_size 4: model.num_key_value_heads \(2\) is not divisible"):
        activation_bytes(config, 2, 2, 2, "cpu", tp_size=4)


def test_tp_peers_hold_the_same_and_tp1_is_unchanged():
    """ZeRO-2 ranks 2k and 2k+1 are TP peers (TP is the innermost group): data-parallel rank k. tp 1 keeps the
    estimate it had (DSConfig's default)."""
    config = _tp_config()
    ds = dataclasses.replace(_ds(2, "fp32", 2), tp_size=2)
    per_rank = [estimate(config, ds, 8, rank=r).grads for r in range(8)]
    assert per_rank[0::2] == per_rank[1::2] and estimate(config, ds, 8).grads == max(per_rank)
    assert estimate(config, dataclasses.replace(ds, tp_size=1), 4) == estimate(config, _ds(2, "fp32", 2), 4)


@pytest.mark.parametrize("world, tp, ep, stage, model, problem", [
    (8, 3, 1, 1, {}, "tp_size 3 does not divide the world size 8"),
    (4, 2, 4, 1, {}, "ep_size 4 does not divide the data-parallel size 2 (4 ranks / tp_size 2)"),
    (8, 2, 2, 3, {}, "ZeRO-3 with tp_size 2 is refused"),
    (8, 4, 2, 1, {}, "tp_size 4: model.num_key_value_heads (2) is not divisible"),
    (8, 2, 2, 1, {"moe_intermediate_size": 15}, "tp_size 2: the expert size (15) is not divisible"),
    (8, 2, 2, 1, {"qk_norm": "full"}, "does not support model.qk_norm='full'"),
])
def test_tp_layouts_the_trainer_refuses_are_refused(world, tp, ep, stage, model, problem):
    from recipe.config import ConfigError

    ds = dataclasses.replace(_ds(stage, "bf16", ep), tp_size=tp)
    with pytest.raises(ConfigError) as caught:
        estimate(_tp_config(**model), ds, world)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_the_command_plans_the_30b_model_with_tp(capsys):
    ds_config = str(ROOT / "ds_configs" / "zero1_bf16_ep2.json")
    rows = {}
    for nproc, tp in ((4, 1), (8, 2)):
        code, out, err = _plan(capsys, "--ds_config", ds_config, "--nproc", str(nproc), "--ep_size", "4",
                               "--tp_size", str(tp))
        assert code == 0, err
        assert f"{nproc} ranks, ep_size 4, tp_size {tp} (dp 4), ZeRO-1 bf16" in out.splitlines()[0]
        rows[tp] = {line[:24].strip(): int(line[24:].split()[1].replace(",", ""))
                    for line in out.splitlines()[2:] if not line.startswith("  note")}
    assert rows[2]["parameters, experts"] * 2 == rows[1]["parameters, experts"]
    assert rows[2]["parameters, dense"] < rows[1]["parameters, dense"]
    assert "32 of 128 per MoE layer, each F/2 wide (TP)" in out and "over 4 ranks, experts over 1" in out


@pytest.mark.parametrize("args, problem", [
    (["--nproc", "8", "--tp_size", "3"], "--tp_size 3 does not divide --nproc 8"),
    (["--nproc", "8", "--tp_size", "0"], "--tp_size must be a positive number"),
    (["--nproc", "8", "--tp_size", "2", "--ep_size", "8"], "ep_size 8 does not divide the data-parallel size 4"),
])
def test_bad_tp_input_is_one_line_and_exit_2(capsys, args, problem):
    code, out, err = _plan(capsys, "--ds_config", str(ROOT / "ds_configs" / "zero1_bf16_ep2.json"), *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and problem in err and err.startswith("error: ")


def test_the_command_refuses_zero3_with_tp(capsys):
    code, out, err = _plan(capsys, "--ds_config", str(ROOT / "ds_configs" / "zero3_bf16_ep2.json"), "--nproc", "8",
                           "--tp_size", "2")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "ZeRO" in err
