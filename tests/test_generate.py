"""recipe.generate's prompts: --prompt (repeatable), --prompts-file, and the default, a new document."""
from __future__ import annotations

import shutil

import pytest
import torch

import recipe.generate as generate
from recipe.config import config_from_dict
from recipe.data.tokenizer import Tokenizer
from recipe.model.transformer import TransformerLM

MODEL = dict(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=320, max_seq_len=64, multiple_of=8,
             num_experts=2, moe_gate_k=1)


@pytest.fixture()
def run_dir(tiny_data, tmp_path, monkeypatch):
    """A run folder as generate reads it: the tokenizer training copies there, and a random tiny model standing in
    for its checkpoint (loading checkpoints is tested with real runs in test_training.py and test_pipeline.py)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(tiny_data / "tokenizer.model", run / "tokenizer.model")
    config = config_from_dict({"model": MODEL, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    model = TransformerLM(config, ep_size=1).eval()
    monkeypatch.setattr(generate, "load_model", lambda folder, tag=None: (model, config))
    return run


def _prompt_ids(monkeypatch) -> list[list[int]]:
    """The prompt ids every sample() call gets, recorded."""
    seen, real = [], generate.sample

    def recording(model, prompt_ids, *args, **kwargs):
        seen.append(list(prompt_ids))
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(generate, "sample", recording)
    return seen


def _samples(output: str) -> list[str]:
    return [part.split("\n", 1)[1].strip() for part in output.split("--- sample ")[1:]]


def test_prompt_flags_and_prompts_file_reach_the_samples_in_order(run_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("peace and freedom\n\n   \nthe future of work\n")
    argv = ["--run_dir", str(run_dir), "--prompt", "the nation", "--prompts-file", str(prompts_file),
            "--num_samples", "4", "--max_new_tokens", "3"]
    assert generate.main(argv) == 0
    samples = _samples(capsys.readouterr().out)
    expected = ["the nation", "peace and freedom", "the future of work", "the nation"]
    assert len(samples) == 4 and all(s.startswith(p) for s, p in zip(samples, expected)), samples


def test_without_prompts_every_sample_starts_a_new_document(run_dir, monkeypatch, capsys):
    seen = _prompt_ids(monkeypatch)
    eos = Tokenizer(run_dir / "tokenizer.model").eos_id  # the shards hold no bos: documents follow an eos
    assert generate.main(["--run_dir", str(run_dir), "--num_samples", "2", "--max_new_tokens", "4"]) == 0
    assert seen == [[eos], [eos]]
    samples = _samples(capsys.readouterr().out)
    assert len(samples) == 2 and not any("state of the Union" in s for s in samples)
    # print_samples as the trainer calls it (num_samples only) and an explicit "" do the same.
    seen.clear()
    assert generate.print_samples(run_dir, num_samples=1, max_new_tokens=2) == \
        generate.print_samples(run_dir, num_samples=1, prompts=[""], max_new_tokens=2)
    assert seen == [[eos], [eos]]


def test_a_missing_or_empty_prompts_file_is_one_line(run_dir, tmp_path, capsys):
    assert generate.main(["--run_dir", str(run_dir), "--prompts-file", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--prompts-file {tmp_path / 'nope.txt'}: cannot read it" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert generate.main(["--run_dir", str(run_dir), "--prompts-file", str(tmp_path / "blank.txt")]) == 2
    assert capsys.readouterr().err == f"error: --prompts-file {tmp_path / 'blank.txt'} has no prompt; write one " \
                                      "prompt per line\n"
