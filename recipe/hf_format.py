"""The Hugging Face side of the recipe's model, both ways: which ``transformers`` architecture computes a config,
how every weight is named there, and the ``config.json`` that says so. Pure names and dicts; no torch here.

Export (``recipe/export.py``) and import (``recipe/hf_import.py``) share ``key_map``, so a weight can only be named
one way. Architectures (transformers 5.23 class names) and what each computes exactly, in eval mode without
dropping tokens:

* ``mixtral`` (MixtralForCausalLM): every FFN an MoE layer, softmax scores renormalised over the k chosen, no q/k/v
  bias, no q/k norm, no shared expert;
* ``qwen2_moe`` (Qwen2MoeForCausalLM): any set of MoE layers (``mlp_only_layers``), renormalised or raw scores
  (``norm_topk_prob``), optional q/k/v biases, a sigmoid-gated shared expert (width 0 when we have none);
* ``qwen3_moe`` (Qwen3MoeForCausalLM): as Qwen2-MoE with RMSNorm on each q and k head (``qk_norm="head"``), no
  biases and no shared expert;
* ``olmoe`` (OlmoeForCausalLM): every FFN an MoE layer, RMSNorm over all q heads and all k heads together
  (``qk_norm="full"``), head_dim = hidden_size / heads, no biases, no shared expert.

The dense families (``llama``, ``qwen2``, ``qwen3``) are read only, as sources for upcycling.
"""
from __future__ import annotations

from typing import Optional

from .config import RecipeConfig
from .model.expert_keys import EXPERT_GROUP_PATH, expert_key

MOE_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
DENSE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TORCH = "export with --format torch"
# Written into a run started from a Hugging Face folder: the config.json it came from (export keeps its fields).
HF_SOURCE_CONFIG = "hf_source_config.json"
# Our names of a SwiGLU's three matrices and each family's: gate (w1), up (w3), down (w2).
OUR_SWIGLU = ("w1", "w3", "w2")
HF_SWIGLU = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT = ("w1", "w3", "w2")


class ExportError(ValueError):
    """The model cannot be expressed in the requested format; the message says why and what would."""


def renormalises_over_k(config: RecipeConfig) -> bool:
    """Whether the combine weights are the k chosen scores renormalised to sum 1 (else the raw softmax scores):
    ``moe_norm_topk_prob``, or when it is None (GShard), renormalised over the survivors from k = 2 on, which
    are the k chosen when no token is dropped."""
    m = config.model
    return m.moe_norm_topk_prob if m.moe_norm_topk_prob is not None else m.moe_gate_k >= 2


def _common_refusal(config: RecipeConfig) -> Optional[str]:
    """What none of the four MoE classes computes (the first reason, with the key and the way out), or None.
    Options that act only while training (noise, sampling, the balancing loss) are no reason."""
    m = config.model
    if not config.is_moe:
        return f"dense models: {TORCH} (no MoE architecture applies)"
    if m.moe_expert != "swiglu" or m.moe_gate != "gshard":
        return (f"expert {m.moe_expert!r} / gate {m.moe_gate!r}: only SwiGLU experts with GShard gating map onto "
                f"transformers' MoE models; {TORCH}")
    reasons = (
        (m.moe_score_function != "softmax", f"`model.moe_score_function={m.moe_score_function!r}`: transformers' "
                                            f"Mixtral, Qwen-MoE and OLMoE route by softmax scores; {TORCH}"),
        (m.moe_bias_update_rate != 0, f"`model.moe_bias_update_rate={m.moe_bias_update_rate}`: the expert bias "
                                      f"changes which experts are chosen, which no exported class can; {TORCH}"),
        (m.moe_route_scale != 1, f"`model.moe_route_scale={m.moe_route_scale}`: no exported class scales "
                                 f"the combine weights; {TORCH}"),
        (m.moe_num_expert_groups != 1, f"`model.moe_num_expert_groups={m.moe_num_expert_groups}`: group-limited "
                                       f"routing is in none of the exported classes; {TORCH}"),
        (m.moe_num_shared_experts > 0 and not m.moe_shared_expert_gate,
         f"shared experts without a gate (`model.moe_num_shared_experts={m.moe_num_shared_experts}`, "
         f"`model.moe_shared_expert_gate=False`): Qwen2-MoE always scales its shared expert by a sigmoid gate; "
         f"{TORCH}"),
    )
    return next((message for refused, message in reasons if refused), None)


