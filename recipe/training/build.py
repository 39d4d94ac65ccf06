"""Everything a rank trains with: the model (initial or resharded weights), the DeepSpeed engine and the data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import deepspeed
import torch

from ..config import RecipeConfig
from ..data.loader import BatchLoader, TokenDataset
from ..ds_config import DSConfig
from ..init_from import parse_init_from
from ..model.moe import ShardedMoE
from ..model.moe.dispatch import check_group_order, expert_parallel_rank, tensor_parallel_rank
from ..model.transformer import TransformerLM
from .balancing import ExpertBiasBalancer
from .checkpointing import ReshardSource, load_resharded_weights, read_reshard_source
from .distributed import Ranks
from .plan import RunPlan
from .step import add_own_grad_check


@dataclass
class Job:
    model: TransformerLM
    engine: deepspeed.DeepSpeedEngine
    scheduler: Optional[object]  # the LR scheduler the JSON declared, or None
    loader: BatchLoader  # this rank's share of every global batch, resumable
    val_data: TokenDataset
    ep_rank: int  # index inside the expert-parallel group: which experts this rank holds
    own_grad_check: bool  # a plain torch optimizer: the recipe checks gradients for inf/NaN itself
    reshard_source: Optional[ReshardSource] = None  # the checkpoint being moved into this layout
    bias_balancer: Optional[ExpertBiasBalancer] = None  # aux-loss-free balancing (model.moe_bias_update_rate > 0)

    @property
    def device(self) -> torch.device:
        return self.engine.device


def build_job(plan: RunPlan, ranks: Ranks) -> Job:
    config, ds = plan.config, plan.ds
    ep_rank = expert_parallel_rank(ds.ep_size) if config.is_moe else 0
    model = TransformerLM(config, ep_size=ds.ep_size, zero3=ds.zero_stage == 3)
    if config.train.init_from is not None and plan.resume_tag is None:  # on --resume the checkpoint wins
        load_initial_weights(model, config, ep_rank)  # writes every weight: a random init first would be lost
    else:
        model.init_weights(config.train.seed, ep_rank)
    source = None
    if plan.reshard:  # another layout: every expert file is read, this rank keeps its own experts
        source = read_reshard_source(plan)
        load_resharded_weights(model, source, ep_rank)
    if ds.tp_size > 1:  # after every full weight is in place; AutoTP cuts the dense ones in deepspeed.initialize
        model.shard_experts(tensor_parallel_rank(), ds.tp_size)
    engine, scheduler = start_engine(model, ds)
    train_data = TokenDataset(Path(config.data.path), "train")
    loader = BatchLoader(train_data, config.data.seq_len, ds.micro_batch_size, ranks.dp_rank, ranks.dp_size,
                         seed=config.data.seed)
    return Job(model=model, engine=engine, scheduler=scheduler, loader=loader,
               val_data=TokenDataset(Path(config.data.path), "val"), ep_rank=ep_rank,
               own_grad_check=add_own_grad_check(engine.optimizer), reshard_source=source,
               bias_balancer=ExpertBiasBalancer.for_model(model, config.model.moe_bias_update_rate))


def load_initial_weights(model: TransformerLM, config: RecipeConfig, ep_rank: int) -> None:
    """``train.init_from``: this rank's share of a Hugging Face MoE, or the MoE upcycled from a dense source; every
    weight is written (buffers such as the routing bias keep their zeros from construction)."""
    init = parse_init_from(config.train.init_from)
    if init.kind == "hf":
        from ..hf_import import load_hf_weights

        load_hf_weights(model, init.path, config.model.hf_architecture, ep_rank)
        return
    from ..upcycle import read_recipe_run, upcycled_state

    if (init.path / "checkpoints").is_dir():
        _, dense_state = read_recipe_run(init.path)
    else:
        from ..hf_import import read_hf_dense

        _, dense_state = read_hf_dense(init.path)
    model.load_state_dict(upcycled_state(dense_state, config, ep_rank, model.num_local_experts, config.train.seed))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms); DeepSpeed then splits out the expert parameters."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def start_engine(model: TransformerLM, ds: DSConfig):
    """(engine, LR scheduler or None) from the resolved DeepSpeed JSON."""
    if ds.zero_stage == 3 and model.moe_layers():
        # One gather of router and experts per layer call: the dispatcher calls into the experts directly, so
        # hooks on the experts module itself would never fire.
        deepspeed.utils.set_z3_leaf_modules(model, [ShardedMoE])
    check_group_order(ds.tp_size)  # the engine keeps whatever groups exist: they must be the TP-aware ones
    weight_decay = ds.deepspeed["optimizer"].get("params", {}).get("weight_decay", 0.0)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                                   config=ds.deepspeed)
    return engine, scheduler
