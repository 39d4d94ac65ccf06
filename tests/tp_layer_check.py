"""Run by tests/test_tensor_parallel.py on 2 ranks (one TP group); writes ``<out>.<rank>.json``.

1. The group-order guard: expert groups made before the TP mesh, then the mesh asked for (refused), then the mesh
   made behind the recipe's back, as DeepSpeed's engine would, and the engine start checked (refused).
2. The expert-TP MoE layer (each rank half of every expert's F, ``TensorParallelExperts``) against the full layer
   on the same tokens: output and every gradient (input, router, the expert shards). The negative control drops
   the f on the combine weights: the router then gets only this rank's share of its gradient.
"""
import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import groups

from recipe.model.moe import MoE
from recipe.model.moe import dispatch


def refusal(call) -> str:
    try:
        call()
    except RuntimeError as exc:
        return str(exc)
    return ""


class WithoutFOnWeights(dispatch.TensorParallelExperts):
    def run(self, x_SM, token_of_pair_N, weight_N, tokens_per_expert, experts):
        x_SM = dispatch._CopyToTensorParallel.apply(x_SM, self.tp_group)
        partial_SM = self.inner.run(x_SM, token_of_pair_N, weight_N, tokens_per_expert, experts)
        return dispatch._ReduceFromTensorParallel.apply(partial_SM, self.tp_group)


def forward_backward(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    ((out.output * upstream).sum() + 0.1 * out.l_aux).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.output.detach(), x.grad, grads


def max_error(a, b) -> float:
    return (a - b).abs().max().item()


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    dispatch.ensure_expert_groups(2)  # the wrong order: TP-unaware expert groups first
    result["mesh_after_expert_groups"] = refusal(lambda: dispatch.create_parallel_groups(2, 1))
    groups._init_tp_mesh_device(tensor_model_parallel_size=2)
    groups.mpu = groups
    result["engine_after_expert_groups"] = refusal(lambda: dispatch.check_group_order(2))

    torch.manual_seed(0)  # the same full layer, tokens and upstream gradient on both ranks
    full = MoE(16, 4, k=2, drop_tokens=False, ep_size=1, intermediate_size=24)
    x, upstream = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    tp_rank = groups.get_tensor_model_parallel_rank()
    sharded = copy.deepcopy(full)
    sharded.deepspeed_moe.experts.shard_intermediate(tp_rank, 2)
    sharded.set_deepspeed_parallelism()  # ep_size_1 groups made now, under the mesh: TensorParallelExperts
    result["dispatcher"] = type(sharded.dispatcher).__name__
    out_full, dx_full, grads_full = forward_backward(full, x, upstream)
    result.update(compare(sharded, x, upstream, out_full, dx_full, grads_full, tp_rank))
    sharded.zero_grad(set_to_none=True)
    sharded.dispatcher = WithoutFOnWeights(sharded.dispatcher.inner, sharded.dispatcher.tp_group)
    result["control"] = compare(sharded, x, upstream, out_full, dx_full, grads_full, tp_rank)
    with open(f"{out}.{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)


def compare(layer, x, upstream, out_full, dx_full, grads_full, tp_rank) -> dict:
    out, dx, grads = forward_backward(layer, x, upstream)
    errors = {"output": max_error(out, out_full), "input_grad": max_error(dx, dx_full),
              "router_grad": max_error(grads["deepspeed_moe.gate.wg.weight"],
                                       grads_full["deepspeed_moe.gate.wg.weight"])}
    for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
        key = f"deepspeed_moe.experts.{name}"
        errors[f"{name}_grad"] = max_error(grads[key], grads_full[key].chunk(2, dim=dim)[tp_rank])
    errors["router_grad_size"] = grads_full["deepspeed_moe.gate.wg.weight"].abs().max().item()
    return errors


if __name__ == "__main__":
    main([arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")][0])  # the launcher adds --local_rank
