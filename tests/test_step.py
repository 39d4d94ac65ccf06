"""recipe.training.step on its own: one rank, a real DeepSpeed engine, NaNs injected through module hooks.

A skipped step changes no weight, no Adam moment and no learning rate, and is counted by the engine; a good
step changes the weights. Checked for a plain torch optimizer (ZeRO-0 fp32: the recipe's own gradient
check and no-op step) and for DeepSpeed's ZeRO-1 optimizer (its overflow check).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import _free_port, write_config, write_ds_config

pytestmark = pytest.mark.multirank  # one rank, in a process of its own (a process group)

SCHEDULE = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}}


def _spoil_loss(module, args, out):
    out.lm_loss = out.lm_loss * float("nan")
    return out


def _spoil_grads(module, args, out):
    out.lm_loss.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
    return out


def _snapshot(job) -> dict:
    state = {f"w.{n}": p.detach().clone() for n, p in job.engine.module.named_parameters()}
    optimizer = getattr(job.engine.optimizer, "optimizer", job.engine.optimizer)
    for i, entry in enumerate(optimizer.state.values()):
        state.update({f"opt{i}.{k}": v.clone() for k, v in entry.items() if torch.is_tensor(v)})
    state["lr"] = torch.tensor(job.engine.get_lr()[0])
    return state


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _case(argv: list[str]) -> dict:
    from recipe.train import parse_args
    from recipe.training.build import build_job
    from recipe.training.distributed import Ranks
    from recipe.training.plan import plan_run
    from recipe.training.step import optimizer_step

    plan, ranks = plan_run(parse_args(argv)), Ranks(rank=0, world_size=1)
    job, recorded = build_job(plan, ranks), []
    record = lambda loss, out: recorded.append(float(loss))  # noqa: E731
    results = {"good": optimizer_step(job, plan, ranks, 1, record)}
    for kind, hook in (("loss", _spoil_loss), ("grad", _spoil_grads)):
        before, skipped_before = _snapshot(job), job.engine.skipped_steps
        handle = job.model.register_forward_hook(hook)
        results[kind] = optimizer_step(job, plan, ranks, 2, record)
        handle.remove()
        results[f"{kind}_unchanged"] = _same(before, _snapshot(job))
        results[f"{kind}_counted"] = job.engine.skipped_steps == skipped_before + 1
    before = _snapshot(job)
    results["after"] = optimizer_step(job, plan, ranks, 3, record)
    results["after_changed"] = not _same(before, _snapshot(job))
    results["recorded"] = len(recorded)  # micro-batches with a finite loss: good, grad-spoiled, after
    return results


def _worker(rank: int, port: int, cases: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_SIZE="1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.save({name: _case(argv) for name, argv in cases.items()}, out_path)


def test_a_non_finite_step_changes_nothing_and_a_good_one_does(tiny_data, tmp_path):
    config = write_config(tmp_path / "cfg.py", tiny_data)
    cases = {}
    for base in ("zero0_fp32.json", "zero1_fp32.json"):
        ds = write_ds_config(tmp_path / base, base=base, scheduler=SCHEDULE)
        cases[base] = ["--config", str(config), "--ds_config", str(ds), "--run_dir", str(tmp_path / base)]
    out_path = tmp_path / "results.pt"
    mp.spawn(_worker, args=(_free_port(), cases, str(out_path)), nprocs=1, join=True)
    for base, r in torch.load(out_path, weights_only=False).items():
        assert not r["good"].skipped, base
        assert r["loss"].skipped and r["loss"].non_finite_loss, base
        assert r["grad"].skipped and not r["grad"].non_finite_loss, base
        assert r["loss_unchanged"] and r["grad_unchanged"], base  # weights, Adam moments, LR
        assert r["loss_counted"] and r["grad_counted"], base
        assert not r["after"].skipped and r["after_changed"], base  # negative control: a good step moves things
        assert r["recorded"] == 3, base
