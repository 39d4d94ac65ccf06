"""SentencePiece tokenizer: training and a thin, typed wrapper for encode/decode.

Contract of every model trained here:

* ``byte_fallback=True``: any UTF-8 string is encodable; characters outside the
  learned vocabulary become byte pieces ``<0x..>`` instead of ``<unk>``.
* ``identity`` normalization, no whitespace squashing: ``decode(encode(s)) == s``
  for every string ``s`` that does not contain U+2581 ("▁"), the character
  SentencePiece uses internally to mark spaces (it decodes back to a space).
* Fixed ids: ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos) = 2, no pad piece.
* Deterministic: the same inputs and settings give a byte-identical ``.model``
  file (fixed thread count and random seed, no file paths stored in the model).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import sentencepiece as spm

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_BYTE_PIECES = 256
NUM_SPECIAL_PIECES = 3  # <unk>, <s>, </s>
# Smallest vocabulary that holds the byte pieces, the special pieces and one more.
MIN_VOCAB_SIZE = NUM_BYTE_PIECES + NUM_SPECIAL_PIECES + 1
TokenizerModelType = Literal["bpe", "unigram"]
MODEL_TYPES = get_args(TokenizerModelType)
# At most this many sentences (lines) are sampled for training: bounds time and
# memory on large corpora (SOTU, ~12 MB, has ~26k lines and is used whole).
INPUT_SENTENCE_SIZE = 1_000_000
# Lines longer than this (in UTF-8 bytes) are cut at whitespace before training;
# SentencePiece would otherwise silently skip them.
MAX_SENTENCE_BYTES = 8192


def train_tokenizer(
    text_files: Sequence[Path],
    model_prefix: Path,
    vocab_size: int,
    model_type: TokenizerModelType = "bpe",
    seed: int = 0,
    num_threads: int = 1,
) -> Path:
    """Train a SentencePiece model on UTF-8 text files and write ``<model_prefix>.model``.

    Every non-blank line of every file is one training sentence. The model is
    written atomically (temp file, then rename). Returns the ``.model`` path.
    ``num_threads`` is recorded inside the model file, so keep it fixed (the
    default, 1) when byte-identical models across machines matter.

    Raises ValueError for bad arguments, unreadable text, or a vocabulary size
    the corpus cannot support (the message says which value to use instead);
    FileNotFoundError when a text file is missing.
    """
    _check_train_args(text_files, vocab_size, model_type, num_threads)
    model_path = Path(str(model_prefix) + ".model")
    model_path.parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(text_files),
            model_writer=writer,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            input_sentence_size=INPUT_SENTENCE_SIZE,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES + 16,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise _explain_training_error(err, vocab_size, text_files) from None

    tmp_path = model_path.with_name(f".{model_path.name}.tmp-{os.getpid()}")
    tmp_path.write_bytes(writer.getvalue())
    os.replace(tmp_path, model_path)
    return model_path


def _check_train_args(
    text_files: Sequence[Path], vocab_size: int, model_type: TokenizerModelType, num_threads: int
) -> None:
    """Raise ValueError/FileNotFoundError for arguments training cannot use."""
    if isinstance(text_files, (str, Path)):
        raise ValueError("text_files must be a list of paths, not a single path")
    if len(text_files) == 0:
        raise ValueError("text_files is empty: pass at least one UTF-8 text file")
    for path in text_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {path}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback needs {NUM_BYTE_PIECES} "
            f"byte pieces plus {NUM_SPECIAL_PIECES} special pieces; use vocab_size >= "
            f"{MIN_VOCAB_SIZE} (a few hundred more than that for useful merges)"
        )
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")


def _training_sentences(text_files: Sequence[Path]) -> Iterator[str]:
    """Yield the non-blank lines of the files, long lines cut at whitespace."""
    for path in text_files:
        text = _read_utf8(Path(path))
        for line in text.split("\n"):
            if line.strip():
                yield from _split_long_line(line, MAX_SENTENCE_BYTES)


def _read_utf8(path: Path) -> str:
    """Read a file as UTF-8 text or raise ValueError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}); "
            "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """Yield pieces of ``line`` of at most ``max_bytes`` UTF-8 bytes, cut before spaces.

    A single word longer than ``max_bytes`` is cut by characters.
    """
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    chunk: list[str] = []
    size = 0
    for word in re.split(r"(?=\s)", line):
        word_bytes = len(word.encode("utf-8"))
        if size + word_bytes > max_bytes and chunk:
            yield "".join(chunk)
            chunk, size = [], 0
        while word_bytes > max_bytes:  # pathological: one huge "word"
            head = word.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            yield head
            word = word[len(head) :]
            word_bytes = len(word.encode("utf-8"))
        chunk.append(word)
        size += word_bytes
    if chunk:
        yield "".join(chunk)


def _explain_training_error(
    err: RuntimeError, vocab_size: int, text_files: Sequence[Path]
) -> Exception:
    """Turn a SentencePiece trainer error into a ValueError that states the fix."""
    msg = str(err)
    too_high = re.search(r"Please set it to a value <= (\d+)", msg)
    if too_high:
        return ValueError(
            f"vocab_size={vocab_size} is too large for this training text: it supports "
            f"at most {too_high.group(1)}; lower vocab_size or train on more text"
        )
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_small:
        return ValueError(
            f"vocab_size={vocab_size} is too small: the text has enough distinct "
            f"characters to need at least {too_small.group(2)}; raise vocab_size"
        )
    if "sentences_.empty()" in msg:
        names = ", ".join(str(p) for p in text_files)
        return ValueError(f"no training text: every line is blank in {names}")
    return ValueError(f"SentencePiece training failed: {msg}")


class Tokenizer:
    """A loaded SentencePiece model. Encoding never adds bos/eos; callers do.

    Round trip ``decode(encode(s)) == s`` holds for models trained here, except
    that U+2581 ("▁") in ``s`` decodes as a space (SentencePiece's space marker).
    """

    def __init__(self, model_path: Path) -> None:
        """Load ``model_path``; FileNotFoundError if missing, ValueError if not a model."""
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {self.model_path}; train one with "
                "`python -m recipe.data.prepare ...` or pass the right --tokenizer path"
            )
        model_bytes = self.model_path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError:
            raise ValueError(
                f"{self.model_path} is not a valid SentencePiece .model file (corrupt or "
                "another format); retrain it with recipe.data.tokenizer.train_tokenizer"
            ) from None
        self.sha256: str = hashlib.sha256(model_bytes).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is in ``[0, vocab_size)``."""
        return int(self._sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``, or -1 if the model defines none."""
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``, or -1 if the model defines none."""
        return int(self._sp.bos_id())

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (never produced when the model has byte fallback)."""
        return int(self._sp.unk_id())

    @property
    def byte_fallback(self) -> bool:
        """True if unknown characters are encoded as byte pieces, not ``<unk>``."""
        return bool(self._sp.is_byte(self._sp.piece_to_id("<0x00>")))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of each text, encoded in parallel (``num_threads=0``: all cores)."""
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int, num_threads=num_threads)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ValueError if an id is outside ``[0, vocab_size)``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return str(self._sp.decode(ids))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"
