"""Data pipeline: corpus -> SentencePiece tokenizer -> token shards -> per-rank batches.

See prepare.py for the on-disk format and loader.py for the sharding contract.
Names are imported lazily so `python -m recipe.data.prepare` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "fetch_sotu": "recipe.data.corpus",
    "read_documents": "recipe.data.corpus",
    "BatchLoader": "recipe.data.loader",
    "TokenDataset": "recipe.data.loader",
    "eval_batches": "recipe.data.loader",
    "DEFAULT_VOCAB_SIZE": "recipe.data.prepare",
    "load_meta": "recipe.data.prepare",
    "prepare_dataset": "recipe.data.prepare",
    "split_documents": "recipe.data.prepare",
    "Tokenizer": "recipe.data.tokenizer",
    "train_tokenizer": "recipe.data.tokenizer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from recipe.data.corpus import fetch_sotu, read_documents
    from recipe.data.loader import BatchLoader, TokenDataset, eval_batches
    from recipe.data.prepare import DEFAULT_VOCAB_SIZE, load_meta, prepare_dataset, split_documents
    from recipe.data.tokenizer import Tokenizer, train_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipe.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
