"""Dense -> MoE upcycling: an MoE model that starts as exactly the dense model it came from. Pure model math.

``train.init_from = "upcycle:SOURCE"`` (wired by the trainer) calls, in order: a reader (``read_recipe_run`` for
a dense recipe run; the Hugging Face reader elsewhere) -> ``upcycle_model_dict`` (architecture from the source,
MoE options from the user) -> ``check_upcycle`` -> ``upcycled_state`` on each expert-parallel rank.

The scheme (granular upcycling, as Megatron-core's ``upcycling_utils``, but exact for SwiGLU). The dense FFN
``FFN(x) = W2 (silu(W1 x) ⊙ W3 x)`` of width D is cut into G = D / F slices of F hidden units: slice g is rows
g·F..(g+1)·F of W1 and W3 and the same columns of W2. SwiGLU is a sum over its hidden units, so
``Σ_g FFN_g(x) = FFN(x)`` exactly, up to the order of the float additions. The E = N·G routed experts are
N copies of the dense FFN, each cut in G: expert e is slice e % G of copy e // G (copy-major: a copy's G
slices sit side by side, on one rank when E_local is a multiple of G), with its W2 slice scaled by G (below).

Why the MoE output equals FFN(x) at step 0:
* the router row of every expert of copy c is the same vector r_c (Normal(0, init_std), drawn per copy), so
  the G logits of a copy are the same number. Top-k with k = k_c·G takes the k largest: the G slices each of
  the k_c best copies (whole copies; a tie between copies has probability 0, and an ulp of rounding inside a
  copy cannot reorder copies). Hence moe_gate_k must be a multiple of G;
* normalised combine weights (moe_norm_topk_prob=True, or None at k >= 2 with nothing dropped; softmax or
  sigmoid scores alike) sum to 1 over the k chosen, and tie inside a copy: each slice of copy c gets
  ω_c = s_c / G, with Σ_c s_c = 1 over the chosen copies;
* so the output is ``Σ_c Σ_g ω_c·G·FFN_g(x) = Σ_c s_c·FFN(x) = FFN(x)``: the factor G on each W2 slice
  undoes the 1/G of the weights. W2 is linear, so scaling it is exact (Megatron-core scales W1, W3 and W2 by
  G^(1/3), which silu does not carry through exactly);
* raw weights (norm False, or None at k = 1) sum to less than 1, route_scale != 1 scales them, group-limited
  routing with groups not made of whole copies, and noise that picks slices of different copies (RSample;
  second_expert_policy='sampling' at G > 1) all break the argument: ``check_upcycle`` refuses them;
* shared experts (any width): W1, W3 Normal(0, init_std), W2 zeros, so they add exactly 0 (a shared gate,
  Normal(0, init_std), multiplies that 0); they learn from there. The aux-loss-free bias starts at 0;
* every other tensor (embedding, attention, norms, head, FFN slots kept dense) is the dense model's.

Exactness holds where no pair is dropped: with moe_drop_tokens=True a token whose slice overflows its expert's
capacity loses that slice. The loss adds moe_loss_coeff·l_aux and the z-loss to the equal LM loss.

Random draws come from a generator keyed by the draw's global state-dict name and ``seed``, as
``TransformerLM.init_weights`` keys its own, so every expert-parallel layout gets the same router and shared
experts; expert slices are copies of the dense weights. From step 1 the gradients differ between the slices
of a copy (their outputs differ) and between copies (their router rows differ): the experts specialise.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import checkpoint_root, latest_tag
from .config import ConfigError, ModelConfig, RecipeConfig, config_from_saved
from .model.expert_keys import EXPERT_GROUP_PATH, expert_key
from .reshard import best_weights

# The model.* keys that fix the dense computation; the upcycled model takes them from its source.
DENSE_ARCHITECTURE_KEYS: tuple[str, ...] = (
    "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "qk_norm", "qkv_bias",
    "vocab_size", "norm_eps", "rope_theta", "tie_word_embeddings", "intermediate_size",
)
# Superseded by intermediate_size: taken from the source; a user value must give the same dense width.
_WIDTH_RULE_KEYS = ("mlp_ratio", "multiple_of")
# State-dict names inside an MoE FFN slot (recipe/model/moe/layer.py); the tests check them against a real model.
_ROUTER = "deepspeed_moe.gate.wg.weight"
_ROUTER_BIAS = "deepspeed_moe.gate.e_score_correction_bias"
_SWIGLU = ("w1.weight", "w3.weight", "w2.weight")


# ---- the model section ---------------------------------------------------------------------------------------

def source_model_dict(model: ModelConfig) -> dict:
    """A source's model section with the values a reader must resolve: intermediate_size (the dense FFN width),
    num_key_value_heads and head_dim."""
    resolved = dataclasses.asdict(model)
    resolved.update(intermediate_size=model.ffn_size, num_key_value_heads=model.resolved_kv_heads,
                    head_dim=model.resolved_head_dim)
    return resolved


def _resolved_source(source_model: dict, source: str) -> dict:
    """The architecture keys (and the width rule, where given) of the source, None-valued ones resolved."""
    missing = [key for key in DENSE_ARCHITECTURE_KEYS if key not in source_model]
    if missing:
        raise ConfigError(f"the upcycling source {source} gives no model.{missing[0]}; its reader must resolve "
                          f"every key of DENSE_ARCHITECTURE_KEYS (see recipe.upcycle.source_model_dict)")
    arch = {key: source_model[key] for key in DENSE_ARCHITECTURE_KEYS + _WIDTH_RULE_KEYS if key in source_model}
    if arch["num_key_value_heads"] is None:
        arch["num_key_value_heads"] = arch["num_attention_heads"]
    if arch["head_dim"] is None:
        arch["head_dim"] = arch["hidden_size"] // arch["num_attention_heads"]
    if arch["intermediate_size"] is None:
        arch["intermediate_size"] = _width_from_rule(arch, arch)
    return arch


def _width_from_rule(rule: dict, arch: dict) -> int:
    """The dense FFN width that mlp_ratio/multiple_of of ``rule`` (defaults where absent) give at the source's
    hidden size: ModelConfig's own rule."""
    defaults = ModelConfig()
    return ModelConfig(hidden_size=arch["hidden_size"], mlp_ratio=rule.get("mlp_ratio", defaults.mlp_ratio),
                       multiple_of=rule.get("multiple_of", defaults.multiple_of)).ffn_size


