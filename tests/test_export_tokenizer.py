"""The exports carry the run's tokenizer: ``AutoTokenizer.from_pretrained`` of an HF export encodes and decodes
exactly as the recipe's tokenizer does; ``--format torch`` names the tokenizer files it goes with. CPU, no launch:
the run is tests/fixtures/old_checkpoint/run (a real 2-rank checkpoint, its tokenizer.model from prepare)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from conftest import WORDS
from recipe.data.tokenizer import load_tokenizer, sentencepiece_to_hf, train_tokenizer
from recipe.export import main, save_tokenizer

transformers = pytest.importorskip("transformers")

RUN = Path(__file__).resolve().parent / "fixtures" / "old_checkpoint" / "run"
DATA = RUN.parent / "data"
SENTENCES = [
    "", " ", "The nation", " leading space", "   three leading spaces", "trailing spaces  ",
    "repeated   spaces  inside   words", "\ttabs\tand\nnewlines\r\nand\n\nblank lines",
    "naïve café, 漢字 and 😀🎉",
    "digits 0123456789 and 3.14159, 2026-12-01", "unknown ☃ ✓ © characters ▁ and Ωμέγα",
    "literal <s> and </s> and <unk> text", "The congress of the united states will work for peace.",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mismatches(theirs, ours, bos: list[int] = ()) -> list[str]:
    """Sentences where ``theirs`` (transformers) encodes or decodes differently from ``ours`` (the recipe's),
    documents encoded as our shards start them (``bos``, then the text)."""
    bad = []
    for text in SENTENCES:
        ids = ours.encode(text)
        got = theirs(text)["input_ids"]
        document = [*bos, *ids, ours.eos_id]
        if got != [*bos, *ids] or theirs.decode(document, skip_special_tokens=True) != ours.decode(ids):
            bad.append(f"{text!r}: ours {ids}, theirs {got}")
    return bad


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["--run_dir", str(RUN), "--format", "hf", "--out", str(out)]) == 0
    return out


def test_autotokenizer_of_the_export_encodes_and_decodes_as_ours(hf_export):
    ours = load_tokenizer(RUN / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_export)
    assert mismatches(theirs, ours) == []
    assert len(theirs) == theirs.vocab_size == ours.vocab_size
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (ours.bos_id, ours.eos_id, ours.unk_id)
    config = json.loads((hf_export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)
    assert sha256(hf_export / "tokenizer.model") == ours.sha256  # the original travels along


def test_the_comparison_catches_a_wrong_tokenizer(hf_export, tmp_path):
    """Negative controls: a SentencePiece model trained differently, and our tokenizer.json under transformers'
    LlamaTokenizer (which rebuilds the pipeline and loses leading and repeated spaces), both fail."""
    ours = load_tokenizer(RUN / "tokenizer.model")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))  # other text, other merges
    other = load_tokenizer(train_tokenizer([text], tmp_path / "other", vocab_size=300))
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_export, wrong)
    sentencepiece_to_hf(other.model_path, add_bos=False).save(str(wrong / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(wrong)
    assert mismatches(theirs, other) == []  # converted exactly, it is just another tokenizer
    assert len(mismatches(theirs, ours)) > len(SENTENCES) // 2
    bad = mismatches(transformers.LlamaTokenizer.from_pretrained(hf_export), ours)
    assert any(line.startswith("' leading space'") for line in bad)


def test_shards_that_start_documents_with_bos_export_a_tokenizer_that_adds_it(tmp_path):
    data = shutil.copytree(DATA, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "bos_per_document": True}))
    tokenizer, ids = save_tokenizer(RUN, {"data": {"path": str(data)}, "model": {"max_seq_len": 32}}, tmp_path / "out")
    ours = load_tokenizer(tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert mismatches(theirs, ours, bos=[ours.bos_id]) == []
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert ids == {"bos_token_id": 1, "eos_token_id": 2}


def bpe_source(folder: Path, tokenizer_class: str) -> Path:
    """A Hugging Face model folder with a byte-level BPE tokenizer.json (vocab 320) and its configs."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    configs = {"config.json": {"model_type": "mixtral", "bos_token_id": 1, "eos_token_id": 2},
               "tokenizer_config.json": {"tokenizer_class": tokenizer_class, "add_bos_token": True, "bos_token": "<s>",
                                         "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 64},
               "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}}
    for name, content in configs.items():
        (folder / name).write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "LlamaTokenizer"])
