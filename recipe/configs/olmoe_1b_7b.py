# OLMoE-1B-7B-shaped (Hugging Face allenai/OLMoE-1B-7B-0924 config.json): 16 layers, every FFN an MoE of 64
# experts of width 1024, top-8 with the raw softmax scores (not renormalised), dropless; 16 heads with q/k
# RMSNorm over all heads together ("full"). About 6.9B parameters, 1.3B active per token.
# Validated and parameter-counted by the tests (tests/test_model_configs.py); it is not trained on the CPU machines.
SEQ_LEN = 4096
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=16,
    qk_norm="full",
    vocab_size=50304,
    max_seq_len=SEQ_LEN,
    intermediate_size=1024,  # each expert's width (moe_intermediate_size unset: the same)
    norm_eps=1e-5,
    rope_theta=10000.0,
    num_experts=64,
    moe_gate_k=8,
    moe_drop_tokens=False,
    moe_norm_topk_prob=False,
    moe_balance_loss="switch",  # Hugging Face's load_balancing_loss_func
    moe_layer_freq=1,
    checkpoint=True,
)
loss = dict(moe_loss_coeff=0.01, router_z_loss_coeff=0.001)  # router_aux_loss_coef; z-loss weight of the paper
data = dict(path="data/your_corpus", seq_len=SEQ_LEN)
train = dict(steps=50000, run_dir="runs/olmoe_1b_7b", log_every=10, eval_every=1000, save_every=1000)
