"""Import of Hugging Face MoE folders (train.init_from = "hf:DIR"): transformers' model is the reference.

Tiny random models are built with transformers' own classes and saved with save_pretrained (no internet), with
routers scaled up so that routing is decisive and varied, and random norm weights and biases, so that a weight
put in the wrong place shows in the logits.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipe.config import ConfigError, config_from_dict
from recipe.export import save_hf, to_hf_state
from recipe.generate import sample
from recipe.hf_import import HFImportError, HFWeights, check_hf_weights, load_hf_weights, moe_layer_placement
from recipe.model.expert_keys import shard_experts
from recipe.model.transformer import TransformerLM

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=None)
MODELS = {
    # GQA with head_dim 12 (H·D = 48 != 32), top-2 of 4, renormalised
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, head_dim=12, intermediate_size=24, num_hidden_layers=2,
                                                  num_local_experts=4, num_experts_per_tok=2),
    # shared expert with its sigmoid gate, q/k/v biases, a dense first layer, raw top-2 scores
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False),
    # q/k norm per head, top-3 of 6 renormalised, tied embeddings, head_dim 12
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=12, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2, num_experts=6,
        num_experts_per_tok=3, norm_topk_prob=True, tie_word_embeddings=True),
    # q/k norm over all heads, raw top-2 of 4
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_hidden_layers=2, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=False),
}


def make_hf(folder, arch, shard_size=None, dtype=torch.float32, **changes):
    """A tiny random ``arch`` model saved by transformers (in ``dtype``); returns (folder, the model in eval mode,
    float32: what transformers computes from the saved weights)."""
    hf_config = MODELS[arch]()
    for key, value in changes.items():
        setattr(hf_config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "norm.weight", ".bias")) and "gate_proj" not in name:
                param.normal_(0, 0.5).add_(1.0 if name.endswith("norm.weight") else 0.0)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    if dtype != torch.float32:  # the cast rounded the rotary buffers too: transformers' own load recomputes them
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model.eval()


def imported_config(hf_dir, **model):
    return config_from_dict({"model": model, "data": {"seq_len": 16}, "train": {"init_from": f"hf:{hf_dir}"}})


def imported_model(hf_dir, ep_size=1, ep_rank=0, **model):
    config = imported_config(hf_dir, **model)
    ours = TransformerLM(config, ep_size=ep_size)
    with torch.no_grad():  # the trainer loads without a random init first: every weight must be written
        for param in ours.parameters():
            param.fill_(float("nan"))
    load_hf_weights(ours, hf_dir, config.model.hf_architecture, ep_rank)
    assert not any(param.isnan().any() for param in ours.parameters())
    return config, ours.eval()


TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_imported_model_computes_transformers_logits(tmp_path, arch):
    hf_dir, theirs = make_hf(tmp_path / arch, arch)
    config, ours = imported_model(hf_dir)
    assert config.model.hf_architecture == arch and config.model.moe_drop_tokens is False
    with torch.no_grad():
        expected = theirs(input_ids=TOKENS).logits
        torch.testing.assert_close(ours(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
        # negative control: one expert's weights from another expert change the logits
        w1 = ours.moe_layers()[0].deepspeed_moe.experts.w1
        w1[0] = w1[1]
        assert (ours(TOKENS).logits - expected).abs().max() > 1e-3


def test_sharded_safetensors_index(tmp_path):
    hf_dir, theirs = make_hf(tmp_path / "sharded", "qwen2_moe", shard_size="40KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _, ours = imported_model(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(input_ids=TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_bf16_sharded_checkpoints_import_exactly(tmp_path):
    """Published checkpoints are bf16 and sharded: the recipe's fp32 model holds exactly the bf16 values."""
    hf_dir, theirs = make_hf(tmp_path / "bf16", "qwen3_moe", shard_size="20KB", dtype=torch.bfloat16)
    first_shard = load_file(sorted(hf_dir.glob("model-*.safetensors"))[0])
    assert {t.dtype for t in first_shard.values()} == {torch.bfloat16}
    _, ours = imported_model(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(input_ids=TOKENS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_each_expert_parallel_rank_reads_the_dense_weights_and_its_own_experts(tmp_path, monkeypatch, ep_size):
    hf_dir, _ = make_hf(tmp_path / "m", "mixtral")
    _, whole = imported_model(hf_dir)
    read = []
    original = HFWeights.read
    monkeypatch.setattr(HFWeights, "read", lambda self, name: read.append(name) or original(self, name))
    for rank in range(ep_size):
        read.clear()
        _, part = imported_model(hf_dir, ep_size=ep_size, ep_rank=rank)
        local = 4 // ep_size
        experts_read = {int(name.split(".experts.")[1].split(".")[0]) for name in read if ".experts." in name}
        assert experts_read == set(range(rank * local, (rank + 1) * local))
        expected = shard_experts(whole.state_dict(), rank, local)
        got = part.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_hf_to_recipe_to_hf_is_bitwise(tmp_path, arch):
    hf_dir, theirs = make_hf(tmp_path / arch, arch)
    config, ours = imported_model(hf_dir)
    source_config = json.loads((hf_dir / "config.json").read_text())
    tensors, hf_config = to_hf_state(ours.state_dict(), config, source_config)
    original = load_file(hf_dir / "model.safetensors")
    assert tensors.keys() == original.keys()
    assert all(torch.equal(tensors[k], original[k]) for k in original)
    assert hf_config["model_type"] == arch and hf_config["eos_token_id"] == 2
    save_hf(ours.state_dict(), config, tmp_path / "back", source_config)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(again) is type(theirs)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=TOKENS).logits, theirs(input_ids=TOKENS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_greedy_generation_matches_transformers(tmp_path, arch):
    hf_dir, theirs = make_hf(tmp_path / arch, arch)
    _, ours = imported_model(hf_dir)
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0].tolist()
    assert sample(ours, prompt, max_new_tokens=24, temperature=0) == expected


def test_moe_layer_placement():
    assert moe_layer_placement(4, [0, 1, 2, 3]) == (1, 0)
    assert moe_layer_placement(4, [1, 3]) == (2, 0)
    assert moe_layer_placement(5, [1, 2, 3, 4]) == (1, 1)
    assert moe_layer_placement(5, [2, 4]) == (2, 1)
    assert moe_layer_placement(5, [1, 3]) is None  # ours always include the last layer
    assert moe_layer_placement(4, [0, 3]) == (3, 0)
    assert moe_layer_placement(4, [0, 1, 3]) is None


def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_folders_get_one_clear_line(tmp_path):
    with pytest.raises(HFImportError, match="is not a folder"):
        imported_config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFImportError, match="has no config.json"):
        imported_config(tmp_path / "empty")
    hf_dir, _ = make_hf(tmp_path / "m", "mixtral")
    (hf_dir / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(HFImportError, match="has neither model.safetensors nor model.safetensors.index.json"):
        check_hf_weights(hf_dir, imported_config(hf_dir), "mixtral")


def test_missing_shard_and_wrong_shape_are_found_before_loading(tmp_path):
    hf_dir, _ = make_hf(tmp_path / "sharded", "mixtral", shard_size="40KB")
    config = imported_config(hf_dir)
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    shards[1].unlink()
    missing = f"shard {shards[1].name} listed in model.safetensors.index.json is missing"
    with pytest.raises(HFImportError, match=missing):
        check_hf_weights(hf_dir, config, "mixtral")
    hf_dir, _ = make_hf(tmp_path / "single", "mixtral")
    tensors = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    tensors[name] = torch.zeros(32, 20)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    wrong = rf"tensor {name} has shape \[32, 20\] but its config.json implies \[32, 24\]"
    with pytest.raises(HFImportError, match=wrong):
        check_hf_weights(hf_dir, config, "mixtral")
    del tensors[name]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFImportError, match=f"tensor {name} not found"):
        check_hf_weights(hf_dir, config, "mixtral")


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture 'gpt2'"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}), "quantized weights"),
    (dict(model_type="deepseek_v3"), "uses MLA attention"),
    (dict(sliding_window=8), "sliding-window attention"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                           "original_max_position_embeddings": 16}), "rope scaling"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_what_the_recipe_does_not_compute_is_refused_by_name(tmp_path, changes, message):
    hf_dir, _ = make_hf(tmp_path / "m", "mixtral")
    _edit_config(hf_dir, **changes)
    with pytest.raises(HFImportError, match=message):
        imported_config(hf_dir)


