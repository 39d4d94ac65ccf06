"""Hugging Face tokenizer.json: loading, bos/eos from the model folder, prepare with it. CPU, fast, no network.

Every tokenizer here is built in the test with the ``tokenizers`` package, which is also the reference: our
wrapper and our shards are compared with what ``tokenizers`` itself gives for the same file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from conftest import ROOT
from recipe.data.corpus import read_documents
from recipe.data.loader import TokenDataset
from recipe.data.prepare import load_meta, main, prepare_dataset
from recipe.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, tokenizer_file, train_tokenizer

SENTENCES = [
    "The river rose slowly through the spring.",
    "The farmers along its banks watched the water climb toward their fields.",
    "Some of them moved their cattle to the high pasture; others waited.",
    "In the town, the mill kept running day and night, grinding the winter wheat.",
    "By the end of April the rain had stopped and the river fell back into its bed.",
]
TEXTS = [
    " ".join(SENTENCES),
    "emoji: 😀🎉 and CJK 漢字, naïve café — “quotes”",
    "  leading and trailing spaces  \n\ttabs and newlines\r\n",
    "",
]
BOS, EOS = "<s>", "</s>"


def _train_bpe(vocab_size: int, sentences: list[str] = SENTENCES) -> tokenizers.Tokenizer:
    """A byte-level BPE (exact round trip) whose post-processor adds <s>, as many HF tokenizers do."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(sentences * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return tok


def hf_folder(folder: Path, tok: tokenizers.Tokenizer, configs: dict[str, dict]) -> Path:
    """A Hugging Face model folder: ``tokenizer.json`` and the given JSON configs (file name -> content)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name, content in configs.items():
        (folder / name).write_text(json.dumps(content))
    return folder


MODEL_CONFIGS = {
    "config.json": {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2},
    "tokenizer_config.json": {"add_bos_token": True, "bos_token": BOS, "eos_token": {"content": EOS}},
}


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    return _train_bpe(400)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, bpe: tokenizers.Tokenizer) -> Path:
    """A model folder: BPE tokenizer.json, config.json with bos 1 / eos 2, add_bos_token true."""
    return hf_folder(tmp_path_factory.mktemp("hf") / "model", bpe, MODEL_CONFIGS)


def write_corpus(folder: Path, num_docs: int = 8) -> dict[str, str]:
    """``num_docs`` .txt documents (some with emoji and CJK); return doc id -> text as read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        text = f"Document {i}. " + " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))
        (folder / f"doc{i:02d}.txt").write_text(text + (" 😀 漢字" if i % 3 == 0 else ""), encoding="utf-8")
    return dict(read_documents(folder))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message, message
    return message


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def test_load_tokenizer_file_and_folder(hf_dir: Path, tmp_path: Path) -> None:
    file = hf_dir / "tokenizer.json"
    for given in (hf_dir, file):
        tok = load_tokenizer(given)
        assert isinstance(tok, HFTokenizer) and tok.model_path == file and tokenizer_file(given) == file
        assert tok.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    ref = tokenizers.Tokenizer.from_file(str(file))
    assert tok.vocab_size == max(ref.get_vocab(with_added_tokens=True).values()) + 1 == 400
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0) and tok.add_bos_token
    assert repr(tok) == f"HFTokenizer({str(file)!r}, vocab_size=400)"
    # SentencePiece: a .model file, a folder with only tokenizer.model; tokenizer.json wins when both are there.
    text = tmp_path / "train.txt"
    text.write_text("\n".join(SENTENCES * 3), encoding="utf-8")
    sp_model = train_tokenizer([text], tmp_path / "sp" / "tokenizer", 300)
    assert isinstance(load_tokenizer(sp_model), Tokenizer) and not Tokenizer(sp_model).add_bos_token
    assert isinstance(load_tokenizer(sp_model.parent), Tokenizer)
    shutil.copyfile(file, sp_model.parent / "tokenizer.json")
    assert isinstance(load_tokenizer(sp_model.parent), HFTokenizer)
    assert tokenizer_file(sp_model.parent) == sp_model.parent / "tokenizer.json"


