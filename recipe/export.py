"""Export a run's checkpoint: a consolidated fp32 state dict, or a Hugging Face folder.

    python -m recipe.export --run_dir runs/latest --format torch --out model_fp32.pt
    python -m recipe.export --run_dir runs/latest --format hf --out hf_model/

``torch``: every weight with global expert ids in one ``torch.save`` file (what DeepSpeed's
zero_to_fp32 gives a dense model, but with the expert files gathered in), plus the config. For bf16/fp16
runs the values are the optimizer's fp32 master weights (read from its shards, any layout), not the
16-bit module copies; both formats use them.

``hf``: ``config.json`` + ``model.safetensors`` in the layout of a ``transformers`` class that computes exactly
what our model computes in eval mode when no token is dropped: Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE
(``recipe/hf_format.py`` says which fits what). A run imported from one of them (``train.init_from = "hf:DIR"``)
exports to the same class, with the other fields of the config.json it came from. Refused by name
(``ExportError``, with the way out): dense models, custom experts or gates, sigmoid scores, the expert bias, a
route scale, expert groups, shared experts without a gate, and combinations no class has (e.g. q/k norm with
a shared expert). Differences that remain by design, printed as notes: capacity dropping (HF never drops; a
dropping run exports as its dropless model), and routing noise (off in eval anyway).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .checkpoint import checkpoint_root
from .config import RecipeConfig, config_from_saved
from .hf_format import (HF_SOURCE_CONFIG, ExportError, hf_architecture, hf_config_dict, key_map, qkv_split_sizes,
                        renormalises_over_k)
from .reshard import best_weights

__all__ = ["ExportError", "hf_architecture", "hf_export_notes", "renormalises_over_k", "save_hf", "to_hf_state"]


def hf_export_notes(config: RecipeConfig) -> list[str]:
    """What the exported model computes differently by design, for the user to read (not refused)."""
    m = config.model
    if config.is_moe and m.moe_drop_tokens:
        return ["`model.moe_drop_tokens=True`: the run drops tokens over an expert's capacity, transformers' models "
                "never do; the export is the dropless model, the same as ours wherever no expert overflows "
                f"(eval capacity factor {m.moe_eval_capacity_factor})"]
    return []


def _zero_shared_expert(config: RecipeConfig, layer: int) -> dict:
    """Qwen2-MoE always has a gated shared expert: width 0 when we have none, which adds exactly 0."""
    m, dst = config.model, f"model.layers.{layer}.mlp."
    return {dst + "shared_expert.gate_proj.weight": torch.zeros(0, m.hidden_size),
            dst + "shared_expert.up_proj.weight": torch.zeros(0, m.hidden_size),
            dst + "shared_expert.down_proj.weight": torch.zeros(m.hidden_size, 0),
            dst + "shared_expert_gate.weight": torch.zeros(1, m.hidden_size)}


def to_hf_state(state: dict, config: RecipeConfig, base_config: Optional[dict] = None) -> tuple[dict, dict]:
    """(safetensors state dict, config.json dict) for ``hf_architecture(config)``; ``base_config``: the config.json
    the run was imported from (``HF_SOURCE_CONFIG``), whose other fields are kept."""
    m = config.model
    arch = hf_architecture(config)
    sizes = qkv_split_sizes(config)
    out = {}
    for ours, theirs in key_map(config, arch).items():
        if ours == "lm_head.weight" and m.tie_word_embeddings:
            continue  # the head is the embedding; transformers ties it back
        parts = state[ours].split(sizes, dim=0) if len(theirs) == 3 else (state[ours],)
        out.update(zip(theirs, parts))
    if arch == "qwen2_moe" and not m.moe_num_shared_experts:
        for layer in config.moe_layer_ids():
            out.update(_zero_shared_expert(config, layer))
    return {k: v.detach().float().contiguous() for k, v in out.items()}, hf_config_dict(config, arch, base_config)


def save_hf(state: dict, config: RecipeConfig, out_dir: str | Path, base_config: Optional[dict] = None) -> Path:
    tensors, hf_config = to_hf_state(state, config, base_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def _source_config(run_dir: Path) -> Optional[dict]:
    path = run_dir / HF_SOURCE_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recipe.export", description="Export a run's checkpoint.")
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--format", choices=("torch", "hf"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        state, client, from_master = best_weights(checkpoint_root(args.run_dir), args.tag)
        config = config_from_saved(client["config"])
        out = Path(args.out)
        if out.exists():
            raise ExportError(f"{out} exists; choose a new --out (nothing is overwritten)")
        if args.format == "torch":
            torch.save({"model": {k: v.float() for k, v in state.items()}, "config": client["config"]}, out)
        else:
            for note in hf_export_notes(config):
                print(f"note: {note}", file=sys.stderr)
            save_hf(state, config, out, _source_config(Path(args.run_dir)))
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (" (from the fp32 master weights)" if from_master else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