def _user_value(key: str, user_model: dict, arch: dict) -> Any:
    """The user's value of an architecture key, a None resolved as the config would resolve it on the source."""
    value = user_model[key]
    if value is None and key == "num_key_value_heads":
        return arch["num_attention_heads"]
    if value is None and key == "head_dim":
        return arch["hidden_size"] // arch["num_attention_heads"]
    if value is None and key == "intermediate_size":
        return _width_from_rule(user_model, arch)
    return value


def _differs(key: str, shown: Any, expected: Any, source: str) -> ConfigError:
    return ConfigError(f"`model.{key}={shown!r}` differs from the upcycling source {source} ({key}={expected!r}); "
                       f"drop the key: the architecture comes from the source")


def upcycle_model_dict(source_model: dict, user_model: dict, source: str) -> dict:
    """The upcycled model section (raw, for ``config_from_dict``): DENSE_ARCHITECTURE_KEYS from the source,
    every other key from the user. A user architecture key must equal the source's (ConfigError otherwise);
    max_seq_len is the user's when it does not exceed the source's."""
    arch = _resolved_source(source_model, source)
    for key in DENSE_ARCHITECTURE_KEYS:
        if key in user_model and _user_value(key, user_model, arch) != arch[key]:
            raise _differs(key, user_model[key], arch[key], source)
    given_rule = [key for key in _WIDTH_RULE_KEYS if key in user_model]
    if given_rule and "intermediate_size" not in user_model:  # an explicit intermediate_size overrides them
        width = _width_from_rule(user_model, arch)
        if width != arch["intermediate_size"]:
            key = given_rule[0]
            raise ConfigError(f"`model.{key}={user_model[key]!r}` gives a dense FFN width of {width}, but the "
                              f"upcycling source {source} has intermediate_size={arch['intermediate_size']}; drop "
                              f"the key: the architecture comes from the source")
    # Dropless unless the user asks: a dropped slice would break the step-0 equality.
    merged = {"moe_drop_tokens": False, **{key: value for key, value in user_model.items() if key not in arch}}
    merged.update(arch)
    source_len = source_model.get("max_seq_len")
    user_len = user_model.get("max_seq_len", source_len)
    if source_len is not None and user_len is not None and user_len > source_len:
        raise ConfigError(f"`model.max_seq_len={user_len}` exceeds the upcycling source {source} "
                          f"(max_seq_len={source_len}): its positions were trained up to there; lower it or drop "
                          f"the key")
    if user_len is not None:
        merged["max_seq_len"] = user_len
    return merged