def test_round_trip_matches_tokenizers(hf_dir: Path) -> None:
    tok = load_tokenizer(hf_dir)
    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))  # the reference, not our wrapper
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == text  # byte-level: exact
        if text:  # negative control: the post-processor would have added <s>; encode must not
            assert ref.encode(text).ids == [1] + ids
    assert tok.encode_batch(TEXTS) == tok.encode_batch(TEXTS, num_threads=1) == [tok.encode(t) for t in TEXTS]
    assert tok.decode([1] + tok.encode("river") + [2]) == "<s>river</s>"  # special tokens kept
    with pytest.raises(ValueError, match=r"out of range \[0, 400\)"):
        tok.decode([400])
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "configs, bos, eos",
    [
        ({"config.json": {"bos_token_id": 1, "eos_token_id": 2}}, 1, 2),
        ({"config.json": {"bos_token_id": None, "eos_token_id": [2, 0]}}, -1, 2),  # a list: the first
        ({"generation_config.json": {"bos_token_id": 1, "eos_token_id": [2]}}, 1, 2),
        # config.json first, per id: its eos wins, the missing bos comes from generation_config.json
        ({"config.json": {"eos_token_id": 2}, "generation_config.json": {"bos_token_id": 2, "eos_token_id": 1}},
         2, 2),
        ({"tokenizer_config.json": {"bos_token": BOS, "eos_token": EOS}}, 1, 2),
        ({"tokenizer_config.json": {"bos_token": {"content": BOS}, "eos_token": {"content": EOS}}}, 1, 2),
        ({"config.json": {"eos_token_id": 0}, "tokenizer_config.json": {"bos_token": BOS, "eos_token": EOS}}, 1, 0),
        ({"config.json": {"model_type": "llama"}, "tokenizer_config.json": {"bos_token": None}}, -1, -1),
        ({}, -1, -1),
    ],
)  # fmt: skip
def test_bos_eos_from_model_folder(tmp_path: Path, bpe: tokenizers.Tokenizer, configs: dict, bos: int,
                                   eos: int) -> None:  # fmt: skip
    tok = load_tokenizer(hf_folder(tmp_path / "m", bpe, configs))
    assert (tok.bos_id, tok.eos_id) == (bos, eos)
    assert not tok.add_bos_token  # default when tokenizer_config.json does not say


def test_unk_id(tmp_path: Path) -> None:
    vocab = {"a": 0, "b": 1, "[UNK]": 2, EOS: 3}
    with_unk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    with_unk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = load_tokenizer(hf_folder(tmp_path / "u", with_unk, {}))
    assert tok.unk_id == 2 and tok.encode("a zzz b") == [0, 2, 1]
    unigram = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -1.5)], 0, False))
    assert load_tokenizer(hf_folder(tmp_path / "g", unigram, {})).unk_id == 0
    bpe_no_unk = tokenizers.Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    assert load_tokenizer(hf_folder(tmp_path / "n", bpe_no_unk, {})).unk_id == -1


def test_bad_tokenizer_inputs(tmp_path: Path, bpe: tokenizers.Tokenizer) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(empty)
    assert "no tokenizer.json or tokenizer.model in" in one_line(err) and str(empty) in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "missing")
    assert "tokenizer not found" in one_line(err)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path / "vocab.txt")
    assert "is not a tokenizer file" in one_line(err)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError) as err:
        load_tokenizer(corrupt)
    assert str(corrupt / "tokenizer.json") in one_line(err) and "not a valid Hugging Face" in str(err.value)
    (corrupt / "tokenizer.json").write_text('{"not": "a tokenizer"}')  # valid JSON, not a tokenizer
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(corrupt / "tokenizer.json")
    bad_configs = [
        ({"config.json": "{oops"}, "config.json is not valid JSON"),
        ({"config.json": {"eos_token_id": 400}}, r"eos_token_id 400 is not an id in \[0, 400\)"),
        ({"config.json": {"bos_token_id": "1"}}, "bos_token_id '1' is not an id"),
        ({"tokenizer_config.json": {"eos_token": "<|end|>"}}, "eos_token '<|end|>' is not in tokenizer.json"),
        ({"tokenizer_config.json": {"add_bos_token": "yes"}}, "add_bos_token must be true or false"),
    ]
    for i, (configs, message) in enumerate(bad_configs):
        folder = hf_folder(tmp_path / f"bad{i}", bpe, {})
        for name, content in configs.items():
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=message) as err:
            load_tokenizer(folder)
        one_line(err)


