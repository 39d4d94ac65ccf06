"""Typed training configuration, loaded from InternEvo-style Python files.

A config file is plain Python with top-level dicts::

    model_type = "INTERNLM_MoE"          # or "INTERNLM" for the dense model
    model = dict(num_layers=4, hidden_size=128, num_experts=8, moe_gate_k=2, ...)
    loss = dict(moe_loss_coeff=0.01)
    data = dict(path="data/sotu", seq_len=128)
    train = dict(steps=600, eval_every=100, ...)

``load_config`` turns it into a ``RecipeConfig`` of dataclasses. Unknown keys, wrong types and
inconsistent values raise ``ConfigError`` naming the key and the fix, before any process group starts.
Upper-case and underscore-prefixed top-level names are free for the file's own constants.
``--set section.key=value`` overrides (values parsed as Python literals) are applied before validation.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

# The string options: each Literal is the one list of allowed values, checked when a config loads
# (``_check_value``). They live here, not in model/moe/gating.py, so loading a config imports no torch.
ModelType = Literal["INTERNLM_MoE", "INTERNLM"]  # with MoE layers; dense
NoisyGatePolicy = Literal[None, "Jitter", "RSample"]
SecondExpertPolicy = Literal["argmax", "sampling"]
# Which layer fills the MoE FFN slots: "recipe" (ours, recipe.model.moe.MoE) or "deepspeed"
# (deepspeed.moe.layer.MoE with our SwiGLU expert), the baseline of the end-to-end benchmark
# (bench/e2e_bench.py). "deepspeed" reports no routing telemetry (no expert-load heatmaps).
MoEImpl = Literal["recipe", "deepspeed"]
# Routing (recipe/model/moe/gating.py has each option's formula and the models that use it).
ScoreFunction = Literal["softmax", "sigmoid"]  # router scores: softmax over experts, or per-expert sigmoid (DeepSeek-V3)
CapacityPriority = Literal["choice", "position", "probs"]  # who is kept when an expert overflows
BalanceLoss = Literal["gshard", "switch", "sequence"]  # the balancing loss l_aux
QKNorm = Literal["none", "head", "full"]  # RMSNorm on q and k: off, per head (Qwen3-MoE), over all heads (OLMoE)
# The transformers class a model was imported from (recipe/hf_format.py); export writes the same one back.
HFArchitecture = Literal[None, "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
WandbMode = Literal["offline", "online", "disabled"]  # "offline" needs no account or network
# --resume when the ds_config's resolved LR schedule differs from the run's saved one (a new train.steps fills
# "auto" lengths anew): "refuse" (the default), "stretch" (adopt the new lengths: the rate jumps at the resumed
# step) or "keep" (continue the saved schedule; DeepSpeed's warm-up schedules hold their final rate past its end).
LRScheduleOnResume = Literal["refuse", "stretch", "keep"]


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


# Keys of other model families that the recipe does not compute: refused by name, never ignored.
UNSUPPORTED_MODEL_KEYS = {
    key: "MLA attention (DeepSeek-V2/V3 low-rank q/kv projections) is not supported; drop the key to use "
         "standard attention with num_key_value_heads and head_dim"
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "mla")
}


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # GQA / MQA; None = num_attention_heads (multi-head attention)
    head_dim: Optional[int] = None  # width of one head; None = hidden_size // num_attention_heads
    qk_norm: QKNorm = "none"
    qkv_bias: bool = False  # bias on the q, k, v projections (Qwen2)
    vocab_size: int = 4096
    max_seq_len: int = 256
    mlp_ratio: float = 8 / 3  # FFN width = mlp_ratio·hidden_size, rounded up to multiple_of (InternEvo)
    multiple_of: int = 32
    intermediate_size: Optional[int] = None  # set explicitly to override mlp_ratio (dense FFN width)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    checkpoint: bool = False  # activation checkpointing of every block
    init_std: float = 0.02
    # MoE (ignored by dense model types)
    num_experts: int = 8
    moe_gate_k: int = 2
    moe_intermediate_size: Optional[int] = None  # width F of each routed expert; None = the dense FFN width
    moe_layer_freq: int = 1  # every n-th block (counting from the last) gets an MoE FFN
    moe_dense_first_layers: int = 0  # the first n blocks keep a dense FFN (DeepSeek's first_k_dense_replace)
    moe_capacity_factor: float = 1.25
    moe_eval_capacity_factor: float = 2.0
    moe_min_capacity: int = 4
    moe_drop_tokens: bool = True
    moe_noisy_gate_policy: NoisyGatePolicy = None
    moe_use_rts: bool = False
    moe_second_expert_policy: SecondExpertPolicy = "argmax"
    # Routing beyond GShard top-1/top-2 (defaults keep GShard's semantics)
    moe_score_function: ScoreFunction = "softmax"
    moe_norm_topk_prob: Optional[bool] = None  # True: over the k chosen; False: raw scores; None: over survivors
    moe_route_scale: float = 1.0  # combine weights times this (DeepSeek-V3: 2.5)
    moe_capacity_priority: CapacityPriority = "choice"
    moe_balance_loss: BalanceLoss = "gshard"
    moe_bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3) step size u; 0 = off
    moe_num_expert_groups: int = 1  # group-limited routing (DeepSeek-V2/V3): experts in this many groups,
    moe_topk_groups: int = 1  # of which each token may choose from the best this many
    moe_num_shared_experts: int = 0  # dense SwiGLU experts every token goes through, beside the routed ones
    moe_shared_expert_intermediate_size: Optional[int] = None  # width of each shared expert; None = F
    moe_shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(x·w) (Qwen2-MoE)
    # Registry names, open to user registrations, so not Literals: checked when the layer is built.
    moe_expert: str = "swiglu"
    moe_gate: str = "gshard"
    moe_balance_over_data_parallel: bool = True
    moe_impl: MoEImpl = "recipe"
    hf_architecture: HFArchitecture = None  # set by `train.init_from = "hf:DIR"`; None: export picks the class

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """The dense FFN width."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return self.multiple_of * math.ceil(int(self.hidden_size * self.mlp_ratio) / self.multiple_of)

    @property
    def expert_size(self) -> int:
        """F, the width of each routed expert."""
        return self.moe_intermediate_size if self.moe_intermediate_size is not None else self.ffn_size

    @property
    def shared_expert_size(self) -> int:
        """The width of all shared experts together (one SwiGLU of that width)."""
        each = self.moe_shared_expert_intermediate_size
        return self.moe_num_shared_experts * (each if each is not None else self.expert_size)