# ---- can the MoE start equal to the dense model? --------------------------------------------------------------

def granularity(config: RecipeConfig) -> int:
    """G = dense FFN width / expert width: how many slices each copy of the dense FFN is cut into."""
    m = config.model
    if m.ffn_size % m.expert_size != 0:
        raise ConfigError(
            f"`model.moe_intermediate_size={m.expert_size}` does not divide the dense FFN width {m.ffn_size}: each "
            f"upcycled expert is a 1/G slice of it; set moe_intermediate_size to {m.ffn_size} / G for an integer G "
            f"(e.g. {m.ffn_size // 2}), or drop it for G=1")
    return m.ffn_size // m.expert_size


def check_upcycle(config: RecipeConfig) -> None:
    """ConfigError (naming the key and the fix) unless the upcycled MoE starts equal to its dense source."""
    if not config.is_moe:
        raise ConfigError(f"`model_type={config.model_type!r}`: upcycling builds an MoE model from the dense "
                          f"source; set model_type='INTERNLM_MoE'")
    _check_layer_kind(config.model)
    G = granularity(config)
    _check_copies(config.model, G)
    _check_weights(config.model)
    _check_choice(config.model, G)


def _check_layer_kind(m: ModelConfig) -> None:
    if m.moe_impl != "recipe":
        raise ConfigError(f"`model.moe_impl={m.moe_impl!r}`: upcycling is built and verified for the recipe's MoE "
                          f"layer only (the DeepSpeed one is the benchmarking baseline); set moe_impl='recipe'")
    if m.moe_expert != "swiglu":
        raise ConfigError(f"`model.moe_expert={m.moe_expert!r}`: upcycling cuts the dense SwiGLU FFN into SwiGLU "
                          f"experts; set moe_expert='swiglu'")
    if m.moe_gate != "gshard":
        raise ConfigError(f"`model.moe_gate={m.moe_gate!r}`: upcycling is exact for the recipe's top-k gate only; "
                          f"set moe_gate='gshard'")


def _check_copies(m: ModelConfig, G: int) -> None:
    """The experts are whole copies of the dense FFN, and a token picks whole copies."""
    why = f"granularity G={G} (dense FFN width {m.ffn_size} / moe_intermediate_size {m.expert_size})"
    if m.num_experts % G != 0:
        raise ConfigError(f"`model.num_experts={m.num_experts}` is not a multiple of the {why}: the experts are "
                          f"copies of the dense FFN cut in G slices each; set num_experts to a multiple of {G}")
    if m.moe_gate_k % G != 0:
        raise ConfigError(
            f"`model.moe_gate_k={m.moe_gate_k}` is not a multiple of the {why}: a token must choose whole copies "
            f"(all G slices of each, which add up to the dense FFN), so k = (copies per token)·G; set moe_gate_k="
            f"{max(1, m.moe_gate_k // G) * G} (e.g. {2 * G} for 2 copies)")
    per_group = m.num_experts // m.moe_num_expert_groups
    if m.moe_num_expert_groups > 1 and per_group % G != 0:
        raise ConfigError(
            f"`model.moe_num_expert_groups={m.moe_num_expert_groups}` makes groups of {per_group} experts, which "
            f"split a copy's {G} slices (granularity G) between groups; use a count whose group size is a "
            f"multiple of {G}, or moe_num_expert_groups=1")


def _check_weights(m: ModelConfig) -> None:
    """The combine weights of the k chosen sum to 1."""
    if m.moe_norm_topk_prob is False:
        raise ConfigError(
            f"`model.moe_norm_topk_prob=False`: raw {m.moe_score_function} scores do not sum to 1 over the chosen "
            f"experts, so the MoE would not start equal to the dense model; set moe_norm_topk_prob=True")
    if m.moe_norm_topk_prob is None and m.moe_gate_k == 1:
        raise ConfigError(
            "`model.moe_norm_topk_prob=None` with moe_gate_k=1: GShard's top-1 weight is the raw score (< 1), so "
            "the MoE would start as a scaled-down dense model; set moe_norm_topk_prob=True")
    if m.moe_route_scale != 1:
        raise ConfigError(f"`model.moe_route_scale={m.moe_route_scale}` scales the combine weights, which must sum "
                          f"to 1 at the start; set moe_route_scale=1.0")