def _class_refusal(config: RecipeConfig, arch: str) -> Optional[str]:
    """Why ``arch`` does not compute this model (beyond ``_common_refusal``), or None."""
    m, name = config.model, MOE_CLASSES[arch]
    every_layer_moe = config.moe_layer_ids() == list(range(m.num_layers))
    wanted_norm = {"mixtral": "none", "qwen2_moe": "none", "qwen3_moe": "head", "olmoe": "full"}[arch]
    norm_text = "no q/k norm" if wanted_norm == "none" else f"qk_norm={wanted_norm!r}"
    shared = m.moe_num_shared_experts
    reasons = (
        (m.qk_norm != wanted_norm, f"`model.qk_norm={m.qk_norm!r}`: {name} has {norm_text}"),
        (arch != "qwen2_moe" and m.qkv_bias, f"`model.qkv_bias=True`: {name} has no q/k/v biases"),
        (arch != "qwen2_moe" and shared > 0, f"`model.moe_num_shared_experts={shared}`: {name} has no shared expert"),
        (arch in ("mixtral", "olmoe") and not every_layer_moe,
         f"dense FFN layers (`model.moe_layer_freq`, `model.moe_dense_first_layers`): every {name} layer is an MoE"),
        (arch == "mixtral" and not renormalises_over_k(config),
         f"raw top-k scores (`model.moe_norm_topk_prob`): {name} always renormalises over the k chosen"),
        (arch == "olmoe" and m.num_attention_heads * m.resolved_head_dim != m.hidden_size,
         f"`model.head_dim={m.head_dim}`: {name} has heads x head_dim = hidden_size"),
    )
    return next((message for refused, message in reasons if refused), None)


def hf_architecture(config: RecipeConfig) -> str:
    """The ``MOE_CLASSES`` key of the class that computes this model: ``model.hf_architecture`` when it was imported
    from one (so an export gives the same class back), else the first that fits; ExportError naming the option."""
    refusal = _common_refusal(config)
    if refusal:
        raise ExportError(refusal)
    wanted = config.model.hf_architecture
    if wanted is not None:
        refusal = _class_refusal(config, wanted)
        if refusal:
            raise ExportError(f"{refusal}, but the model was imported from {MOE_CLASSES[wanted]} "
                              f"(`model.hf_architecture`); {TORCH}")
        return wanted
    for arch in MOE_CLASSES:
        if _class_refusal(config, arch) is None:
            return arch
    # The class named by the q/k norm is the one to report: it is the only one that could apply.
    by_norm = {"none": "qwen2_moe", "head": "qwen3_moe", "full": "olmoe"}[config.model.qk_norm]
    raise ExportError(f"{_class_refusal(config, by_norm)}; {TORCH}")


def qkv_split_sizes(config: RecipeConfig) -> list[int]:
    """Rows of the fused ``wqkv``: [q: H·D; k: KV·D; v: KV·D], heads contiguous (HF's q_proj, k_proj, v_proj)."""
    m = config.model
    kv = m.resolved_kv_heads * m.resolved_head_dim
    return [m.num_attention_heads * m.resolved_head_dim, kv, kv]


def _attention_keys(config: RecipeConfig) -> dict[str, tuple[str, ...]]:
    m = config.model
    keys = {"embedding.weight": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",),
            # tied: our lm_head is the embedding; HF files may omit the head then, so it is read from the embedding
            "lm_head.weight": ("model.embed_tokens.weight" if m.tie_word_embeddings else "lm_head.weight",)}
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
            keys[f"{src}attention.wqkv.{kind}"] = tuple(f"{dst}self_attn.{n}_proj.{kind}" for n in "qkv")
        keys[src + "attention.wo.weight"] = (dst + "self_attn.o_proj.weight",)
        keys[src + "attention_norm.weight"] = (dst + "input_layernorm.weight",)
        keys[src + "ffn_norm.weight"] = (dst + "post_attention_layernorm.weight",)
        if m.qk_norm != "none":
            keys[src + "attention.q_norm.weight"] = (dst + "self_attn.q_norm.weight",)
            keys[src + "attention.k_norm.weight"] = (dst + "self_attn.k_norm.weight",)
    return keys


