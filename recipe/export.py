"""Export a run's checkpoint: a consolidated fp32 state dict, or a Hugging Face folder.

    python -m recipe.export --run_dir runs/latest --format torch --out model_fp32.pt
    python -m recipe.export --run_dir runs/latest --format hf --out hf_model/

``torch``: every weight with global expert ids in one ``torch.save`` file (what DeepSpeed's
zero_to_fp32 gives a dense model, but with the expert files gathered in), plus the config. For bf16/fp16
runs the values are the optimizer's fp32 master weights (read from its shards, any layout), not the
16-bit module copies; both formats use them.

Both formats carry the tokenizer the run was trained with (the trainer copies it into the run folder). ``hf``:
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` that ``AutoTokenizer`` loads to our
ids: a SentencePiece ``tokenizer.model`` is converted exactly (and copied too), a Hugging Face ``tokenizer.json``
is copied with the files around it in the folder it came from. ``torch``: the same files in ``<out stem>.tokenizer/``
beside the ``.pt``, whose ``"tokenizer"`` entry names the run's tokenizer file there (relative to the ``.pt``).

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
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .checkpoint import checkpoint_root
from .config import RecipeConfig, config_from_saved
from .data.prepare import load_meta
from .data.tokenizer import (HF_TOKENIZER_FILE, SP_TOKENIZER_FILE, HFTokenizer, Tokenizer, sentencepiece_to_hf,
                             tokenizer_file)
from .hf_format import (HF_SOURCE_CONFIG, ExportError, hf_architecture, hf_config_dict, key_map, qkv_split_sizes,
                        renormalises_over_k)
from .init_from import parse_init_from
from .reshard import best_weights

__all__ = ["ExportError", "hf_architecture", "hf_export_notes", "renormalises_over_k", "save_hf", "save_tokenizer",
           "to_hf_state"]

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# What a Hugging Face model folder holds for its tokenizer besides tokenizer.json: copied as they are.
HF_TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "added_tokens.json", "chat_template.jinja",
                           SP_TOKENIZER_FILE)
# The class that loads tokenizer.json as written (transformers' LlamaTokenizer rebuilds the pipeline from the
# vocabulary and drops our leading and repeated spaces); transformers 5 names it TokenizersBackend.
HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_tokenizer(run_dir: Path) -> Optional[Path]:
    """The tokenizer file the run was trained with (tokenizer.json or tokenizer.model, copied in by the trainer),
    None when the run folder has none."""
    try:
        return tokenizer_file(run_dir)
    except FileNotFoundError:
        return None


def _shards_meta(saved_config: dict, tokenizer: Path) -> dict:
    """meta.json of the data the run trained on, when that tokenizer made it ({} if the data moved or changed)."""
    path = (saved_config.get("data") or {}).get("path")
    meta = load_meta(Path(path)) if path else None
    return meta if meta is not None and meta.get("tokenizer_sha256") == _sha256(tokenizer) else {}


def _tokenizer_origins(run_dir: Path, saved_config: dict) -> list[Path]:
    """Folders that may hold the files around the run's tokenizer.json: the run folder, the model it was imported
    from (``train.init_from``) and the prepared data."""
    folders = [run_dir]
    init_from = (saved_config.get("train") or {}).get("init_from")
    if init_from:
        folders.append(parse_init_from(init_from).path)
    data_path = (saved_config.get("data") or {}).get("path")
    if data_path:
        folders.append(Path(data_path))
    return folders


def _special_tokens(tok: Tokenizer | HFTokenizer, bos_id: int, eos_id: int) -> dict:
    """special_tokens_map.json of ``tok``: the token strings of the ids the shards were made with."""
    ids = {"bos_token": bos_id, "eos_token": eos_id, "unk_token": tok.unk_id}
    return {name: tok.id_to_token(i) for name, i in ids.items() if i >= 0}


def _write_tokenizer_configs(out: Path, specials: dict, add_bos: bool, max_length: Optional[int],
                             sentencepiece: bool) -> None:
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": HF_TOKENIZER_CLASS, **specials, "add_bos_token": add_bos, "add_eos_token": False,
              # SentencePiece encodes the text "<s>" as characters, never as the control id: so must transformers
              # (a tokenizer.json matches its special tokens in text, as our HFTokenizer does)
              "split_special_tokens": sentencepiece, "clean_up_tokenization_spaces": False,
              "model_max_length": max_length}
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))


def _write_sentencepiece(ours: Tokenizer, add_bos: bool, max_length: Optional[int], out: Path) -> dict:
    converted = sentencepiece_to_hf(ours.model_path, add_bos)  # ValueError for a kind it cannot: nothing written
    out.mkdir(parents=True, exist_ok=True)
    converted.save(str(out / HF_TOKENIZER_FILE))
    shutil.copyfile(ours.model_path, out / SP_TOKENIZER_FILE)
    _write_tokenizer_configs(out, _special_tokens(ours, ours.bos_id, ours.eos_id), add_bos, max_length, True)
    return {"bos_token_id": ours.bos_id, "eos_token_id": ours.eos_id}


def _write_hf_json(tokenizer: Path, origins: list[Path], meta: dict, max_length: Optional[int],
                   out: Path) -> dict:
    """Copy the run's tokenizer.json with the files around it in the folder it came from; without such a folder,
    write configs naming the bos/eos the shards were made with."""
    shutil.copyfile(tokenizer, out / HF_TOKENIZER_FILE)
    digest = _sha256(tokenizer)
    for folder in origins:
        side_files = [folder / name for name in HF_TOKENIZER_SIDE_FILES if (folder / name).is_file()]
        twin = folder / HF_TOKENIZER_FILE
        if side_files and twin.is_file() and _sha256(twin) == digest:
            for path in side_files:
                shutil.copyfile(path, out / path.name)
            source = HFTokenizer(twin)
            return {"bos_token_id": source.bos_id, "eos_token_id": source.eos_id}
    ours = HFTokenizer(tokenizer)
    bos_id, eos_id = meta.get("bos_id", ours.bos_id), meta.get("eos_id", ours.eos_id)
    add_bos = bool(meta.get("bos_per_document", ours.add_bos_token))
    _write_tokenizer_configs(out, _special_tokens(ours, bos_id, eos_id), add_bos, max_length, False)
    return {"bos_token_id": bos_id, "eos_token_id": eos_id}


def save_tokenizer(run_dir: str | Path, saved_config: dict, out: str | Path) -> tuple[Optional[Path], dict]:
    """Write the run's tokenizer into the folder ``out`` so that ``AutoTokenizer.from_pretrained(out)`` encodes as
    the run's tokenizer did (see the module doc). Returns (the run's tokenizer file, None when the run has none;
    the bos/eos ids for config.json, those >= 0)."""
    run_dir, out = Path(run_dir), Path(out)
    tokenizer = run_tokenizer(run_dir)
    if tokenizer is None:
        return None, {}
    meta = _shards_meta(saved_config, tokenizer)
    max_length = int((saved_config.get("model") or {}).get("max_seq_len") or 0) or None
    if tokenizer.suffix == ".json":
        out.mkdir(parents=True, exist_ok=True)
        ids = _write_hf_json(tokenizer, _tokenizer_origins(run_dir, saved_config), meta, max_length, out)
    else:
        ours = Tokenizer(tokenizer)
        ids = _write_sentencepiece(ours, bool(meta.get("bos_per_document", ours.add_bos_token)), max_length, out)
    return tokenizer, {k: v for k, v in ids.items() if v >= 0}


def _no_tokenizer_note(run_dir: Path) -> str:
    return (f"note: {run_dir} holds no {HF_TOKENIZER_FILE} or {SP_TOKENIZER_FILE}, so the export has no tokenizer; "
            f"copy the tokenizer the data was prepared with into the run folder and export again")


def _sidecar(out: Path) -> Path:
    """The folder of tokenizer files that goes with a ``--format torch`` file: ``model.pt`` -> ``model.tokenizer``."""
    return out.with_name(f"{out.stem}.tokenizer")


def save_torch(state: dict, client: dict, run_dir: Path, out: Path) -> None:
    """The consolidated fp32 state dict and config in ``out``, the tokenizer files in ``_sidecar(out)``; the file's
    ``"tokenizer"`` entry names the run's tokenizer file there, relative to the .pt's folder (None without one)."""
    sidecar = _sidecar(out)
    if sidecar.exists():
        raise ExportError(f"{sidecar} exists (the tokenizer of --out goes there); choose a new --out")
    try:
        tokenizer, _ = save_tokenizer(run_dir, client["config"], sidecar)
    except ValueError as exc:  # a tokenizer.model no tokenizer.json reproduces: the .model itself still goes along
        print(f"note: {exc}", file=sys.stderr)
        tokenizer = run_tokenizer(run_dir)
        sidecar.mkdir(parents=True)
        shutil.copyfile(tokenizer, sidecar / tokenizer.name)
    if tokenizer is None:
        print(_no_tokenizer_note(run_dir), file=sys.stderr)
    record = {"tokenizer": f"{sidecar.name}/{tokenizer.name}" if tokenizer else None,
              "tokenizer_sha256": _sha256(tokenizer) if tokenizer else None}
    torch.save({"model": {k: v.float() for k, v in state.items()}, "config": client["config"], **record}, out)


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
            save_torch(state, client, Path(args.run_dir), out)
        else:
            for note in hf_export_notes(config):
                print(f"note: {note}", file=sys.stderr)
            hf_architecture(config)  # refused before anything is written
            tokenizer, token_ids = save_tokenizer(args.run_dir, client["config"], out)
            if tokenizer is None:
                print(_no_tokenizer_note(Path(args.run_dir)), file=sys.stderr)
            # the source's own token ids win; a run of ours gets its tokenizer's
            save_hf(state, config, out, {**token_ids, **(_source_config(Path(args.run_dir)) or {})})
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (" (from the fp32 master weights)" if from_master else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