def test_qwen_sliding_layers_and_inexpressible_moe_layers_are_refused(tmp_path):
    hf_dir, _ = make_hf(tmp_path / "q", "qwen2_moe")
    _edit_config(hf_dir, use_sliding_window=True, sliding_window=8, max_window_layers=3, layer_types=None)
    with pytest.raises(HFImportError, match="sliding-window attention"):
        imported_config(hf_dir)
    hf_dir, _ = make_hf(tmp_path / "q2", "qwen3_moe")
    _edit_config(hf_dir, num_hidden_layers=4, mlp_only_layers=[2])  # MoE layers [0, 1, 3]
    with pytest.raises(HFImportError, match=r"MoE layers \[0, 1, 3\]"):
        imported_config(hf_dir)


def test_user_keys_that_change_the_architecture_are_refused(tmp_path):
    hf_dir, _ = make_hf(tmp_path / "m", "mixtral")
    with pytest.raises(ConfigError, match=r"`model.num_experts=8` differs from the Hugging Face model in .* "
                                          r"\(num_experts=4\); drop the key"):
        imported_config(hf_dir, num_experts=8)
    with pytest.raises(ConfigError, match="`model.max_seq_len=128` exceeds"):
        imported_config(hf_dir, max_seq_len=128)
    # the same value, and training settings, are the user's to set
    config = imported_config(hf_dir, num_experts=4, max_seq_len=32, moe_drop_tokens=True, moe_capacity_factor=2.0)
    assert config.model.max_seq_len == 32 and config.model.moe_drop_tokens and config.model.moe_capacity_factor == 2.0
    with pytest.raises(ConfigError, match="`train.init_from` must be 'hf:DIR' or 'upcycle:SOURCE'"):
        config_from_dict({"train": {"init_from": f"hf_{hf_dir}"}})


