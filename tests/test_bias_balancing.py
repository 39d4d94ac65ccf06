"""Aux-loss-free balancing on 2 ranks (gloo): the trainer's bias update keeps the bias identical on every rank,
equals the update one process computes from both ranks' tokens, evens out a skewed routing, and leaves the
combine weights to the unbiased scores. Skipped steps change nothing."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from test_expert_parallel import _free_port

pytestmark = pytest.mark.multirank

HIDDEN, EXPERTS, K, FFN, TOKENS, STEPS, RATE = 16, 16, 4, 8, 256, 100, 0.003


def _build(seed: int = 0):
    from recipe.model.moe import MoE

    torch.manual_seed(seed)
    moe = MoE(HIDDEN, EXPERTS, k=K, drop_tokens=False, intermediate_size=FFN, bias_balancing=True,
              balance_loss="switch", norm_topk_prob=True)
    with torch.no_grad():  # skewed routing: feature 0 (always 1, see _tokens) adds 2 to the logits of experts 0..3
        moe.deepspeed_moe.gate.wg.weight[:4, 0] += 2.0
    return moe


def _tokens(rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(1, TOKENS, HIDDEN, generator=gen)  # each token its own preferences ...
    x[..., 0] = 1.0  # ... on top of a common one for experts 0..3
    return x


def _imbalance(load: torch.Tensor) -> float:
    return float(load.max() / load.mean())


def _balance(moe, ranks: list[int], reduce, applied=lambda step: True) -> tuple[list[float], torch.Tensor]:
    """STEPS bias updates from the tokens of ``ranks`` (all of them on one process, or this rank's own).
    Returns the global max/mean load of every step and the final bias."""
    from recipe.training.balancing import ExpertBiasBalancer

    balancer = ExpertBiasBalancer([moe], RATE)
    imbalance = []
    for step in range(STEPS):
        with torch.no_grad():
            for rank in ranks:
                balancer.add([moe(_tokens(rank, step)).stats])
        imbalance.append(_imbalance(reduce(balancer.loads[0].clone())))
        balancer.step_done(applied(step), reduce)
    return imbalance, moe.deepspeed_moe.gate.e_score_correction_bias.clone()


def _worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size))
    import torch.distributed as dist

    from recipe.training.distributed import sum_over_ranks

    dist.init_process_group("gloo")
    imbalance, bias = _balance(_build(), [rank], sum_over_ranks)
    skipped_imbalance, skipped_bias = _balance(_build(), [rank], sum_over_ranks, applied=lambda step: step % 2 == 0)
    torch.save(dict(imbalance=imbalance, bias=bias, skipped_bias=skipped_bias),
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(2, _free_port(), result_dir), nprocs=2, start_method="spawn")
        yield [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(2)]


def test_bias_is_identical_on_both_ranks_and_equals_one_process_over_both_ranks_tokens(two_rank_results):
    first, second = two_rank_results
    assert torch.equal(first["bias"], second["bias"])
    assert first["bias"].abs().max() > 0  # it moved: the comparison is not between two zero tensors
    _, reference_bias = _balance(_build(), [0, 1], lambda t: t)
    torch.testing.assert_close(first["bias"], reference_bias, rtol=0, atol=1e-6)
    # Negative control: updating from one rank's own loads (no reduction) gives another bias.
    _, local_bias = _balance(_build(), [0], lambda t: t)
    assert not torch.allclose(local_bias, reference_bias, atol=1e-6)


def test_bias_evens_out_a_skewed_routing(two_rank_results):
    imbalance = two_rank_results[0]["imbalance"]  # max/mean of the global load, step by step
    assert imbalance[0] > 3  # the skew is real: 4 favoured experts take most choices (4 = all of them)
    settled = sum(imbalance[-10:]) / 10  # ~1.2 is the sampling noise of 512 tokens x 4 choices over 16 experts
    assert settled < 1.5 and settled < imbalance[0] / 2
    favoured_bias = two_rank_results[0]["bias"][:4]
    assert (favoured_bias < 0).all()  # pushed down where the load was high


def test_skipped_steps_do_not_move_the_bias(two_rank_results):
    """Every other step skipped: the bias equals that of the applied steps alone, on both ranks."""
    first, second = two_rank_results
    assert torch.equal(first["skipped_bias"], second["skipped_bias"])
    # Half the updates were applied: every coordinate moved by at most STEPS/2 steps of RATE.
    assert first["skipped_bias"].abs().max() <= RATE * STEPS / 2 + 1e-6
    assert not torch.equal(first["skipped_bias"], first["bias"])


def test_combine_weights_come_from_the_unbiased_scores():
    """The bias changes which experts are chosen; the chosen experts' weights are the unbiased softmax scores
    renormalised over the k chosen (norm_topk_prob=True)."""
    moe = _build()
    moe.eval()
    bias = moe.deepspeed_moe.gate.e_score_correction_bias
    bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))
    x = _tokens(0, 0)[0]
    logits = moe.deepspeed_moe.gate(x)
    from recipe.model.moe.gating import top_k_gating

    out = top_k_gating(logits, K, drop_tokens=False, norm_topk_prob=True, expert_bias=bias)
    unbiased = top_k_gating(logits, K, drop_tokens=False, norm_topk_prob=True)
    assert not torch.equal(out.expert_index, unbiased.expert_index)  # the bias did change choices
    scores = torch.softmax(logits.float(), dim=-1)
    chosen = scores.gather(1, out.expert_index)
    torch.testing.assert_close(out.combine_weight, chosen / chosen.sum(1, keepdim=True))
    biased_choice = torch.topk(scores + bias, K, dim=-1).indices
    assert torch.equal(out.expert_index.sort(1).values, biased_choice.sort(1).values)


def test_bias_stays_fp32_when_the_model_is_cast():
    """The engine casts bf16/fp16 models with ``module.bfloat16()``; the bias keeps its fp32 values (its 1e-3
    steps would round away in bf16) and is in the state dict the checkpoints hold."""
    moe = _build()
    bias = moe.deepspeed_moe.gate.e_score_correction_bias
    bias.copy_(torch.full((EXPERTS,), 0.05) + 1e-4 * torch.arange(EXPERTS))
    want = bias.clone()
    moe.bfloat16()
    assert moe.deepspeed_moe.gate.wg.weight.dtype == torch.bfloat16  # the cast happened
    assert moe.deepspeed_moe.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.deepspeed_moe.gate.e_score_correction_bias, want)
    assert torch.equal(moe.state_dict()["deepspeed_moe.gate.e_score_correction_bias"], want)


def test_a_new_model_starts_with_zero_bias():
    """``init_weights`` draws every parameter; the bias is a buffer and starts at 0 (unbiased routing)."""
    from conftest import TINY_MODEL
    from recipe.config import config_from_dict
    from recipe.model.transformer import TransformerLM

    config = config_from_dict({"model": {**TINY_MODEL, "moe_bias_update_rate": 1e-3}, "data": {"seq_len": 16}})
    model = TransformerLM(config)
    model.init_weights(seed=3)
    biases = [layer.deepspeed_moe.gate.e_score_correction_bias for layer in model.moe_layers()]
    assert len(biases) == config.model.num_layers and all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    assert model.blocks[0].attention.wqkv.weight.abs().max() > 0  # parameters were drawn
