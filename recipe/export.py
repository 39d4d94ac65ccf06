"""Export a run's checkpoint: a consolidated fp32 state dict, or a Hugging Face folder.

    python -m recipe.export --run_dir runs/latest --format torch --out model_fp32.pt
    python -m recipe.export --run_dir runs/latest --format hf --out hf_model/

``torch``: every weight with global expert ids in one ``torch.save`` file (what DeepSpeed's
zero_to_fp32 gives a dense model, but with the expert files gathered in), plus the config. For bf16/fp16
runs the values are the optimizer's fp32 master weights (read from its shards, any layout), not the
16-bit module copies; both formats use them.

``hf``: ``config.json`` + ``model.safetensors`` in the layout of a ``transformers`` architecture that
computes exactly what our model computes in eval mode when no token is dropped (``hf_architecture``):

* every FFN an MoE layer, weights renormalised over the k chosen, no q/k/v bias, no shared expert ->
  Mixtral (any k, GQA, head_dim, expert width);
* otherwise -> Qwen2-MoE: ``norm_topk_prob`` says renormalised or raw softmax scores (GShard top-1),
  q/k/v biases (``qkv_bias``), a sigmoid-gated shared expert (ours, or width 0 when we have none),
  ``moe_intermediate_size`` beside the dense ``intermediate_size``, ``mlp_only_layers`` listing our dense
  layers (``moe_layer_freq``, ``moe_dense_first_layers``);
* refused by name (``ExportError``, with the way out): dense models, custom experts or gates, q/k norm,
  sigmoid scores, the expert bias, a route scale, expert groups, shared experts without a gate.
Differences that remain by design, printed as notes: capacity dropping (HF never drops; a dropping run
exports as its dropless model), and routing noise (off in eval anyway).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .checkpoint import checkpoint_root, consolidated_state_dict
from .config import RecipeConfig, config_from_saved
from .model.expert_keys import EXPERT_GROUP_PATH, expert_key
from .reshard import ReshardError, master_state_dict


class ExportError(ValueError):
    """The model cannot be expressed in the requested format; the message says why and what would."""


TORCH = "export with --format torch"


def _hf_refusal(config: RecipeConfig) -> Optional[str]:
    """Why neither Mixtral nor Qwen2-MoE computes this model (the first reason, with the key and the way out),
    or None. Options that act only while training (noise, sampling, the balancing loss) are no reason."""
    m = config.model
    if not config.is_moe:
        return f"dense models: {TORCH} (no MoE architecture applies)"
    if m.moe_expert != "swiglu" or m.moe_gate != "gshard":
        return (f"expert {m.moe_expert!r} / gate {m.moe_gate!r}: only SwiGLU experts with GShard gating map onto "
                f"transformers' MoE models; {TORCH}")
    reasons = (
        (m.qk_norm != "none", f"`model.qk_norm={m.qk_norm!r}`: Mixtral and Qwen2-MoE have no q/k norm "
                              f"(Qwen3-MoE / OLMoE classes are not written yet); {TORCH}"),
        (m.moe_score_function != "softmax", f"`model.moe_score_function={m.moe_score_function!r}`: Mixtral and "
                                            f"Qwen2-MoE route by softmax scores; {TORCH}"),
        (m.moe_bias_update_rate != 0, f"`model.moe_bias_update_rate={m.moe_bias_update_rate}`: the expert bias "
                                      f"changes which experts are chosen, which Mixtral and Qwen2-MoE cannot; {TORCH}"),
        (m.moe_route_scale != 1, f"`model.moe_route_scale={m.moe_route_scale}`: Mixtral and Qwen2-MoE do not scale "
                                 f"the combine weights; {TORCH}"),
        (m.moe_num_expert_groups != 1, f"`model.moe_num_expert_groups={m.moe_num_expert_groups}`: group-limited "
                                       f"routing is not in Mixtral or Qwen2-MoE; {TORCH}"),
        (m.moe_num_shared_experts > 0 and not m.moe_shared_expert_gate,
         f"shared experts without a gate (`model.moe_num_shared_experts={m.moe_num_shared_experts}`, "
         f"`model.moe_shared_expert_gate=False`): Qwen2-MoE always scales its shared expert by a sigmoid gate; {TORCH}"),
    )
    return next((message for refused, message in reasons if refused), None)


def renormalises_over_k(config: RecipeConfig) -> bool:
    """Whether the combine weights are the k chosen scores renormalised to sum 1 (else the raw softmax scores):
    ``moe_norm_topk_prob``, or when it is None (GShard), renormalised over the survivors from k = 2 on, which
    are the k chosen when no token is dropped."""
    m = config.model
    return m.moe_norm_topk_prob if m.moe_norm_topk_prob is not None else m.moe_gate_k >= 2


def hf_architecture(config: RecipeConfig) -> str:
    """"mixtral" where it computes our model (every FFN an MoE, weights renormalised over the k, no q/k/v bias,
    no shared expert), else "qwen2_moe"; ExportError naming the option when neither does."""
    refusal = _hf_refusal(config)
    if refusal:
        raise ExportError(refusal)
    m = config.model
    every_layer_moe = config.moe_layer_ids() == list(range(m.num_layers))
    if every_layer_moe and renormalises_over_k(config) and not m.qkv_bias and not m.moe_num_shared_experts:
        return "mixtral"
    return "qwen2_moe"


def hf_export_notes(config: RecipeConfig) -> list[str]:
    """What the exported model computes differently by design, for the user to read (not refused)."""
    m = config.model
    if config.is_moe and m.moe_drop_tokens:
        return ["`model.moe_drop_tokens=True`: the run drops tokens over an expert's capacity, transformers' models "
                "never do; the export is the dropless model, the same as ours wherever no expert overflows "
                f"(eval capacity factor {m.moe_eval_capacity_factor})"]
    return []


def _attention_and_norms(state: dict, config: RecipeConfig) -> dict:
    """Embedding, attention, norms and head in HF Llama-family names; the FFN is left to the caller."""
    m = config.model
    q_size, kv_size = m.num_attention_heads * m.resolved_head_dim, m.resolved_kv_heads * m.resolved_head_dim
    sizes = [q_size, kv_size, kv_size]  # wqkv rows: [q: H·D; k: KV·D; v: KV·D], heads contiguous
    out = {"model.embed_tokens.weight": state["embedding.weight"], "model.norm.weight": state["norm.weight"]}
    if not m.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
            q, k, v = state[f"{src}attention.wqkv.{kind}"].split(sizes, dim=0)
            out.update({f"{dst}self_attn.{name}_proj.{kind}": part for name, part in zip("qkv", (q, k, v))})
        out.update({
            dst + "self_attn.o_proj.weight": state[src + "attention.wo.weight"],
            dst + "input_layernorm.weight": state[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"],
        })
    return out


def _shared_expert(state: dict, config: RecipeConfig, layer: int, dst: str) -> dict:
    """Qwen2-MoE's gated shared expert: ours (all shared experts in one SwiGLU), or width 0, which adds exactly 0."""
    m, src = config.model, f"blocks.{layer}."
    if not m.moe_num_shared_experts:
        return {dst + "shared_expert.gate_proj.weight": torch.zeros(0, m.hidden_size),
                dst + "shared_expert.up_proj.weight": torch.zeros(0, m.hidden_size),
                dst + "shared_expert.down_proj.weight": torch.zeros(m.hidden_size, 0),
                dst + "shared_expert_gate.weight": torch.zeros(1, m.hidden_size)}
    out = {f"{dst}shared_expert.{theirs}.weight": state[f"{src}shared_mlp.{mine}.weight"]
           for theirs, mine in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))}
    out[dst + "shared_expert_gate.weight"] = state[src + "shared_gate.weight"]
    return out


