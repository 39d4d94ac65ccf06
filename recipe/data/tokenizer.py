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

A run started from a Hugging Face model uses that model's own ``tokenizer.json``
instead (``HFTokenizer``, read with the ``tokenizers`` package, same interface).
``load_tokenizer`` takes either kind of file, or a model folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import sentencepiece as spm
import tokenizers

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

    # Documents are written as ids + [eos]; only HFTokenizer can ask for a leading bos.
    add_bos_token: bool = False

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

    def id_to_token(self, token_id: int) -> str:
        """The piece string of ``token_id`` (e.g. ``"<s>"`` for bos)."""
        return str(self._sp.id_to_piece(_ids_in_range([token_id], self.vocab_size)[0]))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ValueError if an id is outside ``[0, vocab_size)``."""
        return str(self._sp.decode(_ids_in_range(ids, self.vocab_size)))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- #
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------- #

HF_TOKENIZER_FILE = "tokenizer.json"  # what transformers loads first from a model folder
SP_TOKENIZER_FILE = "tokenizer.model"
# Files of a Hugging Face model folder that name bos/eos, in the order they are asked.
_ID_CONFIGS = ("config.json", "generation_config.json")
_TOKENIZER_CONFIG = "tokenizer_config.json"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``, with the interface of ``Tokenizer``.

    Encoding never adds special tokens (no post-processor bos); callers do.
    bos/eos come from the model folder around the file (``config.json``, then
    ``generation_config.json``, then ``tokenizer_config.json``'s token strings),
    -1 when none names them; ``add_bos_token`` from ``tokenizer_config.json``.
    """

    def __init__(self, model_path: Path) -> None:
        """Load ``model_path``; FileNotFoundError if missing, ValueError if not a tokenizer.json."""
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {self.model_path}; pass the tokenizer.json of a "
                "Hugging Face model (or the model folder)"
            )
        data = self.model_path.read_bytes()
        self.sha256: str = hashlib.sha256(data).hexdigest()
        # Parse the bytes that were hashed, so sha256 names exactly what was loaded.
        try:
            spec = json.loads(data.decode("utf-8"))
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception on bad input
            raise ValueError(
                f"{self.model_path} is not a valid Hugging Face tokenizer.json ({str(err)[:80]}); "
                "download it again from the model repository"
            ) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(f"{self.model_path} has an empty vocabulary; use a trained tokenizer.json")
        self._vocab_size = max(vocab.values()) + 1  # ids may have holes: the id range is what counts
        self._unk_id = self._model_unk_id(spec.get("model") or {})
        folder = self.model_path.parent
        tokenizer_config = _read_json_config(folder / _TOKENIZER_CONFIG)
        self._bos_id = self._special_id(folder, tokenizer_config, "bos")
        self._eos_id = self._special_id(folder, tokenizer_config, "eos")
        add_bos = tokenizer_config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ValueError(
                f"{folder / _TOKENIZER_CONFIG}: add_bos_token must be true or false, got {add_bos!r}; fix the file"
            )
        self.add_bos_token: bool = bool(add_bos)

    def _model_unk_id(self, model: dict) -> int:
        """The model's unknown-token id (Unigram stores an id, the others a token), -1 when none."""
        if isinstance(model.get("unk_id"), int):
            return int(model["unk_id"])
        unk = model.get("unk_token")
        found = self._tok.token_to_id(unk) if isinstance(unk, str) else None
        return -1 if found is None else int(found)

    def _special_id(self, folder: Path, tokenizer_config: dict, kind: str) -> int:
        """Id of the ``kind`` ("bos"/"eos") token from the model folder's configs, -1 when none names it."""
        for name in _ID_CONFIGS:
            value = _read_json_config(folder / name).get(f"{kind}_token_id")
            if isinstance(value, list):  # e.g. several eos ids: the first is the canonical one
                value = value[0] if value else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self._vocab_size:
                raise ValueError(
                    f"{folder / name}: {kind}_token_id {value!r} is not an id in [0, {self._vocab_size}) of "
                    f"{self.model_path.name}; fix the file or use the matching tokenizer"
                )
            return value
        token = tokenizer_config.get(f"{kind}_token")
        if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
            token = token.get("content")
        if not isinstance(token, str):
            return -1
        found = self._tok.token_to_id(token)
        if found is None:
            raise ValueError(
                f"{folder / _TOKENIZER_CONFIG}: {kind}_token {token!r} is not in {self.model_path.name}; "
                "fix the file or use the matching tokenizer"
            )
        return int(found)

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1, added tokens included); every id is in ``[0, vocab_size)``."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        """Id of the eos token named by the model folder, or -1 if none is."""
        return self._eos_id

    @property
    def bos_id(self) -> int:
        """Id of the bos token named by the model folder, or -1 if none is."""
        return self._bos_id

    @property
    def unk_id(self) -> int:
        """Id of the model's unknown token, or -1 if it has none."""
        return self._unk_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of each text. ``num_threads=1`` encodes serially; otherwise in parallel on the
        ``tokenizers`` thread pool (all cores, or ``RAYON_NUM_THREADS``: it has no per-call size)."""
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode_batch expects a list of str, got {bad[0]}")
        if num_threads == 1:
            return [self.encode(t) for t in texts]
        return [list(e.ids) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def id_to_token(self, token_id: int) -> str:
        """The token string of ``token_id``; ValueError for an id in a hole of the vocabulary."""
        token = self._tok.id_to_token(_ids_in_range([token_id], self.vocab_size)[0])
        if token is None:
            raise ValueError(f"token id {token_id} is not in {self.model_path}; pass an id the tokenizer has")
        return str(token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept); ValueError if an id is outside ``[0, vocab_size)``."""
        return str(self._tok.decode(_ids_in_range(ids, self.vocab_size), skip_special_tokens=False))

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def _ids_in_range(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as ints; ValueError naming the first few outside ``[0, vocab_size)`` (both tokenizers' decode)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids


def _read_json_config(path: Path) -> dict[str, Any]:
    """A model folder's JSON config as a dict ({} when absent); ValueError naming the file if unreadable."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); download it again or delete it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}; fix or delete it")
    return value


def tokenizer_file(path: Path) -> Path:
    """The file ``load_tokenizer(path)`` reads: ``path`` itself, or a model folder's
    ``tokenizer.json`` (what transformers uses), else its ``tokenizer.model``.

    FileNotFoundError/ValueError with the fix when there is none.
    """
    path = Path(path)
    if path.is_dir():
        for name in (HF_TOKENIZER_FILE, SP_TOKENIZER_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no {HF_TOKENIZER_FILE} or {SP_TOKENIZER_FILE} in {path}; pass a Hugging Face model folder "
            "that has one, or the tokenizer file itself"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer not found: {path}; pass a SentencePiece .model, a Hugging Face tokenizer.json "
            "or a model folder holding one"
        )
    if path.suffix not in (".model", ".json"):
        raise ValueError(
            f"{path} is not a tokenizer file (looked for a SentencePiece .model or a Hugging Face "
            "tokenizer.json); pass one of those or a model folder"
        )
    return path


def load_tokenizer(path: Path) -> Tokenizer | HFTokenizer:
    """A SentencePiece ``.model`` -> ``Tokenizer``; a ``tokenizer.json`` -> ``HFTokenizer``; a folder ->
    its ``tokenizer.json``, else its ``tokenizer.model`` (see ``tokenizer_file``)."""
    file = tokenizer_file(path)
    return HFTokenizer(file) if file.suffix == ".json" else Tokenizer(file)


# --------------------------------------------------------------------------- #
# SentencePiece model -> Hugging Face tokenizer.json (for the HF export)
# --------------------------------------------------------------------------- #

_SP_SPACE = "\u2581"  # "▁": SentencePiece's space marker


def sentencepiece_to_hf(model_path: Path, add_bos: bool) -> tokenizers.Tokenizer:
    """A ``tokenizers`` tokenizer that encodes every string to the ids ``Tokenizer(model_path).encode`` gives and
    decodes them back to the same text (control pieces dropped, as SentencePiece does); with ``add_bos`` its
    post-processor puts ``<s>`` first (the shards' ``bos_per_document``). Only the kind of model trained here
    (BPE, identity normalization, spaces kept, byte fallback) is converted: ValueError naming any other setting."""
    from sentencepiece import sentencepiece_model_pb2  # protobuf-based; only the export needs it

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    _check_convertible(proto, Path(model_path), add_bos)
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == p.NORMAL}
    # SentencePiece's BPE joins the adjacent pair whose union scores highest: merges ranked by that score.
    merged = sorted((i for i, p in enumerate(pieces) if p.type == p.NORMAL and len(p.piece) > 1),
                    key=lambda i: (-pieces[i].score, i))
    merges = [(pieces[i].piece[:cut], pieces[i].piece[cut:]) for i in merged for cut in range(1, len(pieces[i].piece))
              if pieces[i].piece[:cut] in normal and pieces[i].piece[cut:] in normal]
    unk = pieces[proto.trainer_spec.unk_id].piece
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                                     byte_fallback=True))
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix  # SentencePiece puts "▁" before every non-empty text
    steps = [tokenizers.normalizers.Prepend(_SP_SPACE)] if dummy_prefix else []
    tok.normalizer = tokenizers.normalizers.Sequence(steps + [tokenizers.normalizers.Replace(" ", _SP_SPACE)])
    decode_steps = [tokenizers.decoders.Replace(_SP_SPACE, " "), tokenizers.decoders.ByteFallback(),
                    tokenizers.decoders.Fuse()]
    if dummy_prefix:  # ... and drops it again when decoding
        decode_steps.append(tokenizers.decoders.Strip(" ", 1, 0))
    tok.decoder = tokenizers.decoders.Sequence(decode_steps)
    specials = [p.piece for p in pieces if p.type in (p.UNKNOWN, p.CONTROL)]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    if add_bos:
        bos = pieces[proto.trainer_spec.bos_id].piece
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tok


def _check_convertible(proto: Any, model_path: Path, add_bos: bool) -> None:
    """ValueError unless ``sentencepiece_to_hf`` reproduces this model exactly (what train_tokenizer writes)."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    settings = {
        "model_type": (trainer.model_type == trainer.BPE, "BPE"),
        "normalization_rule_name": (norm.name == "identity" and not norm.precompiled_charsmap, "identity"),
        "remove_extra_whitespaces": (not norm.remove_extra_whitespaces, "False"),
        "escape_whitespaces": (norm.escape_whitespaces, "True"),
        "treat_whitespace_as_suffix": (not trainer.treat_whitespace_as_suffix, "False"),
        "byte_fallback": (trainer.byte_fallback, "True"),  # without it SentencePiece's <unk> runs are not tested
    }
    wrong = [f"{name} (needs {need})" for name, (ok, need) in settings.items() if not ok]
    kinds = {p.type for p in proto.pieces} - {proto.pieces[0].NORMAL, proto.pieces[0].UNKNOWN,
                                               proto.pieces[0].CONTROL, proto.pieces[0].BYTE}
    if kinds:
        wrong.append("user-defined or unused pieces (needs none)")
    if trainer.unk_id < 0 or (add_bos and trainer.bos_id < 0):
        wrong.append("no <unk> piece, or no <s> while the shards start documents with it (needs both)")
    if wrong:
        raise ValueError(f"{model_path} cannot be written as an exact tokenizer.json: {', '.join(wrong)}; "
                         "prepare the data with a tokenizer trained by recipe.data.prepare, or export with "
                         "--format torch and keep the .model")
