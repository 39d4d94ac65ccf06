"""Deterministic, resumable batches from prepared token shards, per data-parallel rank.

Samples are non-overlapping windows of the flat token array: sample ``i`` covers
tokens ``[i*T, i*T + T + 1)``; inputs are its first ``T`` tokens, targets the
last ``T`` (shifted by one). Windows may span document boundaries (documents
are separated by eos).

Sharding: with ``B`` = micro batch per rank and ``G = B * dp_size``, global
micro-step ``m`` of an epoch takes ``order[m*G : (m+1)*G]`` of that epoch's
permutation, and rank ``r`` takes ``order[m*G + r*B : m*G + (r+1)*B]``. So the
global set of sequences per step depends only on ``G`` (and seed, epoch, step),
not on how it is split over ranks: 1 rank x 4 equals 2 ranks x 2 equals 4 x 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from recipe.data.prepare import FORMAT_VERSION, META_FILE, SPLITS, Split

_PREPARE_HINT = "run `make data` or `python -m recipe.data.prepare --source PATH --out DIR --vocab-size N`"
_DTYPES = ("uint16", "uint32")

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), both int64 (B, T)


class TokenDataset:
    """One split (``"train"`` or ``"val"``) of a prepared folder, memory-mapped read-only.

    Validates on open: meta.json and the shard exist (FileNotFoundError with how to
    make them), format version and dtype are known, the shard size matches the
    token count, and every token id is below ``vocab_size`` (ValueError).
    """

    def __init__(self, data_dir: Path, split: Split) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = _read_meta(self.data_dir)
        shard = self.data_dir / f"{split}.bin"
        if not shard.is_file():
            raise FileNotFoundError(f"token shard {shard} not found; {_PREPARE_HINT}")
        dtype = np.dtype(self.meta["dtype"])
        expected = int(self.meta[f"{split}_tokens"])
        if shard.stat().st_size != expected * dtype.itemsize:
            raise ValueError(
                f"{shard} has {shard.stat().st_size} bytes but meta.json says {expected} "
                f"{dtype.name} tokens; the folder is damaged: prepare it again"
            )
        # (N,) flat token ids; np.memmap cannot map an empty file.
        self.tokens: np.ndarray = (
            np.memmap(shard, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
        )
        self._check_ids()

    def _check_ids(self) -> None:
        """ValueError if any token id is >= vocab_size (a scan of the shard)."""
        chunk = 1 << 24
        for start in range(0, self.num_tokens, chunk):
            top = int(self.tokens[start : start + chunk].max())
            if top >= self.vocab_size:
                raise ValueError(
                    f"{self.data_dir / (self.split + '.bin')} holds token id {top} >= "
                    f"vocab_size {self.vocab_size}: shards and meta.json do not belong "
                    "together; prepare the folder again"
                )

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        """SHA-256 of the tokenizer file the shards were made with (tokenizer.model or tokenizer.json)."""
        return str(self.meta["tokenizer_sha256"])

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer file stored next to the shards: meta's ``tokenizer_model``, a SentencePiece
        ``tokenizer.model`` or a Hugging Face ``tokenizer.json`` (its bos/eos ids are in ``meta``)."""
        return self.data_dir / self.meta["tokenizer_model"]

    def made_by(self, tokenizer_file: Path) -> bool:
        """Whether ``tokenizer_file`` (any file: its bytes are hashed) is the tokenizer the shards were made with."""
        return hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest() == self.tokenizer_sha256

    def check_tokenizer(self, sha256: str) -> None:
        """ValueError unless the shards were made by the tokenizer with this hash."""
        if sha256 != self.tokenizer_sha256:
            raise ValueError(
                f"token shards in {self.data_dir} were made by another tokenizer "
                f"(sha256 {self.tokenizer_sha256[:12]}..., yours {sha256[:12]}...); use "
                f"{self.tokenizer_path} or prepare the data again with your tokenizer"
            )

    def window(self, sample_ids: np.ndarray, seq_len: int) -> Batch:
        """Inputs and targets of the given samples: x, y int64 (len(sample_ids), seq_len)."""
        starts = np.asarray(sample_ids, dtype=np.int64) * seq_len  # (B,)
        idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)  # (B, T+1)
        rows = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.data_dir)!r}, {self.split!r}, tokens={self.num_tokens})"


def _read_meta(data_dir: Path) -> dict:
    """meta.json of a prepared folder, checked for the fields the loader needs."""
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no prepared data in {data_dir} ({META_FILE} missing); {_PREPARE_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}); prepare the folder again") from None
    missing = [k for k in ("format_version", "dtype", "vocab_size", "tokenizer_sha256",
                           "tokenizer_model", "train_tokens", "val_tokens") if k not in meta]  # fmt: skip
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}; prepare the folder again")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta['format_version']}, this code reads "
            f"{FORMAT_VERSION}; prepare the folder again"
        )
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{meta_path}: dtype must be one of {_DTYPES}, got {meta['dtype']!r}")
    return meta