def _check_choice(m: ModelConfig, G: int) -> None:
    """Training noise must not choose slices of different copies (at G=1 any choice of copies is exact)."""
    if G == 1:
        return
    if m.moe_noisy_gate_policy == "RSample":
        raise ConfigError(
            f"`model.moe_noisy_gate_policy='RSample'` with granularity G={G}: Gumbel noise on the first choice "
            f"picks slices of different copies, so training would not start from the dense model; set "
            f"moe_noisy_gate_policy=None (or 'Jitter'), or G=1")
    if m.moe_second_expert_policy == "sampling":
        raise ConfigError(
            f"`model.moe_second_expert_policy='sampling'` with granularity G={G}: sampled choices pick slices of "
            f"different copies, so training would not start from the dense model; set "
            f"moe_second_expert_policy='argmax', or G=1")


# ---- the weights ---------------------------------------------------------------------------------------------

def _normal(global_key: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Normal(0, std) from the generator ``TransformerLM.init_weights`` keys by this global name and seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_key.encode()))
    return torch.randn(shape, generator=gen) * std


def _check_layout(config: RecipeConfig, ep_rank: int, num_local_experts: int) -> None:
    E = config.model.num_experts
    if num_local_experts < 1 or E % num_local_experts != 0:
        raise ValueError(f"num_local_experts={num_local_experts} must divide model.num_experts={E} "
                         f"(num_local_experts = num_experts / ep_size)")
    if not 0 <= ep_rank < E // num_local_experts:
        raise ValueError(f"ep_rank={ep_rank} out of range for ep_size={E // num_local_experts}")


def _dense_ffn(dense_state: dict, layer: int, config: RecipeConfig) -> tuple[torch.Tensor, ...]:
    """(w1, w3, w2) of the dense FFN of ``layer``, checked against the config's dense width."""
    m = config.model
    expected = {"w1.weight": (m.ffn_size, m.hidden_size), "w3.weight": (m.ffn_size, m.hidden_size),
                "w2.weight": (m.hidden_size, m.ffn_size)}
    weights = []
    for name in _SWIGLU:
        key = f"blocks.{layer}.ffn.{name}"
        if key not in dense_state:
            raise ValueError(f"the dense state has no {key}: it is not a dense recipe TransformerLM's state dict "
                             f"with model.num_layers={m.num_layers}")
        if tuple(dense_state[key].shape) != expected[name]:
            raise ValueError(f"the dense {key} is {tuple(dense_state[key].shape)}, but the upcycled config expects "
                             f"{expected[name]} (hidden_size, intermediate_size): the source and the config differ")
        weights.append(dense_state[key])
    return tuple(weights)


def _routed_experts(prefix: str, dense: tuple[torch.Tensor, ...], G: int, first: int,
                    num_local_experts: int) -> dict:
    """This rank's experts (local ids): expert e = first + local id is slice e % G of copy e // G; every copy
    is the same dense FFN, so only the slice matters. W2 slices times G (see the module docstring)."""
    w1, w3, w2 = dense
    F = w1.shape[0] // G
    group = f"{prefix}{EXPERT_GROUP_PATH}."
    experts = {}
    for local in range(num_local_experts):
        rows = slice((first + local) % G * F, ((first + local) % G + 1) * F)
        experts[expert_key(group, local, "w1.weight")] = w1[rows].clone()
        experts[expert_key(group, local, "w3.weight")] = w3[rows].clone()
        experts[expert_key(group, local, "w2.weight")] = w2[:, rows] * G
    return experts


def _moe_slot(prefix: str, dense: tuple[torch.Tensor, ...], config: RecipeConfig, G: int, ep_rank: int,
              num_local_experts: int, seed: int) -> dict:
    """Every state-dict entry of one MoE FFN slot (router, local experts, bias) and of its shared experts."""
    m, dtype = config.model, dense[0].dtype
    copies = m.num_experts // G
    # One row per copy, repeated for its G slices (copy-major), so a copy's logits tie.
    router = _normal(prefix + _ROUTER, (copies, m.hidden_size), m.init_std, seed).repeat_interleave(G, dim=0)
    slot = {prefix + _ROUTER: router.to(dtype)}
    if m.moe_bias_update_rate > 0:
        slot[prefix + _ROUTER_BIAS] = torch.zeros(m.num_experts, dtype=torch.float32)  # an fp32 buffer
    slot.update(_routed_experts(prefix, dense, G, ep_rank * num_local_experts, num_local_experts))
    return slot


