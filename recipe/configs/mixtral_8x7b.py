# Mixtral-8x7B-shaped (Hugging Face mistralai/Mixtral-8x7B-v0.1 config.json): 32 layers, every FFN an MoE of
# 8 experts of width 14336, top-2 renormalised over the two, dropless; GQA 32 query / 8 kv heads.
# About 46.7B parameters, 12.9B active per token.
# Validated and parameter-counted by the tests (tests/test_model_configs.py); it is not trained on the CPU machines.
SEQ_LEN = 4096
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_seq_len=32768,
    intermediate_size=14336,  # each expert's width (moe_intermediate_size unset: the same)
    norm_eps=1e-5,
    rope_theta=1_000_000.0,
    num_experts=8,
    moe_gate_k=2,
    moe_drop_tokens=False,
    moe_norm_topk_prob=True,
    moe_balance_loss="switch",  # Hugging Face's load_balancing_loss_func
    moe_layer_freq=1,
    checkpoint=True,
)
loss = dict(moe_loss_coeff=0.02)  # router_aux_loss_coef
data = dict(path="data/your_corpus", seq_len=SEQ_LEN)
train = dict(steps=50000, run_dir="runs/mixtral_8x7b", log_every=10, eval_every=1000, save_every=1000)