def test_an_expert_count_ep_does_not_divide_is_refused(tmp_path):
    from recipe.ds_config import read_ds_config, resolve_ds_config

    hf_dir, _ = make_hf(tmp_path / "m", "qwen3_moe")  # 6 experts
    ds = read_ds_config("ds_configs/zero2_fp32_ep2.json")
    ds["moe_recipe"] = {"ep_size": 4}
    with pytest.raises(ConfigError, match="ep_size 4"):
        resolve_ds_config(ds, imported_config(hf_dir), 4, "ep4.json")


def _plan(tmp_path, data, hf_dir):
    from conftest import ROOT
    from recipe.train import parse_args
    from recipe.training.plan import plan_run

    config = tmp_path / "cfg.py"
    config.write_text(f"data = {dict(path=str(data), seq_len=16)!r}\n"
                      f"train = {dict(init_from=f'hf:{hf_dir}', run_dir=str(tmp_path / 'run'))!r}\n")
    return plan_run(parse_args(["--config", str(config), "--ds_config", str(ROOT / "ds_configs" / "zero2_fp32.json")]))


def test_the_launch_plan_checks_vocabulary_and_tokenizer_against_the_source(tiny_data, tmp_path):
    """tiny_data: SentencePiece shards of 320 ids. A model with fewer rows is refused; more rows (a padded
    embedding) are fine; a source that ships its own tokenizer must be the one that made the shards."""
    from tokenizers import Tokenizer, models

    small, _ = make_hf(tmp_path / "small", "mixtral")
    with pytest.raises(ConfigError, match=r"`model.vocab_size` \(96\) differs .* \(320\); prepare the data with the "
                                          r"source model's own tokenizer"):
        _plan(tmp_path, tiny_data, small)
    padded, _ = make_hf(tmp_path / "padded", "mixtral", vocab_size=352)
    plan = _plan(tmp_path, tiny_data, padded)
    assert plan.config.model.vocab_size == 352 and plan.config.model.hf_architecture == "mixtral"
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(padded / "tokenizer.json"))
    with pytest.raises(ConfigError, match=rf"were not made by {padded / 'tokenizer.json'}, the tokenizer of the "
                                          rf"model in {padded}; prepare them with"):
        _plan(tmp_path, tiny_data, padded)


