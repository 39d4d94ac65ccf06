"""Read a Hugging Face model folder: its ``config.json`` as a recipe model section, its safetensors weights into a
model at any expert-parallel layout. Used by ``train.init_from = "hf:DIR"`` (recipe/init_from.py) and, for the
dense families, by ``"upcycle:DIR"``.

Config: ``config.json`` is read with transformers' own config class (so defaults are the ones transformers computes
with), then mapped onto ``ModelConfig`` keys. A feature the recipe does not compute exactly is refused by name
(``HFImportError``, one line): sliding-window attention, rope scaling or partial rotary, activation other than SiLU,
attention or MLP biases the recipe has no place for, OLMoE's ``clip_qkv``, a set of MoE layers our
``moe_layer_freq``/``moe_dense_first_layers`` cannot express, or an unknown ``model_type`` (MLA models among them).

Weights: ``model.safetensors`` or the shards of ``model.safetensors.index.json``, opened with ``safe_open``, which
reads a tensor's bytes only when asked. Each rank reads the dense weights and its own experts' tensors, one at a
time, straight into the model it has built: its host memory stays the model's share (dense + local experts) plus
the largest single tensor. Every tensor's presence and shape is checked from the file headers before any rank
starts (``check_hf_weights``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

from .config import ConfigError, RecipeConfig
from .hf_format import DENSE_CLASSES, MOE_CLASSES, key_map, qkv_split_sizes
from .model.expert_keys import local_to_global

INDEX_FILE = "model.safetensors.index.json"
# safe_open maps a file; every page a read touched stays in this process's resident memory until the file is
# closed, so the handles are closed after this many bytes were read through them (the mapped pages then go).
RELEASE_MAPPED_BYTES = 64 * 2**20
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("F32", "BF16", "F16")
MLA_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2")


class HFImportError(ConfigError):
    """A Hugging Face folder the recipe cannot start from; the message names the problem and the fix."""


class HFModel(NamedTuple):
    """A folder's config.json in recipe terms."""

    arch: str  # a MOE_CLASSES or DENSE_CLASSES key
    model_type: str  # the recipe's: "INTERNLM_MoE" or "INTERNLM"
    architecture: dict  # model.* keys that define the computation: a user's config may not change them
    defaults: dict  # model.* keys a user's config may override (training settings)
    raw: dict  # config.json as written
    aux_loss_coeff: float  # router_aux_loss_coef as transformers reads it (the class default when absent)