@dataclass
class LossConfig:
    moe_loss_coeff: float = 0.01  # loss = nll + moe_loss_coeff · Σ_layers l_aux
    router_z_loss_coeff: float = 0.0  # + router_z_loss_coeff · Σ_layers z_loss


@dataclass
class DataConfig:
    path: str = "data/sotu"  # a folder made by `python -m recipe.data.prepare`
    seq_len: int = 128
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 600
    run_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep_last: int = 2
    resume: bool = False
    # Start a fresh run from other weights (recipe/init_from.py): "hf:DIR", a Hugging Face MoE folder (its
    # config.json gives the architecture), or "upcycle:SOURCE", a dense recipe run or Hugging Face dense folder
    # copied into this config's MoE. On --resume the run's saved config and checkpoint are used, not the source.
    init_from: Optional[str] = None
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated before stopping
    wandb: WandbMode = "offline"
    wandb_project: str = "moe-recipe"
    lr_schedule_on_resume: LRScheduleOnResume = "refuse"


@dataclass
class RecipeConfig:
    model_type: ModelType = "INTERNLM_MoE"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = ""  # the file it was loaded from

    @property
    def is_moe(self) -> bool:
        return self.model_type == "INTERNLM_MoE"

    def moe_layer_ids(self) -> list[int]:
        """Blocks whose FFN is an MoE layer: every ``moe_layer_freq``-th counting back from the last, after the
        first ``moe_dense_first_layers`` (the last block always is one, when the model is MoE)."""
        if not self.is_moe:
            return []
        n, freq, first = self.model.num_layers, self.model.moe_layer_freq, self.model.moe_dense_first_layers
        return [i for i in range(first, n) if (n - 1 - i) % freq == 0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "train": TrainConfig}


def _literal_choices(annotation: Any) -> Optional[tuple]:
    """The allowed values of a ``Literal`` annotation; None for any other annotation."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _choices_text(choices: tuple) -> str:
    """``(None, "Jitter", "RSample")`` -> ``"None, 'Jitter' or 'RSample'"``."""
    words = [repr(choice) for choice in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _did_you_mean(value: Any, choices: tuple) -> str:
    """``"; did you mean 'RSample'?"`` for a string close to one of ``choices``, else ``""``."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_choice(value: Any, choices: tuple) -> bool:
    # Compared with the type too, so that neither 1 nor True passes for a string option.
    return any(value is choice or (type(value) is type(choice) and value == choice) for choice in choices)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "None" if annotation is type(None) else annotation.__name__


