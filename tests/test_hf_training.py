"""Continue training a Hugging Face MoE, and upcycle a Hugging Face dense model, under the real deepspeed launcher.

One tiny Qwen2-MoE (shared expert, q/k/v biases, a dense first layer) and one tiny Llama, both with a
tokenizer.json trained here and an embedding padded beyond the tokenizer's ids, are saved with save_pretrained;
the corpus is prepared with that tokenizer. transformers' models are the reference for the first step's loss.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS, launch, read_metrics, train_layouts, write_ds_config

pytestmark = pytest.mark.multirank
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MODEL_VOCAB = 320  # the tokenizer has fewer ids: the padded rows are never a target
SEQ_LEN, GLOBAL_BATCH = 16, 4


def _train_tokenizer(texts: list[str]) -> "tokenizers.Tokenizer":
    from tokenizers import models, pre_tokenizers, trainers, decoders

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _save_hf(folder: Path, hf_config, tokenizer) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float()
    with torch.no_grad():  # decisive routers: routing that depends on the weights being in place
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    """(qwen2_moe folder, llama folder, prepared data) sharing one tokenizer."""
    from recipe.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("hf_world")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(30)]
    (root / "docs").mkdir()
    for i, text in enumerate(texts):
        (root / "docs" / f"d{i:02d}.txt").write_text(text + "\n")
    tokenizer = _train_tokenizer(texts)
    common = dict(vocab_size=MODEL_VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, num_hidden_layers=3)
    moe = _save_hf(root / "qwen2_moe", transformers.Qwen2MoeConfig(
        **common, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True), tokenizer)
    dense = _save_hf(root / "llama", transformers.LlamaConfig(**common, intermediate_size=64), tokenizer)
    data = root / "data"
    prepare_dataset(root / "docs", data, vocab_size=None, tokenizer_model=moe, val_every=5, seed=0, verbose=False)
    return moe, dense, data


def _config(path: Path, data: Path, init_from: str, model: dict, steps: int) -> Path:
    train = dict(steps=steps, log_every=1, eval_every=1000, eval_batches=1, save_every=1000, wandb="disabled",
                 init_from=init_from)
    path.write_text(f"model = {model!r}\nloss = {dict(moe_loss_coeff=0.01)!r}\n"
                    f"data = {dict(path=str(data), seq_len=SEQ_LEN)!r}\ntrain = {train!r}\n")
    return path


def _first_global_batch(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What every layout trains on at step 1 (the loader's order is global; one rank holding it all)."""
    from recipe.data.loader import BatchLoader, TokenDataset

    x, y = BatchLoader(TokenDataset(data, "train"), SEQ_LEN, GLOBAL_BATCH, 0, 1, seed=0).next_batch()
    return torch.as_tensor(x), torch.as_tensor(y)


def _reference_loss(hf_dir: Path, data: Path) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x, y = _first_global_batch(data)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def test_import_continues_at_every_expert_parallel_size_and_exports_back(hf_world, tmp_path):
    moe_dir, _, data = hf_world
    config = _config(tmp_path / "cfg.py", data, f"hf:{moe_dir}", dict(max_seq_len=32), steps=3)
    layouts = {"1rank_ep1": (1, 4, 1), "2rank_ep2": (2, 2, 2), "4rank_ep4": (4, 1, 4)}  # ranks, micro, ep
    results = train_layouts(config, layouts, tmp_path)
    reference = results["1rank_ep1"]
    # step 1 trains the imported weights: its loss is transformers' loss on the same tokens
    assert reference[0]["lm_loss"] == pytest.approx(_reference_loss(moe_dir, data), rel=1e-5)
    for name, records in results.items():
        for ref, rec in zip(reference, records, strict=True):
            for key in ("loss", "lm_loss", "grad_norm"):
                assert rec[key] == pytest.approx(ref[key], rel=1e-5), (name, rec["step"], key)
    assert reference[-1]["lm_loss"] < reference[0]["lm_loss"]
    # the weights are in place before deepspeed.initialize, so any ZeRO stage and precision starts from them
    bf16 = write_ds_config(tmp_path / "bf16.json", base="zero1_bf16_ep2.json", train_micro_batch_size_per_gpu=2)
    launch(2, config, bf16, tmp_path / "2rank_ep2_zero1_bf16")
    first_bf16 = read_metrics(tmp_path / "2rank_ep2_zero1_bf16")[0][0]["lm_loss"]
    assert first_bf16 == pytest.approx(reference[0]["lm_loss"], rel=2e-2)
    run = tmp_path / "2rank_ep2"
    assert json.loads((run / "hf_source_config.json").read_text())["model_type"] == "qwen2_moe"
    assert (run / "tokenizer.json").is_file()
    _export_reload_and_generate(run, tmp_path / "exported")


def _export_reload_and_generate(run: Path, out: Path) -> None:
    """The trained run exports as Qwen2-MoE; transformers' model computes the recipe's logits and greedy tokens."""
    from recipe.export import main as export_main
    from recipe.generate import load_model, sample

    assert export_main(["--run_dir", str(run), "--format", "hf", "--out", str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM" and theirs.config.eos_token_id == 2
    ours, _ = load_model(run)
    tokens = torch.randint(0, MODEL_VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, ours(tokens).logits, rtol=1e-4, atol=1e-4)
        expected = theirs.generate(torch.tensor([[5, 60, 7]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0].tolist()
    assert sample(ours, [5, 60, 7], max_new_tokens=16, temperature=0) == expected


def test_upcycled_llama_starts_at_the_dense_loss_and_trains(hf_world, tmp_path):
    _, dense_dir, data = hf_world
    # 8 experts of half the dense width, k = 2 x granularity 2: starts equal to the dense model
    model = dict(max_seq_len=32, num_experts=8, moe_intermediate_size=32, moe_gate_k=4, moe_norm_topk_prob=True,
                 moe_drop_tokens=False)
    config = _config(tmp_path / "cfg.py", data, f"upcycle:{dense_dir}", model, steps=8)
    ds = write_ds_config(tmp_path / "ep2.json", train_micro_batch_size_per_gpu=2, moe_recipe={"ep_size": 2})
    launch(2, config, ds, tmp_path / "run")
    records, _ = read_metrics(tmp_path / "run")
    assert records[0]["lm_loss"] == pytest.approx(_reference_loss(dense_dir, data), rel=1e-5)
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.05