# --------------------------------------------------------------------------- #
# Prepare with an HF tokenizer
# --------------------------------------------------------------------------- #


def expected_tokens(docs: dict[str, str], doc_ids: list[str], ref: tokenizers.Tokenizer, bos: int | None,
                    eos: int) -> list[int]:  # fmt: skip
    """What the shards must hold, from ``tokenizers`` itself: per document [bos] + ids + [eos]."""
    lead = [] if bos is None else [bos]
    return [t for d in doc_ids for t in lead + ref.encode(docs[d], add_special_tokens=False).ids + [eos]]


@pytest.mark.parametrize("vocab_size", [None, 400])
def test_prepare_with_hf_folder(tmp_path: Path, hf_dir: Path, vocab_size: int | None) -> None:
    docs = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    meta = prepare_dataset(tmp_path / "corpus", out, vocab_size, hf_dir, val_every=4, verbose=False)
    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert meta["tokenizer_model"] == "tokenizer.json" and meta["bos_per_document"] is True
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["dtype"]) == (400, 1, 2, "uint16")
    assert not meta["tokenizer_trained"] and meta["tokenizer_sha256"] == load_tokenizer(hf_dir).sha256
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    other = _train_bpe(300, SENTENCES[::-1] + ["Another corpus altogether."])  # negative control
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert tokens == expected_tokens(docs, meta[f"{split}_docs"], ref, 1, 2)
        assert tokens != expected_tokens(docs, meta[f"{split}_docs"], ref, None, 2)  # the bos is there
        assert tokens != expected_tokens(docs, meta[f"{split}_docs"], other, 1, 2)  # and it is this tokenizer
        assert meta[f"{split}_tokens"] == len(tokens)
    assert load_meta(out) == meta
    ds = TokenDataset(out, "train")
    assert ds.tokenizer_path == out / "tokenizer.json" and ds.made_by(hf_dir / "tokenizer.json")
    ds.check_tokenizer(load_tokenizer(hf_dir).sha256)