def _check_value(where: str, value: Any, annotation: Any) -> None:
    """ConfigError unless ``value`` fits ``annotation``: one of a Literal's values, or of the right type."""
    choices = _literal_choices(annotation)
    if choices is not None:
        if not _is_choice(value, choices):
            hint = _did_you_mean(value, choices)
            raise ConfigError(f"`{where}` must be {_choices_text(choices)}, got {value!r}{hint}")
    elif not _type_ok(value, annotation):
        raise ConfigError(f"`{where}` must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _build_section(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"`{section}` must be a dict, got {type(values).__name__}; write {section} = dict(...)")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if section == "model" and key in UNSUPPORTED_MODEL_KEYS:
            raise ConfigError(f"`model.{key}`: {UNSUPPORTED_MODEL_KEYS[key]}")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean `{section}.{close[0]}`?" if close else f"; known keys: {', '.join(sorted(hints))}"
            raise ConfigError(f"unknown key `{section}.{key}`{hint}")
        _check_value(f"{section}.{key}", value, hints[key])
        kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"model.num_experts=8"`` -> ("model", "num_experts", 8); values are Python literals or bare strings."""
    if "=" not in text:
        raise ConfigError(f"bad --set {text!r}: expected section.key=value, e.g. --set model.num_experts=8")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"bad --set {text!r}: the key must be section.key (sections: {', '.join(SECTIONS)})")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"bad --set {text!r}: unknown section `{section}` (sections: {', '.join(SECTIONS)})")
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string
    return section, key, value


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RecipeConfig:
    """Read a Python config file, apply ``--set`` overrides, validate, return the typed config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass one of recipe/configs/*.py or your own file")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:  # the user's Python failed: say where
        raise ConfigError(f"config file {path} failed to run: {type(exc).__name__}: {exc}") from exc
    raw = {}
    for name, value in namespace.items():
        if name.startswith("_") or name.isupper() or callable(value) or type(value).__name__ == "module":
            continue
        if name not in SECTIONS and name != "model_type":
            close = difflib.get_close_matches(name, list(SECTIONS) + ["model_type"], n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"unknown top-level name `{name}` in {path}{hint} "
                              f"(allowed: model_type, {', '.join(SECTIONS)}; constants must be UPPER_CASE)")
        raw[name] = dict(value) if isinstance(value, dict) else value
    return config_from_dict(raw, overrides, source=str(path))


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None, source: str = "",
                     resolve_init_from: bool = True) -> RecipeConfig:
    """The validated config of raw sections; with ``train.init_from`` (and ``resolve_init_from``) the model section
    is first filled in from the source's config.json (recipe/init_from.py)."""
    raw = {name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()}
    for text in overrides or []:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    if resolve_init_from:
        from . import init_from  # imports no torch; reads the source's config.json only when the key is set

        raw = init_from.resolve(raw)
    model_type = raw.get("model_type", "INTERNLM_MoE")
    model_types = typing.get_args(ModelType)
    if not _is_choice(model_type, model_types):
        raise ConfigError(f"model_type must be one of {sorted(model_types)}, got {model_type!r}"
                          f"{_did_you_mean(model_type, model_types)}")
    sections = {name: _build_section(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    config = RecipeConfig(model_type=model_type, source=source, **sections)
    validate(config)
    if resolve_init_from and config.train.init_from is not None:
        from . import init_from

        init_from.check(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: RecipeConfig) -> None:
    """Value checks that need no launch information (world size and EP: ``recipe.ds_config``).

    Types and the string options' allowed values were checked when the sections were built."""
    m, t, d = config.model, config.train, config.data
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_seq_len", "multiple_of"):
        _require(getattr(m, name) > 0, f"`model.{name}` must be > 0, got {getattr(m, name)}")
    _validate_attention(m)
    for name in ("intermediate_size", "moe_intermediate_size", "moe_shared_expert_intermediate_size"):
        _require(getattr(m, name) is None or getattr(m, name) > 0, f"`model.{name}` must be > 0 or None")
    _require(m.mlp_ratio > 0, f"`model.mlp_ratio` must be > 0, got {m.mlp_ratio}")
    _require(0 < d.seq_len <= m.max_seq_len,
             f"`data.seq_len` ({d.seq_len}) must be in 1..model.max_seq_len ({m.max_seq_len}); "
             f"raise model.max_seq_len or lower data.seq_len")
    if config.is_moe:
        _validate_moe(m)
        _validate_routing(m)
        if m.moe_impl == "deepspeed":
            _validate_deepspeed_moe(config)
    for name in ("moe_loss_coeff", "router_z_loss_coeff"):
        _require(getattr(config.loss, name) >= 0, f"`loss.{name}` must be >= 0")
    for name in ("steps", "log_every", "eval_every", "eval_batches", "save_every", "keep_last", "max_bad_steps"):
        _require(getattr(t, name) > 0, f"`train.{name}` must be > 0, got {getattr(t, name)}")


def _validate_attention(m: ModelConfig) -> None:
    heads, kv_heads = m.num_attention_heads, m.resolved_kv_heads
    _require(kv_heads > 0 and heads % kv_heads == 0,
             f"`model.num_key_value_heads` ({kv_heads}) must divide `model.num_attention_heads` ({heads})")
    if m.head_dim is None:
        _require(m.hidden_size % heads == 0,
                 f"`model.hidden_size` ({m.hidden_size}) must be divisible by `model.num_attention_heads` ({heads}), "
                 f"or set `model.head_dim`")
    head_dim = m.resolved_head_dim
    _require(head_dim > 0 and head_dim % 2 == 0,
             f"head size {head_dim} must be even and > 0 for rotary embeddings; change `model.head_dim`, "
             f"hidden_size or num_attention_heads")


def _validate_moe(m: ModelConfig) -> None:
    _require(m.num_experts >= 1, f"`model.num_experts` must be >= 1, got {m.num_experts}")
    _require(m.moe_gate_k >= 1, f"`model.moe_gate_k` must be >= 1, got {m.moe_gate_k}")
    _require(m.moe_gate_k <= m.num_experts,
             f"`model.moe_gate_k` ({m.moe_gate_k}) exceeds `model.num_experts` ({m.num_experts}); "
             f"lower moe_gate_k or add experts")
    for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
        _require(getattr(m, name) > 0, f"`model.{name}` must be > 0, got {getattr(m, name)}")
    _require(m.moe_min_capacity >= 0, f"`model.moe_min_capacity` must be >= 0, got {m.moe_min_capacity}")
    _require(m.moe_layer_freq >= 1, f"`model.moe_layer_freq` must be >= 1, got {m.moe_layer_freq}")
    _require(0 <= m.moe_dense_first_layers < m.num_layers,
             f"`model.moe_dense_first_layers` ({m.moe_dense_first_layers}) must be in 0..num_layers-1 "
             f"({m.num_layers - 1}); use model_type='INTERNLM' for a dense model")
    _require(m.moe_num_shared_experts >= 0, "`model.moe_num_shared_experts` must be >= 0")
    _require(not m.moe_shared_expert_gate or m.moe_num_shared_experts > 0,
             "`model.moe_shared_expert_gate=True` needs a shared expert; set model.moe_num_shared_experts >= 1")


def _validate_routing(m: ModelConfig) -> None:
    """The routing options' ranges and combinations (the layer repeats the range checks for direct users)."""
    k, experts, groups = m.moe_gate_k, m.num_experts, m.moe_num_expert_groups
    _require(m.moe_route_scale > 0, f"`model.moe_route_scale` must be > 0, got {m.moe_route_scale}")
    _require(m.moe_bias_update_rate >= 0, "`model.moe_bias_update_rate` must be >= 0 (0 = off)")
    _require(groups >= 1 and experts % groups == 0,
             f"`model.moe_num_expert_groups` ({groups}) must divide `model.num_experts` ({experts})")
    _require(1 <= m.moe_topk_groups <= groups,
             f"`model.moe_topk_groups` ({m.moe_topk_groups}) must be in 1..moe_num_expert_groups ({groups})")
    _require(k <= m.moe_topk_groups * (experts // groups),
             f"`model.moe_gate_k` ({k}) exceeds the experts in the best {m.moe_topk_groups} groups "
             f"({m.moe_topk_groups * (experts // groups)}); raise moe_topk_groups")
    _require(not (m.moe_use_rts and m.moe_capacity_priority == "probs"),
             "`model.moe_use_rts=True` with `model.moe_capacity_priority='probs'`: the gate values decide who is "
             "kept, so a random order has nothing to decide; use 'choice' or 'position', or set moe_use_rts=False")


def _validate_deepspeed_moe(config: RecipeConfig) -> None:
    """Settings ``deepspeed.moe.layer.MoE`` (0.19) cannot express are refused, never silently changed."""
    m, why = config.model, "with `model.moe_impl='deepspeed'` (the benchmarking baseline)"
    _require(m.moe_expert == "swiglu",
             f"`model.moe_expert={m.moe_expert!r}` {why}: only the SwiGLU expert is built for DeepSpeed's layer; "
             f"use moe_impl='recipe' for registered experts")
    _require(m.moe_gate == "gshard",
             f"`model.moe_gate={m.moe_gate!r}` {why}: DeepSpeed's layer has its own GShard gate only; "
             f"use moe_impl='recipe' for registered gates")
    _validate_deepspeed_routing(m, why)
    if m.moe_gate_k >= 2:
        # DeepSpeed's top-2 and top-k gates ignore both silently.
        _require(m.moe_noisy_gate_policy is None,
                 f"`model.moe_noisy_gate_policy={m.moe_noisy_gate_policy!r}` {why}: DeepSpeed's top-{m.moe_gate_k} gate "
                 f"ignores it; set it to None or use moe_gate_k=1")
        _require(not m.moe_use_rts, f"`model.moe_use_rts=True` {why}: DeepSpeed's top-{m.moe_gate_k} gate ignores it; "
                                    f"set it False")
    _require(not m.moe_balance_over_data_parallel,
             f"`model.moe_balance_over_data_parallel=True` {why}: DeepSpeed computes the balancing loss per rank; "
             f"set model.moe_balance_over_data_parallel=False")
    _require(config.loss.router_z_loss_coeff == 0,
             f"`loss.router_z_loss_coeff={config.loss.router_z_loss_coeff}` {why}: DeepSpeed's layer has no router "
             f"z-loss; set it to 0")


def _validate_deepspeed_routing(m: ModelConfig, why: str) -> None:
    """DeepSpeed's gates: softmax scores, renormalised over survivors, no bias, groups or scale; at k <= 2 GShard's
    capacity queue and first-choice loss, at k >= 3 (``topkgating``) the 'probs' queue and the all-choices loss."""
    for key, value, default in (("moe_score_function", m.moe_score_function, "softmax"),
                                ("moe_norm_topk_prob", m.moe_norm_topk_prob, None),
                                ("moe_route_scale", m.moe_route_scale, 1.0),
                                ("moe_bias_update_rate", m.moe_bias_update_rate, 0.0),
                                ("moe_num_expert_groups", m.moe_num_expert_groups, 1)):
        _require(value == default, f"`model.{key}={value!r}` {why}: DeepSpeed's gate has no such option; "
                                   f"set it to {default!r} or use moe_impl='recipe'")
    gshard = m.moe_gate_k <= 2
    priority, loss = ("choice", "gshard") if gshard else ("probs", "switch")
    for key, value, wanted in (("moe_capacity_priority", m.moe_capacity_priority, priority),
                               ("moe_balance_loss", m.moe_balance_loss, loss)):
        _require(value == wanted, f"`model.{key}={value!r}` {why}: DeepSpeed's top-{m.moe_gate_k} gate uses "
                                  f"{wanted!r}; set it, or use moe_impl='recipe'")


def parameter_counts(config: RecipeConfig) -> dict[str, int]:
    """Total parameters and parameters active per token (routed experts count k of E), whole model; exactly
    ``sum(p.numel() for p in TransformerLM(config).parameters())`` for the total (tests hold it to that)."""
    m = config.model
    d, heads, kv_heads, head_dim = m.hidden_size, m.num_attention_heads, m.resolved_kv_heads, m.resolved_head_dim
    qkv_rows = (heads + 2 * kv_heads) * head_dim  # the fused wqkv: [q: H·D; k: KV·D; v: KV·D]
    attention = d * qkv_rows + heads * head_dim * d + (qkv_rows if m.qkv_bias else 0)
    attention += {"none": 0, "head": 2 * head_dim, "full": (heads + kv_heads) * head_dim}[m.qk_norm]  # q_norm, k_norm
    norms = 2 * d  # attention_norm, ffn_norm
    embed = m.vocab_size * d
    head = 0 if m.tie_word_embeddings else m.vocab_size * d
    total = active = embed + head + d  # + final norm
    moe_layers = set(config.moe_layer_ids())
    for layer in range(m.num_layers):
        total += attention + norms
        active += attention + norms
        if layer in moe_layers:
            expert = 3 * d * m.expert_size  # one SwiGLU expert: w1, w3 (F, M), w2 (M, F)
            always = d * m.num_experts + 3 * d * m.shared_expert_size + (d if m.moe_shared_expert_gate else 0)
            total += m.num_experts * expert + always  # router, shared experts and their gate: every token
            active += m.moe_gate_k * expert + always
        else:
            total += 3 * d * m.ffn_size
            active += 3 * d * m.ffn_size
    return {"total": total, "active": active}


def config_from_saved(saved: dict) -> RecipeConfig:
    """A config from its ``to_dict()`` form (config.json, checkpoints); keys added to the recipe since it was
    saved take their defaults, so older runs still load, resume and export."""
    return config_from_dict({k: v for k, v in saved.items() if k != "source"}, source=saved.get("source", ""),
                            resolve_init_from=False)  # resolved when the run started; the source may be gone