def _num_windows(dataset: TokenDataset, seq_len: int, micro_batch_size: int, dp_size: int) -> int:
    """Number of whole windows; ValueError if fewer than one global micro-batch."""
    if seq_len < 1 or micro_batch_size < 1 or dp_size < 1:
        raise ValueError(
            f"seq_len, micro_batch_size, dp_size must be >= 1, got {seq_len}, {micro_batch_size}, {dp_size}"
        )
    num_samples = max(dataset.num_tokens - 1, 0) // seq_len
    global_batch = micro_batch_size * dp_size
    if num_samples < global_batch:
        raise ValueError(
            f"sequence length/batch longer than the data: the {dataset.split} split has "
            f"{dataset.num_tokens} tokens = {num_samples} windows of seq_len {seq_len}, but one "
            f"global micro-batch needs {global_batch} (micro_batch_size {micro_batch_size} x "
            f"dp_size {dp_size}); lower seq_len or micro batch, or use more data"
        )
    return num_samples


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")


class BatchLoader:
    """Endless shuffled batches for one data-parallel rank; resumable exactly.

    Epoch ``e`` visits the windows in the order of a permutation drawn from
    ``np.random.Generator(PCG64(SeedSequence([seed, e])))``; the incomplete tail
    (fewer than ``G`` windows) of each epoch is dropped, then the next epoch starts.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 0,
    ) -> None:
        self.num_samples = _num_windows(dataset, seq_len, micro_batch_size, dp_size)
        _check_rank(dp_rank, dp_size)
        self.dataset = dataset
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.global_micro_batch = micro_batch_size * dp_size
        self.steps_per_epoch = self.num_samples // self.global_micro_batch
        self.epoch = 0
        self.micro_step = 0  # index of the next global micro-batch within the epoch
        self._order: np.ndarray | None = None  # (num_samples,) permutation of this epoch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch])))
            self._order = rng.permutation(self.num_samples)
        return self._order

    def next_batch(self) -> Batch:
        """This rank's next micro-batch: x, y int64 (micro_batch_size, seq_len)."""
        if self.micro_step >= self.steps_per_epoch:
            self.epoch += 1
            self.micro_step = 0
            self._order = None
        start = self.micro_step * self.global_micro_batch + self.dp_rank * self.micro_batch_size
        sample_ids = self._epoch_order()[start : start + self.micro_batch_size]  # (B,)
        self.micro_step += 1
        return self.dataset.window(sample_ids, self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        """Endless iterator over ``next_batch()``."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch (same on every rank); feed to load_state_dict."""
        return {
            "epoch": self.epoch,
            "micro_step": self.micro_step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_micro_batch": self.global_micro_batch,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``. The global micro-batch must match (its split over
        ranks may differ); the saved seed is adopted. ValueError otherwise."""
        for key in ("seq_len", "global_micro_batch", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data loader: saved {key}={state[key]} but this run has "
                    f"{getattr(self, key)}; the batch order is only reproducible with the same "
                    "seq_len, global micro batch (micro_batch_size x dp_size) and data. Use the "
                    "saved settings, or start the data order afresh"
                )
        epoch, micro_step = int(state["epoch"]), int(state["micro_step"])
        if epoch < 0 or not 0 <= micro_step <= self.steps_per_epoch:
            raise ValueError(f"invalid loader state epoch={epoch}, micro_step={micro_step}")
        self.seed = int(state["seed"])
        self.epoch, self.micro_step = epoch, micro_step
        self._order = None


def eval_batches(
    dataset: TokenDataset,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    max_batches: int | None = None,
) -> list[Batch]:
    """This rank's evaluation batches: windows in order (no shuffle), sharded like
    BatchLoader (global batch m = windows [m*G, (m+1)*G), rank r takes its B of them).
    Every rank gets the same number of batches: min(max_batches, windows // G).
    """
    num_samples = _num_windows(dataset, seq_len, micro_batch_size, dp_size)
    _check_rank(dp_rank, dp_size)
    global_batch = micro_batch_size * dp_size
    steps = num_samples // global_batch
    if max_batches is not None:
        steps = min(steps, max_batches)
    batches = []
    for m in range(steps):
        start = m * global_batch + dp_rank * micro_batch_size
        batches.append(dataset.window(np.arange(start, start + micro_batch_size), seq_len))
    return batches