def key_map(config: RecipeConfig, arch: str) -> dict[str, tuple[str, ...]]:
    """Every weight of our model (global expert ids) -> the HF tensors it is made of, concatenated along dim 0
    (three for ``wqkv``: ``qkv_split_sizes``; one otherwise). ``arch``: a ``MOE_CLASSES`` or ``DENSE_CLASSES`` key.
    Not in the map: buffers (the routing bias, which no HF class has)."""
    m = config.model
    keys = _attention_keys(config)
    moe_layers = set(config.moe_layer_ids())
    mlp = "block_sparse_moe" if arch == "mixtral" else "mlp"
    expert_names = MIXTRAL_EXPERT if arch == "mixtral" else HF_SWIGLU
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}.{mlp}."
        if i not in moe_layers:
            keys.update({f"{src}ffn.{ours}.weight": (f"{dst}{theirs}.weight",)
                         for ours, theirs in zip(OUR_SWIGLU, HF_SWIGLU)})
            continue
        keys[src + "ffn.deepspeed_moe.gate.wg.weight"] = (dst + "gate.weight",)
        group = f"{src}ffn.{EXPERT_GROUP_PATH}."
        for e in range(m.num_experts):
            for ours, theirs in zip(OUR_SWIGLU, expert_names):
                keys[expert_key(group, e, f"{ours}.weight")] = (f"{dst}experts.{e}.{theirs}.weight",)
        if m.moe_num_shared_experts:
            keys.update({f"{src}shared_mlp.{ours}.weight": (f"{dst}shared_expert.{theirs}.weight",)
                         for ours, theirs in zip(OUR_SWIGLU, HF_SWIGLU)})
        if m.moe_shared_expert_gate:
            keys[src + "shared_gate.weight"] = (dst + "shared_expert_gate.weight",)
    return keys


def hf_config_dict(config: RecipeConfig, arch: str, base: Optional[dict] = None) -> dict:
    """``config.json`` for ``arch``: ``base`` (the config.json the model was imported from, when it has the same
    model_type: its other fields, such as token ids, come back) updated with every field that decides the math."""
    m = config.model
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.resolved_kv_heads,
                  head_dim=m.resolved_head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  hidden_act="silu", tie_word_embeddings=m.tie_word_embeddings, attention_dropout=0.0,
                  dtype="float32", rope_theta=m.rope_theta,
                  rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  num_experts_per_tok=m.moe_gate_k, router_aux_loss_coef=config.loss.moe_loss_coeff,
                  model_type=arch, architectures=[MOE_CLASSES[arch]])
    dense_layers = [i for i in range(m.num_layers) if i not in set(config.moe_layer_ids())]
    per_class = {
        "mixtral": dict(intermediate_size=m.expert_size, num_local_experts=m.num_experts, sliding_window=None,
                        router_jitter_noise=0.0),
        "qwen2_moe": dict(intermediate_size=m.ffn_size, moe_intermediate_size=m.expert_size, num_experts=m.num_experts,
                          shared_expert_intermediate_size=m.shared_expert_size,
                          norm_topk_prob=renormalises_over_k(config), qkv_bias=m.qkv_bias, decoder_sparse_step=1,
                          use_sliding_window=False, mlp_only_layers=dense_layers),
        "qwen3_moe": dict(intermediate_size=m.ffn_size, moe_intermediate_size=m.expert_size, num_experts=m.num_experts,
                          norm_topk_prob=renormalises_over_k(config), attention_bias=False, decoder_sparse_step=1,
                          use_sliding_window=False, sliding_window=None, mlp_only_layers=dense_layers),
        "olmoe": dict(intermediate_size=m.expert_size, num_experts=m.num_experts,
                      norm_topk_prob=renormalises_over_k(config), attention_bias=False, clip_qkv=None),
    }[arch]
    base = base or {}
    # The source's other fields when it is this class; from another class (an upcycled Llama) its token ids only.
    kept = dict(base) if base.get("model_type") == arch else {k: v for k, v in base.items() if k.endswith("token_id")}
    for stale in ("layer_types", "rope_scaling", "num_local_experts", "num_experts", "torch_dtype",
                  "quantization_config"):
        kept.pop(stale, None)  # recomputed by transformers from the fields below, or renamed between versions
    # a run trained on shorter sequences keeps the context length its source was made for
    positions = max(m.max_seq_len, int(base.get("max_position_embeddings") or 0))
    return {**kept, **common, **per_class, "max_position_embeddings": positions}