def _shared_experts(block: str, config: RecipeConfig, dtype: torch.dtype, seed: int) -> dict:
    """The shared experts of ``block`` (one SwiGLU of their summed width) and their gate: W2 zeros, so they
    add exactly 0 at the start."""
    m = config.model
    shared = {}
    if m.moe_num_shared_experts > 0:
        width = m.shared_expert_size
        for name in ("w1.weight", "w3.weight"):
            key = f"{block}shared_mlp.{name}"
            shared[key] = _normal(key, (width, m.hidden_size), m.init_std, seed).to(dtype)
        shared[f"{block}shared_mlp.w2.weight"] = torch.zeros(m.hidden_size, width, dtype=dtype)
    if m.moe_shared_expert_gate:
        key = f"{block}shared_gate.weight"
        shared[key] = _normal(key, (1, m.hidden_size), m.init_std, seed).to(dtype)
    return shared


def upcycled_state(dense_state: dict, config: RecipeConfig, ep_rank: int, num_local_experts: int,
                   seed: int) -> dict:
    """The state dict that ``TransformerLM(config, ep_size=E / num_local_experts)`` on ``ep_rank`` loads with
    ``strict=True``, made from ``dense_state`` (a dense recipe TransformerLM of the source architecture).

    Non-FFN tensors and dense-kept FFN slots are the dense tensors themselves (not copies); expert slices,
    router and shared experts are new tensors. See the module docstring for the scheme."""
    check_upcycle(config)
    _check_layout(config, ep_rank, num_local_experts)
    G = granularity(config)
    moe_layers = config.moe_layer_ids()
    moe_prefixes = tuple(f"blocks.{layer}.ffn." for layer in moe_layers)
    state = {key: value for key, value in dense_state.items() if not key.startswith(moe_prefixes)}
    for layer, prefix in zip(moe_layers, moe_prefixes):
        dense = _dense_ffn(dense_state, layer, config)
        state.update(_moe_slot(prefix, dense, config, G, ep_rank, num_local_experts, seed))
        state.update(_shared_experts(f"blocks.{layer}.", config, dense[0].dtype, seed))
    return state


# ---- a dense recipe run as the source --------------------------------------------------------------------------

def _check_run_folder(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ConfigError(f"upcycling source {run_dir} is not a folder; pass a dense recipe run folder "
                          f"(holding checkpoints/) or a Hugging Face model folder")
    if latest_tag(run_dir) is None:
        raise ConfigError(f"upcycling source {run_dir} has no complete checkpoint in "
                          f"{checkpoint_root(run_dir)}; let the dense run save one (train.save_every) first")


def _dense_source_model(saved: Optional[dict], run_dir: Path) -> dict:
    """The resolved model section of a saved run config, refused unless the run is dense."""
    if saved is None:
        raise ConfigError(f"upcycling source {run_dir}: its checkpoint records no config; it was not saved by "
                          f"the recipe's trainer: pass a dense recipe run folder")
    config = config_from_saved(saved)
    if config.model_type != "INTERNLM":
        raise ConfigError(f"upcycling source {run_dir} is a model_type={config.model_type!r} run; upcycling starts "
                          f"from a dense one (model_type='INTERNLM'): pass a dense run, or continue this one with "
                          f"train.resume=True")
    return source_model_dict(config.model)


def read_recipe_run_model(run_dir: str | Path) -> dict:
    """The resolved model section of a dense recipe run, from its config.json (no weights read): what the
    upcycled config is built from before any rank starts."""
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    try:
        saved = json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = None
    return _dense_source_model(saved, run_dir)


def read_recipe_run(run_dir: str | Path) -> tuple[dict, dict]:
    """(the source's resolved model section, its dense state dict in float32) from a dense recipe run's
    newest complete checkpoint."""
    run_dir = Path(run_dir)
    _check_run_folder(run_dir)
    state, client, _ = best_weights(checkpoint_root(run_dir))  # a bf16 run's fp32 masters, not its rounded copies
    model = _dense_source_model(client.get("config"), run_dir)
    dense = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    return model, dense