def read_config_json(hf_dir: Path) -> dict:
    """config.json of ``hf_dir``, with its model_type checked against what the recipe reads."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFImportError(f"{hf_dir} is not a folder; pass a Hugging Face model folder (config.json + safetensors)")
    if not path.is_file():
        raise HFImportError(f"{hf_dir} has no config.json; pass the folder save_pretrained wrote (config.json + "
                            f"model.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HFImportError(f"{path} is not valid JSON ({exc}); download it again") from None
    if not isinstance(raw, dict):
        raise HFImportError(f"{path} holds a JSON {type(raw).__name__}, not an object; it is not a model's config.json")
    model_type = raw.get("model_type")
    if model_type in MLA_TYPES:
        raise HFImportError(f"{path}: model_type {model_type!r} uses MLA attention, which the recipe does not "
                            f"compute; supported: {', '.join(MOE_CLASSES)}")
    if model_type not in MOE_CLASSES and model_type not in DENSE_CLASSES:
        raise HFImportError(f"{path}: unsupported architecture {model_type!r} ({raw.get('architectures')}); the "
                            f"recipe imports {', '.join(MOE_CLASSES)} and upcycles {', '.join(DENSE_CLASSES)}")
    return raw


def _refusals(c, arch: str) -> Iterator[str]:
    """Every feature of config ``c`` the recipe does not compute exactly."""
    quantization = getattr(c, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        yield f"quantized weights (quantization_config: {method}) are not dequantized by the recipe; use the " \
              f"bf16/fp16/fp32 release of the model"
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        yield f"rope scaling (rope_type={rope_type!r}) is not computed by the recipe"
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        yield f"partial rotary embeddings (partial_rotary_factor={partial}) are not computed by the recipe"
    if getattr(c, "hidden_act", "silu") != "silu":
        yield f"hidden_act={c.hidden_act!r}: the recipe's SwiGLU uses SiLU"
    if "sliding_attention" in (getattr(c, "layer_types", None) or []) or (
            arch in ("mixtral", "qwen3_moe", "llama") and getattr(c, "sliding_window", None) is not None):
        yield f"sliding-window attention (sliding_window={getattr(c, 'sliding_window', None)}) is not computed by " \
              f"the recipe (set use_sliding_window=false only if the model was trained without it)"
    if getattr(c, "attention_bias", False):
        yield "attention_bias=true: the recipe has no bias on the output projection"
    if getattr(c, "mlp_bias", False):
        yield "mlp_bias=true: the recipe's SwiGLU has no biases"
    if getattr(c, "clip_qkv", None) is not None:
        yield f"clip_qkv={c.clip_qkv}: the recipe does not clip q/k/v"


def _attention_section(c, arch: str) -> dict:
    """The ``model.*`` keys of the embedding, attention and norms of transformers config ``c``."""
    heads = c.num_attention_heads
    rope = dict(getattr(c, "rope_parameters", None) or {})
    return dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        qk_norm={"qwen3_moe": "head", "qwen3": "head", "olmoe": "full"}.get(arch, "none"),
        qkv_bias=bool(getattr(c, "qkv_bias", True)) if arch == "qwen2_moe" else arch == "qwen2",
        vocab_size=c.vocab_size, norm_eps=float(c.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)))


def moe_layer_placement(num_layers: int, moe_layers: list[int]) -> Optional[tuple[int, int]]:
    """(moe_layer_freq, moe_dense_first_layers) whose MoE layers are exactly ``moe_layers``, or None."""
    for freq in range(1, num_layers + 1):
        for first in range(num_layers):
            if [i for i in range(first, num_layers) if (num_layers - 1 - i) % freq == 0] == moe_layers:
                return freq, first
    return None


def _moe_section(c, arch: str) -> dict:
    """The ``model.*`` keys of the FFN slots (experts, routing, shared expert, which layers are MoE) of ``c``."""
    n = c.num_hidden_layers
    if arch in ("mixtral", "olmoe"):
        width, dense_width, moe_layers = c.intermediate_size, c.intermediate_size, list(range(n))
    else:  # Qwen: moe_intermediate_size per expert, intermediate_size for the mlp_only layers
        width, dense_width = c.moe_intermediate_size, c.intermediate_size
        dense_only = set(c.mlp_only_layers or [])
        moe_layers = [i for i in range(n) if i not in dense_only and (i + 1) % c.decoder_sparse_step == 0]
    placement = moe_layer_placement(n, moe_layers)
    if placement is None:
        raise HFImportError(f"MoE layers {moe_layers} (mlp_only_layers / decoder_sparse_step) cannot be expressed "
                            f"with model.moe_layer_freq and model.moe_dense_first_layers")
    shared = (getattr(c, "shared_expert_intermediate_size", 0) or 0) if arch == "qwen2_moe" else 0
    return dict(
        intermediate_size=dense_width, num_experts=getattr(c, "num_local_experts", None) or c.num_experts,
        moe_gate_k=c.num_experts_per_tok, moe_intermediate_size=width, moe_layer_freq=placement[0],
        moe_dense_first_layers=placement[1], moe_norm_topk_prob=True if arch == "mixtral" else bool(c.norm_topk_prob),
        moe_score_function="softmax", moe_route_scale=1.0, moe_num_expert_groups=1, moe_topk_groups=1,
        moe_num_shared_experts=1 if shared else 0, moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=bool(shared), moe_expert="swiglu", moe_gate="gshard", hf_architecture=arch)


def read_hf_model(hf_dir: str | Path) -> HFModel:
    """The model section a run started from ``hf_dir`` trains with; HFImportError for what it cannot compute."""
    hf_dir = Path(hf_dir)
    raw = read_config_json(hf_dir)
    arch = raw["model_type"]
    from transformers import AutoConfig  # here: configs without init_from never import transformers

    try:
        c = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' own validation: report its first line
        raise HFImportError(f"{hf_dir / 'config.json'}: transformers cannot read it "
                            f"({str(exc).splitlines()[0][:300]})") from None
    refusal = next(_refusals(c, arch), None)
    if refusal:
        raise HFImportError(f"{hf_dir / 'config.json'}: {refusal}; nothing was imported")
    architecture = _attention_section(c, arch)
    if arch in DENSE_CLASSES:
        architecture["intermediate_size"] = c.intermediate_size
        defaults, model_type = {}, "INTERNLM"
    else:
        try:
            architecture.update(_moe_section(c, arch))
        except HFImportError as exc:
            raise HFImportError(f"{hf_dir / 'config.json'}: {exc}; nothing was imported") from None
        # HF's models never drop tokens; its balancing loss counts all k choices, as our "switch" does.
        defaults, model_type = dict(moe_drop_tokens=False, moe_balance_loss="switch"), "INTERNLM_MoE"
    defaults["max_seq_len"] = c.max_position_embeddings
    return HFModel(arch=arch, model_type=model_type, architecture=architecture, defaults=defaults, raw=raw,
                   aux_loss_coeff=float(getattr(c, "router_aux_loss_coef", 0.0) or 0.0))


def dense_config(hf: HFModel) -> RecipeConfig:
    """The dense recipe config of a Llama / Qwen2 / Qwen3 folder read by ``read_hf_model``."""
    from .config import config_from_dict

    model = {**hf.architecture, "max_seq_len": hf.defaults["max_seq_len"]}
    return config_from_dict({"model_type": "INTERNLM", "model": model, "data": {"seq_len": 1}})


class HFWeights(contextlib.AbstractContextManager):
    """The tensors of a folder's safetensors files (single or sharded), each read only when asked."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        self._open_file, self._stack, self._handles, self._mapped = safe_open, contextlib.ExitStack(), {}, 0
        index, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise HFImportError(f"{index} is not a safetensors index ({exc}); download it again") from None
            shards = sorted(set(self.files.values()))
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise HFImportError(f"{self.dir}: shard {missing[0]} listed in {INDEX_FILE} is missing ({len(missing)} "
                                    f"of {len(shards)} shards); download the missing files")
        elif single.is_file():
            self.files = {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
        else:
            raise HFImportError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; the recipe reads safetensors "
                                f"only (re-save with save_pretrained(..., safe_serialization=True))")

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(self._open_file(str(self.dir / file), framework="pt"))
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
                raise HFImportError(f"{self.dir / file} cannot be read as safetensors ({exc}); download it "
                                    f"again") from None
        return self._handles[file]

    def _file_of(self, name: str) -> str:
        if name not in self.files:
            raise HFImportError(f"{self.dir}: tensor {name} not found; the checkpoint is incomplete or not the "
                                f"architecture its config.json names")
        return self.files[name]

    def _get(self, name: str, how: str):
        """``get_slice`` or ``get_tensor`` of ``name`` from the file the index places it in."""
        file = self._file_of(name)
        handle = self._handle(file)
        try:
            return getattr(handle, how)(name)
        except Exception:  # noqa: BLE001 - the index names a tensor its shard lacks
            raise HFImportError(f"{self.dir / file} lacks tensor {name}, which {INDEX_FILE} places there; the "
                                f"shard is from another checkpoint: download it again") from None

    def _slice(self, name: str):
        return self._get(name, "get_slice")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name, e.g. "BF16", "F8_E4M3"."""
        return str(self._slice(name).get_dtype())

    def read(self, name: str) -> torch.Tensor:
        tensor = self._get(name, "get_tensor")
        self._mapped += tensor.numel() * tensor.element_size()
        if self._mapped > RELEASE_MAPPED_BYTES:  # the tensor is a copy: the mapping can go
            self._stack.close()
            self._stack, self._handles, self._mapped = contextlib.ExitStack(), {}, 0
        return tensor

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _parts(config: RecipeConfig, names: tuple[str, ...], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape each HF tensor of one of our weights must have (``wqkv`` is three along dim 0)."""
    if len(names) == 1:
        return [tuple(shape)]
    return [(rows, *shape[1:]) for rows in qkv_split_sizes(config)]


