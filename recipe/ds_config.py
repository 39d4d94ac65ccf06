"""Reading and checking DeepSpeed JSON files from ds_configs/.

A ds_config is DeepSpeed's own JSON plus one recipe block, removed before DeepSpeed sees it::

    "moe_recipe": {"ep_size": 2}     # expert-parallel size; must divide the number of ranks

Batch sizes live only here: ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps``;
the global batch follows from the world size (``train_batch_size``, if given, must agree).
``"auto"`` in the scheduler's ``total_num_steps`` / ``warmup_num_steps`` is filled from ``train.steps``.
DeepSpeed's monitor blocks: ``tensorboard`` and ``csv_monitor`` without an ``output_path`` (or ``"auto"``) write into
the run folder (``<run_dir>/tensorboard``, ``<run_dir>/csv_monitor``), not the current directory; an enabled block
whose package is not installed is refused with the install command; an enabled ``wandb`` block is refused in favour
of ``train.wandb`` (the recipe's own wandb run).
ZeRO stage 3 with MoE runs the experts partitioned over their expert-data-parallel group (``ShardedMoE``); the
ZeRO-3 settings that would mix experts across ranks (hpZ, quantized weights or gradients, MiCS) and offload are
refused with it. Tensor parallelism is DeepSpeed's ``"tensor_parallel": {"autotp_size": N}`` (AutoTP for attention
and the dense FFN, the recipe's own split of every expert's F); pipeline and sequence parallelism are refused.
Combinations DeepSpeed would assert on later (or silently mistrain with) are rejected here, up front, and so are
keys DeepSpeed's own config parser never reads (typos it would ignore), blocks its pydantic models refuse, and
optimizer or scheduler types it cannot build; a JSON whose top level is not an object is refused when read.
"""
from __future__ import annotations

import copy
import difflib
import importlib.util
import json
from collections.abc import KeysView
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import ConfigError, RecipeConfig

RECIPE_BLOCK = "moe_recipe"
RECIPE_KEYS = {"ep_size"}
Precision = Literal["fp32", "bf16", "fp16"]
# DeepSpeed's monitor blocks that need a package beside DeepSpeed: (module, what to pip install). tensorboard is
# in requirements.txt; comet_ml is not (it needs a Comet account), so its block is refused until it is installed.
MONITOR_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "comet": ("comet_ml", "comet_ml==3.58.8")}
MONITORS_WITH_OUTPUT = ("tensorboard", "csv_monitor")  # blocks with output_path / job_name


@dataclass
class DSConfig:
    path: str
    deepspeed: dict  # what deepspeed.initialize receives
    ep_size: int
    precision: Precision
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    tp_size: int = 1  # tensor-parallel size, DeepSpeed's tensor_parallel.autotp_size (1: none)

    def dp_size(self, world_size: int) -> int:
        """Data-parallel ranks: TP peers share one batch."""
        return world_size // self.tp_size

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size(world_size)


