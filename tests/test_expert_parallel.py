"""Expert parallelism: 2 ranks with ep_size=2 compute what 1 rank holding every expert computes."""
import os
import socket
import tempfile
from typing import NamedTuple

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.multirank

HIDDEN = 16


class Case(NamedTuple):
    k: int
    drop_tokens: bool
    balance_global: bool
    routing: str  # "random" or "all_to_rank0"
    experts: int = 4
    ffn: int = 24
    options: tuple = ()  # further MoE keyword arguments, as (name, value) pairs

    @property
    def name(self) -> str:
        return (f"k{self.k}-drop{self.drop_tokens}-global{self.balance_global}-{self.routing}"
                + (f"-E{self.experts}-F{self.ffn}" if self.experts != 4 else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(ep_size, case: Case, seed=0):
    from recipe.model.moe import MoE

    torch.manual_seed(seed)
    return MoE(HIDDEN, case.experts, k=case.k, capacity_factor=1.0, min_capacity=2, drop_tokens=case.drop_tokens,
               ep_size=ep_size, intermediate_size=case.ffn, balance_over_data_parallel=case.balance_global,
               **dict(case.options))


def _load_slice(sharded, full, ep_rank):
    """Give ``sharded`` (local experts only) the weights of ``full``'s experts owned by ``ep_rank``."""
    from recipe.model.expert_keys import shard_experts

    sharded.load_state_dict(shard_experts(full.state_dict(), ep_rank, sharded.num_local_experts))


def _worker(rank, world_size, port, cases, result_dir):
    """Runs every case in one process group (start-up dominates on CPU)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size))
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for index, case in enumerate(cases):
        _run_case(rank, case, os.path.join(result_dir, f"case{index}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run_case(rank, case, result_path):
    import torch.distributed as dist

    routing = case.routing
    full = _build(1, case)
    sharded = _build(2, case, seed=123)
    sharded.set_deepspeed_parallelism()
    _load_slice(sharded, full, rank)
    if routing == "all_to_rank0":
        with torch.no_grad():  # every token prefers expert 0 (rank 0): rank 1 receives nothing
            for moe in (full, sharded):
                moe.deepspeed_moe.gate.wg.weight.zero_()
                moe.deepspeed_moe.gate.wg.weight[0] = 1.0

    gen = torch.Generator().manual_seed(7)
    x_global = torch.rand(2, 12, HIDDEN, generator=gen) + (0.1 if routing == "all_to_rank0" else -0.5)
    grad_global = torch.randn(2, 12, HIDDEN, generator=gen)
    x = x_global[rank:rank + 1].clone().requires_grad_()
    out = sharded(x)
    ((out.output * grad_global[rank:rank + 1]).sum() + 0.3 * out.l_aux).backward()

    router_grad = sharded.deepspeed_moe.gate.wg.weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: its gradient is the sum over ranks
    torch.save(
        dict(output=out.output.detach(), l_aux=out.l_aux.detach(), x_grad=x.grad, router_grad=router_grad,
             expert_grads={n: p.grad for n, p in sharded.deepspeed_moe.experts.named_parameters()},
             tokens_per_expert=out.stats.tokens_per_expert),
        result_path,
    )


def _reference(case):
    """One process, all experts. Without token dropping the whole batch is one group; with dropping each
    rank's half is its own group (capacity is per rank), so the reference routes the halves separately."""
    routing, drop_tokens = case.routing, case.drop_tokens
    full = _build(1, case)
    if routing == "all_to_rank0":
        with torch.no_grad():
            full.deepspeed_moe.gate.wg.weight.zero_()
            full.deepspeed_moe.gate.wg.weight[0] = 1.0
    gen = torch.Generator().manual_seed(7)
    x_global = torch.rand(2, 12, HIDDEN, generator=gen) + (0.1 if routing == "all_to_rank0" else -0.5)
    grad_global = torch.randn(2, 12, HIDDEN, generator=gen)
    x = x_global.clone().requires_grad_()
    if drop_tokens:
        halves = [full(x[r:r + 1]) for r in range(2)]
        output = torch.cat([h.output for h in halves])
        loss = (output * grad_global).sum() + 0.3 * sum(h.l_aux for h in halves)
        l_aux = torch.stack([h.l_aux.detach() for h in halves])
    else:
        whole = full(x)
        output = whole.output
        # Each rank's loss holds l_aux of the whole batch (counts summed over ranks), so 2 copies here.
        loss = (output * grad_global).sum() + 0.3 * 2 * whole.l_aux
        l_aux = whole.l_aux.detach()
    loss.backward()
    return full, output.detach(), l_aux, x.grad


CASES = [
    Case(1, False, True, "random"),
    Case(2, False, True, "random"),
    Case(1, True, False, "random"),
    Case(2, True, False, "random"),
    Case(2, False, True, "all_to_rank0"),
    # Fine-grained: 256 experts of width 64, top-8, dropless, sigmoid scores, all-choices loss.
    Case(8, False, True, "random", experts=256, ffn=64,
         options=(("score_function", "sigmoid"), ("norm_topk_prob", True), ("balance_loss", "switch"))),
    Case(8, True, False, "random", experts=64, ffn=64, options=(("capacity_priority", "probs"),
                                                                  ("balance_loss", "switch"))),
]


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(2, _free_port(), CASES, result_dir), nprocs=2, start_method="spawn")
        yield {index: [torch.load(os.path.join(result_dir, f"case{index}_rank{r}.pt")) for r in range(2)]
               for index in range(len(CASES))}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case.name for case in CASES])
def test_two_rank_expert_parallel_matches_single_process(two_rank_results, index):
    case = CASES[index]
    results = two_rank_results[index]

    full, ref_output, ref_l_aux, ref_x_grad = _reference(case)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["output"], ref_output[rank:rank + 1], rtol=1e-5, atol=1e-6)
        if case.drop_tokens:  # per-rank groups: each rank's l_aux is its half's
            torch.testing.assert_close(res["l_aux"], ref_l_aux[rank], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["x_grad"], ref_x_grad[rank:rank + 1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["router_grad"], full.deepspeed_moe.gate.wg.weight.grad, rtol=1e-4, atol=1e-6)
        local = case.experts // 2
        for name, grad in res["expert_grads"].items():
            ref_grad = dict(full.deepspeed_moe.experts.named_parameters())[name].grad[rank * local:(rank + 1) * local]
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
    if not case.drop_tokens:  # counts summed over ranks: the ranks' mean l_aux is the whole batch's
        torch.testing.assert_close((results[0]["l_aux"] + results[1]["l_aux"]) / 2, ref_l_aux, rtol=1e-5, atol=1e-7)
    if case.routing == "all_to_rank0":
        assert results[0]["tokens_per_expert"].tolist()[2:] == [0, 0]