def test_a_run_imported_from_hugging_face_exports_the_source_tokenizer(tmp_path, tokenizer_class):
    source = bpe_source(tmp_path / "source", tokenizer_class)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(source / "tokenizer.json", run / "tokenizer.json")  # what the trainer copies into a run
    saved_config = {"train": {"init_from": f"hf:{source}"}, "data": {"path": str(tmp_path / "gone")}}
    tokenizer, ids = save_tokenizer(run, saved_config, tmp_path / "out")
    assert tokenizer == run / "tokenizer.json" and ids == {"bos_token_id": 1, "eos_token_id": 2}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    reference = transformers.AutoTokenizer.from_pretrained(source)
    assert type(theirs) is type(reference) and len(theirs) == len(reference) == 320
    for text in SENTENCES:
        ids = reference(text)["input_ids"]
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == reference.decode(ids)


def test_an_hf_tokenizer_without_its_source_folder_gets_configs_naming_its_tokens(tmp_path):
    source = bpe_source(tmp_path / "source", "PreTrainedTokenizerFast")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(source / "tokenizer.json", run / "tokenizer.json")
    tokenizer, ids = save_tokenizer(run, {}, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert ids == {} and config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["unk_token"] == "<unk>"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer(tokenizer)
    assert all(theirs.encode(t, add_special_tokens=False) == ours.encode(t) for t in SENTENCES)


def test_torch_export_names_the_tokenizer_beside_it(tmp_path):
    out = tmp_path / "model_fp32.pt"
    assert main(["--run_dir", str(RUN), "--format", "torch", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["tokenizer"] == "model_fp32.tokenizer/tokenizer.model"
    beside = out.parent / saved["tokenizer"]
    assert sha256(beside) == saved["tokenizer_sha256"] == sha256(RUN / "tokenizer.model")
    assert load_tokenizer(beside).encode(SENTENCES[6]) == load_tokenizer(RUN).encode(SENTENCES[6])
    assert len(transformers.AutoTokenizer.from_pretrained(beside.parent)) == 320


def test_torch_export_refuses_to_overwrite_the_tokenizer_folder(tmp_path, capsys):
    (tmp_path / "model.tokenizer").mkdir()
    assert main(["--run_dir", str(RUN), "--format", "torch", "--out", str(tmp_path / "model.pt")]) == 2
    assert "model.tokenizer exists" in capsys.readouterr().err and not (tmp_path / "model.pt").exists()


def run_without_tokenizer(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(RUN / "checkpoints")
    return run


def test_a_run_without_tokenizer_exports_with_a_note(tmp_path, capsys):
    run = run_without_tokenizer(tmp_path)
    assert main(["--run_dir", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "holds no tokenizer.json or tokenizer.model" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert main(["--run_dir", str(run), "--format", "torch", "--out", str(tmp_path / "m.pt")]) == 0
    assert torch.load(tmp_path / "m.pt", weights_only=False)["tokenizer"] is None


def test_a_sentencepiece_model_it_cannot_reproduce_is_refused_before_writing(tmp_path, capsys):
    run = run_without_tokenizer(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(SENTENCES * 30))
    train_tokenizer([text], run / "tokenizer", vocab_size=320, model_type="unigram")
    assert main(["--run_dir", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written as an exact tokenizer.json: model_type (needs BPE)" in err and "--format torch" in err
    assert not (tmp_path / "hf").exists()
    assert main(["--run_dir", str(run), "--format", "torch", "--out", str(tmp_path / "m.pt")]) == 0
    assert os.listdir(tmp_path / "m.tokenizer") == ["tokenizer.model"]  # the torch export still carries the .model
    assert torch.load(tmp_path / "m.pt", weights_only=False)["tokenizer"] == "m.tokenizer/tokenizer.model"


def random_text(rng: random.Random, length: int) -> str:
    """Text from pieces that stress the conversion: runs of spaces, tabs, newlines, digits, unicode outside the
    vocabulary, the space marker, literal special tokens, and syllables that BPE merges."""
    pool = list("abcdefghijklmnopqrstuvwxyzABC0123456789 .,;:!?'\"-\t\n\r") + list("éüñ漢字😀▁☃Ω")
    syllables = ["the", "tion", "ing", " an", "er", " re", "  ", "   ", "ou", "12", " 3", "st", "ly", "<s>", "</s>"]
    return "".join(rng.choice(pool) if rng.random() < 0.3 else rng.choice(syllables) for _ in range(length))


def test_a_larger_tokenizer_converts_exactly_on_random_text(tmp_path):
    """Property check on 1000 seeded random strings, with a 1000-piece model (many merges that compete)."""
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(random_text(rng, rng.randint(5, 80)) for _ in range(3000)))
    ours = load_tokenizer(train_tokenizer([corpus], tmp_path / "run" / "tokenizer", vocab_size=1000))
    save_tokenizer(tmp_path / "run", {}, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for _ in range(1000):
        text = random_text(rng, rng.randint(0, 60))
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.decode(ids), text
