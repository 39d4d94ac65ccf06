"""``train.init_from``: the one way a fresh run starts from weights it did not train itself.

    train = dict(init_from="hf:/models/Qwen3-30B-A3B")        # continue a Hugging Face MoE
    train = dict(init_from="upcycle:runs/dense")              # an MoE made of a dense recipe run
    train = dict(init_from="upcycle:/models/Qwen3-1.7B")      # ... or of a Hugging Face dense Llama/Qwen2/Qwen3

Why a config key and not a conversion command: every rank reads its own share of the weights (dense + its
experts) at the launch's layout, so no process ever holds the whole model, any EP/DP size and ZeRO stage works,
and the run folder's checkpoints take over from the first save (``--resume`` takes the model section the run
saved in its config.json and reads nothing of the source).

Here, before validation, the source's config.json fills in the model section (``resolve``): the architecture
comes from the source; a key the user's file sets to another value is refused by name; training settings
(capacity, dropping, noise, balancing loss, ``max_seq_len`` no longer than the source's) stay the user's.
The weights are read when the model is built (``recipe/training/build.py``). No torch at import time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

from .config import ConfigError, TrainConfig

KINDS = ("hf", "upcycle")


class InitFrom(NamedTuple):
    kind: str  # "hf" or "upcycle"
    path: Path


def parse_init_from(value: str) -> InitFrom:
    kind, _, where = value.partition(":") if isinstance(value, str) else ("", "", "")
    if kind not in KINDS or not where:
        raise ConfigError(f"`train.init_from` must be 'hf:DIR' or 'upcycle:SOURCE', got {value!r}")
    return InitFrom(kind, Path(where))


def _merge_architecture(user_model: dict, architecture: dict, source: str) -> dict:
    """``architecture`` over the user's model keys; a user key with another value is refused by name."""
    for key, value in architecture.items():
        if key in user_model and user_model[key] != value:
            raise ConfigError(f"`model.{key}={user_model[key]!r}` differs from {source} ({key}={value!r}); drop the "
                              f"key: with train.init_from the architecture comes from the source")
    return {**user_model, **architecture}


def _max_seq_len(model: dict, source_max: int, source: str) -> dict:
    wanted = model.get("max_seq_len", source_max)
    if isinstance(wanted, int) and wanted > source_max:
        raise ConfigError(f"`model.max_seq_len={wanted}` exceeds what {source} was trained for "
                          f"(max_position_embeddings={source_max}); use at most {source_max}")
    return {**model, "max_seq_len": wanted}


def _with_hf_model(raw: dict, hf_dir: Path) -> dict:
    from .hf_import import read_hf_model

    hf = read_hf_model(hf_dir)
    source = f"the Hugging Face model in {hf_dir}"
    if hf.model_type != "INTERNLM_MoE":
        raise ConfigError(f"{hf_dir} holds a dense {hf.arch} model; start an MoE from it with "
                          f"train.init_from='upcycle:{hf_dir}'")
    if raw.get("model_type", hf.model_type) != hf.model_type:
        raise ConfigError(f"`model_type={raw['model_type']!r}` but {source} is an MoE; drop model_type")
    user = dict(raw.get("model") or {})
    model = _merge_architecture(user, hf.architecture, source)
    model = {**{k: v for k, v in hf.defaults.items() if k != "max_seq_len"}, **model}
    model = _max_seq_len(model, hf.defaults["max_seq_len"], source)
    loss = {"moe_loss_coeff": hf.aux_loss_coeff, **(raw.get("loss") or {})}
    return {**raw, "model_type": hf.model_type, "model": model, "loss": loss}


def _upcycle_source(where: Path) -> tuple[dict, str]:
    """(the source's resolved model dict, its name in messages) for a dense recipe run or Hugging Face folder."""
    if (where / "checkpoints").is_dir():
        from .upcycle import read_recipe_run_model

        return read_recipe_run_model(where), str(where)
    from .hf_import import read_hf_model

    hf = read_hf_model(where)
    if hf.model_type != "INTERNLM":
        raise ConfigError(f"{where} holds an MoE ({hf.arch}); continue it with train.init_from='hf:{where}', "
                          f"upcycling starts from dense models")
    return {**hf.architecture, "max_seq_len": hf.defaults["max_seq_len"]}, str(where)


def _with_upcycle_source(raw: dict, where: Path) -> dict:
    from .upcycle import upcycle_model_dict

    if not where.exists():
        raise ConfigError(f"`train.init_from='upcycle:{where}'`: {where} does not exist; pass a dense recipe run "
                          f"folder or a Hugging Face dense model folder")
    if raw.get("model_type", "INTERNLM_MoE") != "INTERNLM_MoE":
        raise ConfigError("`train.init_from='upcycle:...'` makes an MoE: set model_type='INTERNLM_MoE'")
    source_model, source = _upcycle_source(where)
    model = upcycle_model_dict(source_model, dict(raw.get("model") or {}), source)
    return {**raw, "model_type": "INTERNLM_MoE", "model": model}


def _saved_run_config(train: dict) -> Optional[dict]:
    """On --resume of a run that was started from this same ``init_from``: the config it saved, else None."""
    if train.get("resume") is not True:
        return None
    path = Path(str(train.get("run_dir", TrainConfig.run_dir))) / "config.json"
    try:
        saved = json.loads(path.read_text())["config"]
        return saved if saved["train"].get("init_from") == train["init_from"] else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _from_saved_run(raw: dict, saved: dict) -> dict:
    """The model and loss the run started with, under the user's keys (the resume check compares the two), so
    that resuming needs neither the source folder nor the transformers version it was read with."""
    model = {**saved["model"], **(raw.get("model") or {})}
    loss = {**saved.get("loss", {}), **(raw.get("loss") or {})}
    return {**raw, "model_type": raw.get("model_type", saved["model_type"]), "model": model, "loss": loss}


def resolve(raw: dict) -> dict:
    """The raw config sections with the model section filled in from ``train.init_from`` (unchanged without it)."""
    train = raw.get("train")
    value = train.get("init_from") if isinstance(train, dict) else None
    if value is None:
        return raw
    init = parse_init_from(value)
    saved = _saved_run_config(train)
    if saved is not None:
        return _from_saved_run(raw, saved)
    return _with_hf_model(raw, init.path) if init.kind == "hf" else _with_upcycle_source(raw, init.path)


def check(config) -> None:
    """What needs the validated config: an upcycled MoE must be able to start equal to its dense source."""
    if parse_init_from(config.train.init_from).kind == "upcycle":
        from .upcycle import check_upcycle

        check_upcycle(config)