def read_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ds_config {path} not found; pick one of ds_configs/*.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ds_config {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    if not isinstance(raw, dict):
        raise ConfigError(f"ds_config {path} holds a JSON {type(raw).__name__}; a DeepSpeed config is one object "
                          f"{{...}} (see ds_configs/*.json)")
    return raw


def _positive_int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def resolve_ds_config(raw: dict, config: RecipeConfig, world_size: int, path: str = "<dict>") -> DSConfig:
    """Validate a ds_config against the recipe config and world size; return what DeepSpeed gets."""
    ds = copy.deepcopy(raw)
    ep_size = _pop_ep_size(ds, path)
    _check_parallelism(ds, path)
    tp_size = _tensor_parallel(ds, config, world_size, path)
    micro, accum = _batch_sizes(ds, world_size // tp_size, path)
    precision = _precision(ds, path)
    stage = _zero_stage(ds, config, path)
    if tp_size > 1 and stage == 3:
        raise ConfigError(f"{path}: tensor parallelism with ZeRO stage 3 is not supported by the recipe (ZeRO-3 "
                          f"would miss the TP shards in the grad norm); use ZeRO stage 0-2 with TP, or TP 1")
    _check_ep_size(ep_size, config, world_size, tp_size, path)
    _fill_auto_schedule(ds, config.train.steps)
    _check_monitors(ds, config.train.run_dir, path)
    if "optimizer" not in ds:
        raise ConfigError(f"{path}: declare the optimizer in the ds_config (e.g. AdamW); the recipe builds none itself")
    _check_types(ds, path)
    _check_deepspeed_reads_every_key(ds, path)
    return DSConfig(path=str(path), deepspeed=ds, ep_size=ep_size, precision=precision, zero_stage=stage,
                    micro_batch_size=micro, grad_accum_steps=accum, tp_size=tp_size)


def _pop_ep_size(ds: dict, path: str) -> int:
    """Remove the recipe block (DeepSpeed must not see it) and return its expert-parallel size."""
    recipe = ds.pop(RECIPE_BLOCK, {})
    if not isinstance(recipe, dict) or set(recipe) - RECIPE_KEYS:
        raise ConfigError(f"{path}: `{RECIPE_BLOCK}` must be an object with keys {sorted(RECIPE_KEYS)}, got {recipe!r}")
    return _positive_int(recipe.get("ep_size", 1), f"{path}: {RECIPE_BLOCK}.ep_size")


def _batch_sizes(ds: dict, dp_size: int, path: str) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps); ``train_batch_size``, if given, must agree."""
    if "train_micro_batch_size_per_gpu" not in ds:
        raise ConfigError(f"{path}: set train_micro_batch_size_per_gpu (batch sizes live in the ds_config)")
    micro = _positive_int(ds["train_micro_batch_size_per_gpu"], f"{path}: train_micro_batch_size_per_gpu")
    accum = _positive_int(ds.get("gradient_accumulation_steps", 1), f"{path}: gradient_accumulation_steps")
    if "train_batch_size" in ds:
        global_batch = _positive_int(ds["train_batch_size"], f"{path}: train_batch_size")
        if global_batch != micro * accum * dp_size:
            raise ConfigError(
                f"{path}: train_batch_size {global_batch} != micro batch {micro} x gradient accumulation {accum} "
                f"x data-parallel size {dp_size} = {micro * accum * dp_size}; remove train_batch_size "
                f"(it is derived) or fix the other two"
            )
    return micro, accum


def _precision(ds: dict, path: str) -> Precision:
    """The precision, "fp32", "bf16" or "fp16", from the ``fp16`` / ``bf16`` blocks (at most one enabled)."""
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled; enable at most one")
    if fp16:
        # Deferred: importing deepspeed takes seconds, and only fp16 needs to ask the accelerator.
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError(f"{path}: fp16 is not supported on this accelerator "
                              f"({get_accelerator().device_name()}); use a bf16 or fp32 ds_config")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _zero_stage(ds: dict, config: RecipeConfig, path: str) -> int:
    """The ZeRO stage, refusing the combinations with MoE that DeepSpeed asserts on later (or mistrains with)."""
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if config.is_moe:
        if stage == 3:
            _check_zero3_moe(zero, config, path)
        if stage == 2 and not (zero.get("contiguous_gradients", True) and zero.get("reduce_scatter", True)):
            raise ConfigError(f"{path}: ZeRO-2 with MoE needs contiguous_gradients and reduce_scatter true "
                              f"(DeepSpeed asserts otherwise); set both to true")
    return stage


# ZeRO-3 settings whose collectives ignore the experts' own partition group (``ShardedMoE``): each would mix the
# experts of different expert-parallel ranks, silently. AutoEP, the layer DeepSpeed allows under ZeRO-3, refuses
# them too (hpZ, quantized gradients); MiCS shards over its own groups.
ZERO3_MOE_REFUSED = {  # key: (what it is, the values that leave it off)
    "zero_hpz_partition_size": ("hpZ, a secondary weight partition over all ranks", (0, 1)),
    "zero_quantized_weights": ("quantized weight all-gathers", (False,)),
    "zero_quantized_nontrainable_weights": ("quantized weight all-gathers", (False,)),
    "zero_quantized_gradients": ("quantized gradient reduce-scatter", (False,)),
    "mics_shard_size": ("MiCS sharding", (-1,)),
}


def _check_zero3_moe(zero: dict, config: RecipeConfig, path: str) -> None:
    """ZeRO-3 with MoE runs our ``ShardedMoE`` (experts partitioned over their expert-data-parallel group):
    refuse what DeepSpeed's MoE layer would need, and the settings that would partition experts wrongly."""
    if config.model.moe_impl == "deepspeed":
        raise ConfigError(f"{path}: DeepSpeed's own MoE layer (model.moe_impl='deepspeed') does not run under ZeRO "
                          f"stage 3; use moe_impl='recipe' or a stage 0-2 ds_config")
    for key, (what, off) in ZERO3_MOE_REFUSED.items():
        if zero.get(key, off[0]) not in off:
            raise ConfigError(f"{path}: zero_optimization.{key} ({what}) is not supported with MoE under ZeRO-3: "
                              f"it would mix the experts of different expert-parallel ranks; remove the key")
    for block in ("offload_param", "offload_optimizer"):
        device = (zero.get(block) or {}).get("device", "none")
        if device not in ("none", None):
            raise ConfigError(f"{path}: zero_optimization.{block} is not supported with MoE under ZeRO-3 (untested "
                              f"with partitioned experts); remove it, or use ds_configs/zero2_fp32_offload.json")


def _check_ep_size(ep_size: int, config: RecipeConfig, world_size: int, tp_size: int, path: str) -> None:
    """The expert-parallel size must divide the data-parallel ranks and the experts; dense models have none."""
    if (world_size // tp_size) % ep_size != 0:
        ranks = f"the world size {world_size}" if tp_size == 1 else \
            f"the data-parallel size {world_size // tp_size} ({world_size} ranks / TP {tp_size})"
        raise ConfigError(f"{path}: {RECIPE_BLOCK}.ep_size {ep_size} does not divide {ranks}; launch a multiple of "
                          f"{ep_size * tp_size} ranks or use a smaller ep_size")
    if config.is_moe and config.model.num_experts % ep_size != 0:
        raise ConfigError(f"`model.num_experts` ({config.model.num_experts}) is not divisible by "
                          f"{RECIPE_BLOCK}.ep_size {ep_size} from {path}; use a multiple of {ep_size} experts "
                          f"or a smaller ep_size")
    if not config.is_moe and ep_size > 1:
        raise ConfigError(f"model_type {config.model_type!r} has no experts but {path} sets ep_size={ep_size}; "
                          f"use an ep_size=1 ds_config for dense models")


def _check_parallelism(ds: dict, path: str) -> None:
    """Model parallelism the recipe does not run: DeepSpeed would take the block and train something else."""
    if "pipeline" in ds:
        # The trainer steps the engine per micro-batch; DeepSpeed's pipeline engine needs a PipelineModule and its
        # own train_batch loop, and with MoE a stage holding no MoE layer deadlocks (DEEPSPEED-SCALE.md §3).
        raise ConfigError(f"{path}: pipeline parallelism is not supported by the recipe (the `pipeline` block); "
                          f"remove the block and scale with data, expert parallelism and ZeRO (README: Scaling out)")
    if ds.get("sequence_parallel_size", 1) != 1:
        raise ConfigError(f"{path}: sequence parallelism (sequence_parallel_size {ds['sequence_parallel_size']}) "
                          f"is not supported by the recipe; remove the key")


def _tensor_parallel(ds: dict, config: RecipeConfig, world_size: int, path: str) -> int:
    """The TP size, DeepSpeed's ``tensor_parallel.autotp_size`` (0 or 1: none). The recipe writes AutoTP's
    ``partition_config`` for its own module names (``recipe.model.tp_layout``); the sizes it cuts must divide."""
    block = ds.get("tensor_parallel")
    if block is None:
        return 1
    if not isinstance(block, dict) or set(block) - {"autotp_size"}:
        raise ConfigError(f"{path}: the `tensor_parallel` block takes only autotp_size (the recipe writes AutoTP's "
                          f"partition_config for its own layers), got {block!r}")
    tp_size = block.get("autotp_size", 0)
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 0:
        raise ConfigError(f"{path}: tensor_parallel.autotp_size must be a non-negative integer, got {tp_size!r}")
    if tp_size <= 1:
        del ds["tensor_parallel"]
        return 1
    if world_size % tp_size:
        raise ConfigError(f"{path}: tensor_parallel.autotp_size {tp_size} does not divide the {world_size} ranks; "
                          f"launch a multiple of {tp_size} ranks")
    check_tensor_parallel_model(config, tp_size, path)
    from .model.tp_layout import autotp_partition_config

    ds["tensor_parallel"] = {"autotp_size": tp_size, "partition_config": autotp_partition_config(config)}
    return tp_size


def check_tensor_parallel_model(config: RecipeConfig, tp_size: int, path: str) -> None:
    """Every size TP cuts is a multiple of TP, and the model has nothing TP cannot split (``path``: where the TP
    size came from, for the message)."""
    m = config.model
    sizes = {"model.num_attention_heads": m.num_attention_heads, "model.num_key_value_heads":
             m.resolved_kv_heads}
    if len(config.moe_layer_ids()) < m.num_layers:
        sizes["the dense FFN size"] = m.ffn_size
    if config.is_moe:
        sizes["the expert size"] = m.expert_size
        if m.moe_num_shared_experts:
            sizes["the shared-expert size"] = m.shared_expert_size
    for what, size in sizes.items():
        if size % tp_size:
            raise ConfigError(f"{path}: {what} ({size}) is not divisible by the tensor-parallel size {tp_size}; "
                              f"use a TP size that divides it")
    refused = {"model.qk_norm='full' (one norm over all heads)": m.qk_norm == "full",
               "model.moe_impl='deepspeed'": config.is_moe and m.moe_impl == "deepspeed",
               f"model.moe_expert={m.moe_expert!r} (only 'swiglu' experts are split)":
                   config.is_moe and m.moe_expert != "swiglu"}
    for what, is_set in refused.items():
        if is_set:
            raise ConfigError(f"{path}: tensor parallelism does not support {what}; use autotp_size 1")


def _fill_auto_schedule(ds: dict, train_steps: int) -> None:
    """``"auto"`` scheduler lengths from ``train.steps``: all of it, and a 5% warm-up (at least one step)."""
    scheduler = ds.get("scheduler", {}).get("params", {})
    if scheduler.get("total_num_steps") == "auto":
        scheduler["total_num_steps"] = train_steps
    if scheduler.get("warmup_num_steps") == "auto":
        scheduler["warmup_num_steps"] = max(1, train_steps // 20)


def _monitor_enabled(ds: dict, block: str) -> bool:
    return isinstance(ds.get(block), dict) and ds[block].get("enabled") is True


def _check_monitors(ds: dict, run_dir: str, path: str) -> None:
    """Enabled monitor blocks: refused when they cannot work (DeepSpeed would fail on rank 0 after launch), and
    given the run folder as output when they name none (DeepSpeed's default is the current directory)."""
    if _monitor_enabled(ds, "wandb"):
        # DeepSpeed's WandbMonitor calls wandb.init itself (online, no mode): without a login it fails on rank 0,
        # with one it starts a second run beside the recipe's, logged by sample count instead of step.
        raise ConfigError(f"{path}: the `wandb` monitor block is enabled, but the recipe logs every scalar to wandb "
                          f"itself; remove the block (or set its enabled false) and use --set train.wandb=online "
                          f"(or offline) and train.wandb_project=NAME")
    for block, (module, requirement) in MONITOR_PACKAGES.items():
        if _monitor_enabled(ds, block) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{path}: the `{block}` monitor block is enabled but its package {module} is not "
                              f"installed; run `pip install {requirement}` or set {block}.enabled to false")
    for block in MONITORS_WITH_OUTPUT:
        if _monitor_enabled(ds, block) and ds[block].get("output_path", "") in ("", "auto"):
            ds[block]["output_path"] = str(run_dir)
            ds[block].setdefault("job_name", block)  # <run_dir>/tensorboard, <run_dir>/csv_monitor


class _ReadTracking(dict):
    """A dict that records which keys are looked up (``get``, ``[]``, ``in``, ``in .keys()``)."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _TrackedKeys(self)

    def __copy__(self):  # DeepSpeedConfig parses a shallow copy: keep recording
        return _ReadTracking(self, self.seen)


class _TrackedKeys(KeysView):
    def __contains__(self, key):
        return key in self._mapping


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_deepspeed_reads_every_key(ds: dict, path: str) -> None:
    """Parse the JSON with DeepSpeed's own ``DeepSpeedConfig``, recording the top-level keys it reads: a key it never
    reads (a typo such as ``gradient_acumulation_steps``) would be ignored silently, and a block its pydantic models
    refuse (``zero_optimization.contiguous_gradient``) would fail later on every rank. Both are refused here."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}  # world-size dependent, checked above
    seen: set = set()
    try:
        DeepSpeedConfig(_ReadTracking(probe, seen))
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"{path}: DeepSpeed's {exc.title} refuses `{where}` ({error['msg']}); check that key in "
                          f"its block") from None
    except Exception:  # noqa: BLE001 - a check that depends on the launch (world size, devices): DeepSpeed's own
        return
    unknown = sorted(set(probe) - seen)
    if unknown:
        raise ConfigError(f"{path}: unknown key `{unknown[0]}`: DeepSpeed never reads it"
                          f"{_did_you_mean(unknown[0], seen)}")


def _check_types(ds: dict, path: str) -> None:
    """The optimizer and scheduler types name classes DeepSpeed can build (else it asserts on every rank)."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    optimizer = str(ds["optimizer"].get("type", ""))
    torch_optimizers = [name for name, cls in vars(torch.optim).items()
                        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)]
    if optimizer.lower() not in DEEPSPEED_OPTIMIZERS and optimizer not in torch_optimizers:
        choices = ["AdamW", "Adam", "Lamb", "Lion", "Adagrad", *torch_optimizers]
        raise ConfigError(f"{path}: optimizer.type {optimizer!r} is neither a DeepSpeed optimizer nor a torch.optim "
                          f"class{_did_you_mean(optimizer, choices)}")
    scheduler = ds.get("scheduler", {}).get("type")
    known = scheduler is None or hasattr(lr_schedules, str(scheduler)) or hasattr(torch.optim.lr_scheduler, str(scheduler))
    if not known:
        raise ConfigError(f"{path}: scheduler.type {scheduler!r} is neither a DeepSpeed nor a torch LR scheduler"
                          f"{_did_you_mean(scheduler, lr_schedules.VALID_LR_SCHEDULES)}")