def test_the_reader_releases_its_file_mappings_as_it_goes(tmp_path, monkeypatch):
    """With a tiny release threshold every read reopens the files: the import is unchanged."""
    import recipe.hf_import as hf_import

    hf_dir, theirs = make_hf(tmp_path / "m", "qwen3_moe", shard_size="40KB")
    monkeypatch.setattr(hf_import, "RELEASE_MAPPED_BYTES", 1024)
    _, ours = imported_model(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(input_ids=TOKENS).logits, rtol=1e-4, atol=1e-4)


DENSE = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, intermediate_size=48, num_hidden_layers=2, head_dim=12),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, intermediate_size=48, num_hidden_layers=2),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, intermediate_size=48, num_hidden_layers=2, head_dim=12),
}


@pytest.mark.parametrize("arch", sorted(DENSE))
def test_dense_sources_read_exactly_and_upcycle_to_their_logits(tmp_path, arch):
    """An upcycling source: the dense recipe model read from the folder computes transformers' logits, and the
    MoE made of it (fine-grained, G = 2) starts with the same logits."""
    from recipe.hf_import import read_hf_dense
    from recipe.training.build import load_initial_weights

    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(DENSE[arch]()).float().eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    theirs.save_pretrained(tmp_path / arch)
    model, state = read_hf_dense(tmp_path / arch)
    dense = TransformerLM(config_from_dict({"model_type": "INTERNLM", "model": model, "data": {"seq_len": 16}}))
    dense.load_state_dict(state)
    with torch.no_grad():
        expected = theirs(input_ids=TOKENS).logits
        torch.testing.assert_close(dense.eval()(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
    config = config_from_dict({"model": dict(num_experts=4, moe_intermediate_size=24, moe_gate_k=2,
                                             moe_norm_topk_prob=True, moe_drop_tokens=False),
                               "data": {"seq_len": 16}, "train": {"init_from": f"upcycle:{tmp_path / arch}"}})
    moe = TransformerLM(config)
    load_initial_weights(moe, config, ep_rank=0)
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match=f"holds a dense {arch} model; start an MoE from it with "
                                          f"train.init_from='upcycle:"):
        imported_config(tmp_path / arch)


def test_generate_samples_a_hugging_face_folder_greedily_as_transformers_does(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    from recipe.generate import main

    hf_dir, theirs = make_hf(tmp_path / "m", "olmoe")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    assert main(["--hf_dir", str(hf_dir), "--prompt", "w5 w17 w40", "--num_samples", "1", "--temperature", "0",
                 "--max_new_tokens", "12"]) == 0
    with torch.no_grad():
        ids = theirs.generate(torch.tensor([[8, 20, 43]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=False) in capsys.readouterr().out
    assert main(["--hf_dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_resume_takes_the_saved_model_section_not_the_source(tmp_path):
    """--resume of an imported run needs neither the source folder nor the transformers it was read with."""
    import shutil

    hf_dir, _ = make_hf(tmp_path / "m", "mixtral")
    started = imported_config(hf_dir, moe_capacity_factor=1.5)
    run = tmp_path / "run"
    run.mkdir()
    saved = started.to_dict()
    saved["train"]["run_dir"] = str(run)
    (run / "config.json").write_text(json.dumps({"config": saved}))
    shutil.rmtree(hf_dir)
    train = {"init_from": f"hf:{hf_dir}", "run_dir": str(run), "resume": True}
    resumed = config_from_dict({"model": {"moe_capacity_factor": 1.5}, "data": {"seq_len": 16}, "train": train})
    assert resumed.model == started.model and resumed.loss == started.loss
    with pytest.raises(HFImportError, match="is not a folder"):  # a fresh start reads the source
        config_from_dict({"data": {"seq_len": 16}, "train": {**train, "resume": False}})