def to_hf_state(state: dict, config: RecipeConfig) -> tuple[dict, dict]:
    """(safetensors state dict, config.json dict) for ``hf_architecture(config)``."""
    m = config.model
    arch = hf_architecture(config)
    moe_layers = set(config.moe_layer_ids())
    mlp = "block_sparse_moe" if arch == "mixtral" else "mlp"
    names = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}[arch]
    out = _attention_and_norms(state, config)
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.ffn.", f"model.layers.{i}.{mlp}."
        if i in moe_layers:
            out[dst + "gate.weight"] = state[src + "deepspeed_moe.gate.wg.weight"]
            experts = f"{src}{EXPERT_GROUP_PATH}."
            for e in range(m.num_experts):
                for theirs, mine in zip(names, ("w1", "w3", "w2")):
                    out[f"{dst}experts.{e}.{theirs}.weight"] = state[expert_key(experts, e, f"{mine}.weight")]
            if arch == "qwen2_moe":
                out.update(_shared_expert(state, config, i, dst))
        else:
            for theirs, mine in zip(("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
                out[f"{dst}{theirs}.weight"] = state[f"{src}{mine}.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}, _hf_config(config, arch)


def _hf_config(config: RecipeConfig, arch: str) -> dict:
    m = config.model
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.resolved_kv_heads,
                  head_dim=m.resolved_head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  hidden_act="silu", tie_word_embeddings=m.tie_word_embeddings, attention_dropout=0.0,
                  torch_dtype="float32", rope_theta=m.rope_theta,
                  rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  num_experts_per_tok=m.moe_gate_k, router_aux_loss_coef=config.loss.moe_loss_coeff)
    if arch == "mixtral":  # every layer an MoE: intermediate_size is the experts' width
        return dict(common, model_type="mixtral", architectures=["MixtralForCausalLM"],
                    intermediate_size=m.expert_size, num_local_experts=m.num_experts, sliding_window=None,
                    router_jitter_noise=0.0)
    moe_layers = set(config.moe_layer_ids())
    return dict(common, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                intermediate_size=m.ffn_size, moe_intermediate_size=m.expert_size, num_experts=m.num_experts,
                shared_expert_intermediate_size=m.shared_expert_size, norm_topk_prob=renormalises_over_k(config),
                qkv_bias=m.qkv_bias, decoder_sparse_step=1, use_sliding_window=False,
                mlp_only_layers=[i for i in range(m.num_layers) if i not in moe_layers])


def save_hf(state: dict, config: RecipeConfig, out_dir: str | Path) -> Path:
    tensors, hf_config = to_hf_state(state, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recipe.export", description="Export a run's checkpoint.")
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--format", choices=("torch", "hf"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        try:
            state, client, from_master = master_state_dict(checkpoint_root(args.run_dir), args.tag)
        except ReshardError as exc:  # 16-bit weights are still a faithful model, only rounded
            (state, client), from_master = consolidated_state_dict(checkpoint_root(args.run_dir), args.tag), False
            print(f"warning: fp32 master weights not readable ({exc}); exporting the 16-bit weights upcast",
                  file=sys.stderr)
        config = config_from_saved(client["config"])
        out = Path(args.out)
        if out.exists():
            raise ExportError(f"{out} exists; choose a new --out (nothing is overwritten)")
        if args.format == "torch":
            torch.save({"model": {k: v.float() for k, v in state.items()}, "config": client["config"]}, out)
        else:
            for note in hf_export_notes(config):
                print(f"note: {note}", file=sys.stderr)
            save_hf(state, config, out)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (" (from the fp32 master weights)" if from_master else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
