"""Export a run's checkpoint: a consolidated fp32 state dict, or a Hugging Face folder.

    python -m recipe.export --run_dir runs/latest --format torch --out model_fp32.pt
    python -m recipe.export --run_dir runs/latest --format hf --out hf_model/

``torch``: every weight with global expert ids in one ``torch.save`` file (what DeepSpeed's
zero_to_fp32 gives a dense model, but with the expert files gathered in), plus the config. For bf16/fp16
runs the values are the optimizer's fp32 master weights (read from its shards, any layout), not the
16-bit module copies; both formats use them.

``hf``: ``config.json`` + ``model.safetensors`` in the layout of a ``transformers`` architecture that
computes exactly what our model computes in eval mode when no token is dropped:

* top-2, every FFN an MoE layer -> Mixtral (softmax, top-2, weights renormalised over the two);
* top-1 or top-2 with dense layers between MoE ones -> Qwen2-MoE (``norm_topk_prob`` off for top-1,
  so the weight is the raw softmax probability, as in GShard top-1), with q/k/v biases off, no shared
  expert (width 0), and ``mlp_only_layers`` listing our dense layers;
* shared experts, custom expert networks or gates, dense models: refused (no architecture matches).
Differences that remain by design: capacity dropping (HF never drops), and routing noise (off in eval).
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


def hf_architecture(config: RecipeConfig) -> str:
    m = config.model
    if not config.is_moe:
        raise ExportError("dense models: export with --format torch (no MoE architecture applies)")
    if m.moe_num_shared_experts:
        raise ExportError("shared experts have no ungated counterpart in transformers' MoE models; "
                          "export with --format torch")
    if m.moe_expert != "swiglu" or m.moe_gate != "gshard":
        raise ExportError(f"expert {m.moe_expert!r} / gate {m.moe_gate!r}: only SwiGLU experts with GShard gating "
                          f"map onto transformers' MoE models; export with --format torch")
    if m.moe_gate_k == 2 and config.moe_layer_ids() == list(range(m.num_layers)):
        return "mixtral"
    return "qwen2_moe"


def _attention_and_norms(state: dict, config: RecipeConfig) -> dict:
    """Embedding, attention, norms and head in HF Llama-family names; the FFN is left to the caller."""
    m = config.model
    out = {"model.embed_tokens.weight": state["embedding.weight"], "model.norm.weight": state["norm.weight"]}
    if not m.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(m.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attention.wqkv.weight"].chunk(3, dim=0)  # rows: [q; k; v], heads contiguous
        out.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attention.wo.weight"],
            dst + "input_layernorm.weight": state[src + "attention_norm.weight"],
            dst + "post_attention_layernorm.weight": state[src + "ffn_norm.weight"],
        })
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
            if arch == "qwen2_moe":  # a zero-width shared expert contributes exactly 0
                out[dst + "shared_expert.gate_proj.weight"] = torch.zeros(0, m.hidden_size)
                out[dst + "shared_expert.up_proj.weight"] = torch.zeros(0, m.hidden_size)
                out[dst + "shared_expert.down_proj.weight"] = torch.zeros(m.hidden_size, 0)
                out[dst + "shared_expert_gate.weight"] = torch.zeros(1, m.hidden_size)
        else:
            for theirs, mine in zip(("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
                out[f"{dst}{theirs}.weight"] = state[f"{src}{mine}.weight"]
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
                  max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, hidden_act="silu",
                  tie_word_embeddings=m.tie_word_embeddings, attention_dropout=0.0, torch_dtype="float32",
                  rope_theta=m.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                  num_experts_per_tok=m.moe_gate_k, router_aux_loss_coef=config.loss.moe_loss_coeff)
    if arch == "mixtral":
        hf_config = dict(common, model_type="mixtral", architectures=["MixtralForCausalLM"],
                         intermediate_size=m.ffn_size, num_local_experts=m.num_experts, sliding_window=None,
                         router_jitter_noise=0.0)
    else:
        hf_config = dict(common, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                         intermediate_size=m.ffn_size, moe_intermediate_size=m.ffn_size, num_experts=m.num_experts,
                         shared_expert_intermediate_size=0, norm_topk_prob=m.moe_gate_k == 2, qkv_bias=False,
                         decoder_sparse_step=1, use_sliding_window=False,
                         mlp_only_layers=[i for i in range(m.num_layers) if i not in moe_layers])
    return {k: v.detach().float().contiguous() for k, v in out.items()}, hf_config


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
            save_hf(state, config, out)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (" (from the fp32 master weights)" if from_master else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
