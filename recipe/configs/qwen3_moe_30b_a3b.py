# Qwen3-30B-A3B-shaped (Hugging Face Qwen/Qwen3-30B-A3B config.json): 48 layers, every FFN an MoE of 128 experts
# of width 768, top-8 renormalised over the 8 chosen, dropless; GQA 32 query / 4 kv heads of width 128 (H·D = 4096
# != hidden 2048) with per-head q/k RMSNorm. About 30.5B parameters, 3.3B active per token.
# Validated and parameter-counted by the tests (tests/test_model_configs.py); it is not trained on the CPU machines.
SEQ_LEN = 4096
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=48,
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    qk_norm="head",
    vocab_size=151936,
    max_seq_len=40960,
    intermediate_size=6144,  # the dense width in Qwen3's config; no layer here is dense
    norm_eps=1e-6,
    rope_theta=1_000_000.0,
    num_experts=128,
    moe_gate_k=8,
    moe_intermediate_size=768,
    moe_drop_tokens=False,
    moe_norm_topk_prob=True,
    moe_balance_loss="switch",  # Hugging Face's load_balancing_loss_func
    moe_layer_freq=1,
    checkpoint=True,
)
loss = dict(moe_loss_coeff=0.001)  # router_aux_loss_coef
data = dict(path="data/your_corpus", seq_len=SEQ_LEN)
train = dict(steps=50000, run_dir="runs/qwen3_moe_30b_a3b", log_every=10, eval_every=1000, save_every=1000)