def test_prepare_reuse_follows_the_model_folder(tmp_path: Path, bpe: tokenizers.Tokenizer,
                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """bos/eos/add_bos_token live outside the hashed tokenizer.json: a change there re-prepares."""
    docs = write_corpus(tmp_path / "corpus", num_docs=5)
    model = hf_folder(tmp_path / "model", bpe, MODEL_CONFIGS)
    out = tmp_path / "out"
    first = prepare_dataset(tmp_path / "corpus", out, None, model, val_every=3)
    assert prepare_dataset(tmp_path / "corpus", out, None, model, val_every=3) == first
    assert "reusing" in capsys.readouterr().out
    (model / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    second = prepare_dataset(tmp_path / "corpus", out, None, model, val_every=3, verbose=False)
    assert second["bos_per_document"] is False and load_meta(out) == second
    ref = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    tokens = np.fromfile(out / "val.bin", dtype=np.uint16).tolist()
    assert tokens == expected_tokens(docs, second["val_docs"], ref, None, 2)
    # Switching the folder to a trained SentencePiece tokenizer leaves no stale tokenizer.json behind.
    trained = prepare_dataset(tmp_path / "corpus", out, 300, val_every=3, verbose=False)
    assert trained["tokenizer_model"] == "tokenizer.model" and trained["bos_per_document"] is False
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]


def test_wordlevel_70k_vocab_gives_uint32_shards(tmp_path: Path) -> None:
    size = 70_000
    vocab = {f"w{i}": i for i in range(size - 2)} | {"<unk>": size - 2, EOS: size - 1}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = hf_folder(tmp_path / "model", tok, {"config.json": {"eos_token_id": size - 1}})
    rng = np.random.default_rng(0)
    (tmp_path / "corpus").mkdir()
    for d in range(6):  # mostly ids above 65,535, which uint16 would wrap
        words = [f"w{i}" for i in rng.integers(60_000, size - 2, size=50)] + ["w7"]
        (tmp_path / "corpus" / f"d{d}.txt").write_text(" ".join(words))
    docs = dict(read_documents(tmp_path / "corpus"))
    meta = prepare_dataset(tmp_path / "corpus", tmp_path / "out", None, model, val_every=3, verbose=False)
    assert (meta["dtype"], meta["vocab_size"], meta["eos_id"], meta["bos_id"]) == ("uint32", size, size - 1, -1)
    assert meta["bos_per_document"] is False
    for split in ("train", "val"):
        ds = TokenDataset(tmp_path / "out", split)
        expected = expected_tokens(docs, meta[f"{split}_docs"], tok, None, size - 1)
        assert ds.tokens.dtype == np.uint32 and ds.tokens.tolist() == expected
        assert max(expected) > 65_535 and size - 2 not in expected  # no <unk>: every word is known
        x, y = ds.window(np.array([0]), 20)
        assert x[0].tolist() == expected[:20] and y[0].tolist() == expected[1:21]


def test_prepare_refuses_bad_tokenizers(tmp_path: Path, bpe: tokenizers.Tokenizer) -> None:
    write_corpus(tmp_path / "corpus", num_docs=4)
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    cases = [
        (hf_folder(tmp_path / "no_eos", bpe, {"config.json": {"bos_token_id": 1}}), "has no eos token"),
        (hf_folder(tmp_path / "no_bos", bpe, {"config.json": {"eos_token_id": 2},
                                              "tokenizer_config.json": {"add_bos_token": True}}),
         "asks for a bos token"),
        (tmp_path / "neither", "no tokenizer.json or tokenizer.model in"),
    ]  # fmt: skip
    (tmp_path / "neither").mkdir()
    for model, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            prepare_dataset(corpus, out, None, model, val_every=2, verbose=False)
        one_line(err)
    with pytest.raises(ValueError, match="vocab_size is needed to train a tokenizer"):
        prepare_dataset(corpus, out, None, None, val_every=2, verbose=False)
    assert not (out / "meta.json").exists()


def test_prepare_cli_with_hf_folder(tmp_path: Path, hf_dir: Path, capsys: pytest.CaptureFixture) -> None:
    write_corpus(tmp_path / "corpus", num_docs=5)
    base = ["--source", str(tmp_path / "corpus"), "--out", str(tmp_path / "out")]
    assert main(base + ["--tokenizer", str(hf_dir)]) == 0  # no --vocab-size
    assert "prepared" in capsys.readouterr().out
    meta = load_meta(tmp_path / "out")
    assert meta["tokenizer_model"] == "tokenizer.json" and meta["vocab_size"] == 400
    assert main(base + ["--tokenizer", str(hf_dir / "tokenizer.json"), "--vocab-size", "400"]) == 0
    capsys.readouterr()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("not json")
    (tmp_path / "neither").mkdir()
    bad = [
        (["--tokenizer", str(hf_dir), "--vocab-size", "999"], "--vocab-size 999 does not match the tokenizer"),
        (["--tokenizer", str(tmp_path / "corrupt")], "corrupt/tokenizer.json is not a valid Hugging Face"),
        (["--tokenizer", str(tmp_path / "neither")], "no tokenizer.json or tokenizer.model in"),
    ]
    for args, message in bad:
        assert main(base + args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert load_meta(tmp_path / "out") == meta  # failures leave the earlier result alone


# --------------------------------------------------------------------------- #
# Older prepared data and SentencePiece meta
# --------------------------------------------------------------------------- #


def test_old_meta_without_bos_per_document_still_opens() -> None:
    old = ROOT / "tests" / "fixtures" / "old_checkpoint" / "data"
    meta = json.loads((old / "meta.json").read_text())
    assert "bos_per_document" not in meta and meta["tokenizer_model"] == "tokenizer.model"
    assert load_meta(old) == meta
    for split in ("train", "val"):
        assert TokenDataset(old, split).num_tokens == meta[f"{split}_tokens"]


def test_sentencepiece_meta_keys_unchanged_but_bos_per_document(tmp_path: Path) -> None:
    old = json.loads((ROOT / "tests" / "fixtures" / "old_checkpoint" / "data" / "meta.json").read_text())
    write_corpus(tmp_path / "corpus", num_docs=4)
    meta = prepare_dataset(tmp_path / "corpus", tmp_path / "out", 300, val_every=2, verbose=False)
    keys = list(old)
    keys.insert(keys.index("bos_id") + 1, "bos_per_document")  # the one new key, in the same order otherwise
    assert list(meta) == keys
    assert meta["bos_per_document"] is False and meta["tokenizer_model"] == "tokenizer.model"
