# DeepSeek-MoE-16B-shaped (Hugging Face deepseek-ai/deepseek-moe-16b-base config.json): 28 layers, the first a
# dense FFN of width 10944 (first_k_dense_replace=1), the others MoE: 64 routed experts of width 1408, top-6 with
# the raw softmax scores, plus 2 shared experts of width 1408 (ungated), sequence-wise balancing loss (seq_aux).
# About 16.4B parameters, 2.8B active per token.
# Validated and parameter-counted by the tests (tests/test_model_configs.py); it is not trained on the CPU machines.
SEQ_LEN = 4096
model_type = "INTERNLM_MoE"
model = dict(
    num_layers=28,
    hidden_size=2048,
    num_attention_heads=16,
    vocab_size=102400,
    max_seq_len=SEQ_LEN,
    intermediate_size=10944,  # the dense first layer
    norm_eps=1e-6,
    rope_theta=10000.0,
    num_experts=64,
    moe_gate_k=6,
    moe_intermediate_size=1408,
    moe_num_shared_experts=2,
    moe_shared_expert_intermediate_size=1408,
    moe_dense_first_layers=1,
    moe_drop_tokens=False,
    moe_norm_topk_prob=False,
    moe_balance_loss="sequence",
    moe_layer_freq=1,
    checkpoint=True,
)
loss = dict(moe_loss_coeff=0.001)  # aux_loss_alpha
data = dict(path="data/your_corpus", seq_len=SEQ_LEN)
train = dict(steps=50000, run_dir="runs/deepseek_moe_16b", log_every=10, eval_every=1000, save_every=1000)