def _weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its buffers (the routing bias: no HF class has one; it starts at 0)."""
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in buffers}


def check_hf_weights(hf_dir: str | Path, config: RecipeConfig, arch: str) -> None:
    """Every tensor the model needs is in the folder with the shape its config implies: read from the file
    headers only, against a model built on the meta device (no memory), before any rank starts."""
    from .model.transformer import TransformerLM

    with torch.device("meta"):
        model = TransformerLM(config, ep_size=1)
    names_of = key_map(config, arch)
    with HFWeights(hf_dir) as weights:
        for ours, tensor in _weights_of(model).items():
            for name, want in zip(names_of[ours], _parts(config, names_of[ours], tuple(tensor.shape))):
                got = weights.shape(name)
                if got != want:
                    raise HFImportError(f"{hf_dir}: tensor {name} has shape {list(got)} but its config.json implies "
                                        f"{list(want)}; the weights do not belong to this config")
                if weights.dtype(name) not in FLOAT_DTYPES:
                    raise HFImportError(f"{hf_dir}: tensor {name} is {weights.dtype(name)}; the recipe reads "
                                        f"{', '.join(FLOAT_DTYPES)} weights only (quantized checkpoints are refused)")


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, arch: str, ep_rank: int = 0) -> None:
    """Copy the folder's weights into ``model`` (built at any ep_size; this rank is ``ep_rank``): the dense
    tensors and this rank's experts only, one tensor in memory at a time."""
    config = model.config
    names_of = key_map(config, arch)
    weights_of = _weights_of(model)
    if config.model.tie_word_embeddings:
        del weights_of["lm_head.weight"]  # the embedding itself: read once
    with HFWeights(hf_dir) as weights, torch.no_grad():
        for key, target in weights_of.items():
            names = names_of[local_to_global(key, ep_rank, model.num_local_experts)]
            parts = [weights.read(name) for name in names]
            for name, part, want in zip(names, parts, _parts(config, names, tuple(target.shape))):
                if tuple(part.shape) != want:
                    raise HFImportError(f"{hf_dir}: tensor {name} has shape {list(part.shape)}, expected {list(want)}")
            target.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])


def read_hf_state(hf_dir: str | Path, config: RecipeConfig, arch: str) -> dict[str, torch.Tensor]:
    """The whole model's state dict (global expert ids, float32) read from the folder: for dense upcycling
    sources and tests; a training rank uses ``load_hf_weights``, which reads only its share."""
    from .model.transformer import TransformerLM

    model = TransformerLM(config, ep_size=1)
    load_hf_weights(model, hf_dir, arch)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def read_hf_dense(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model section, whole state dict) of a dense Llama / Qwen2 / Qwen3 folder: an upcycling source."""
    hf = read_hf_model(hf_dir)
    if hf.model_type != "INTERNLM":
        raise HFImportError(f"{hf_dir} holds an MoE ({hf.arch}), not a dense model")
    config = dense_config(hf)
    return dataclasses.asdict(config.model), read_hf_state(hf_dir, config, hf.arch)
